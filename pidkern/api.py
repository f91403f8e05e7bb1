"""The public API: `load` a decoder, `decode` latents into images, turn images into bytes.

Everything a caller passes in is checked here, once, with errors that name the argument,
the value and what was expected. The only silent changes are the documented ones:
inputs move to the decoder's device, the latent and text take the compute dtype, and
sigma becomes a float32 [B] tensor.
"""
from __future__ import annotations

import logging
import math
import threading
import warnings
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import PRESETS, PiDConfig, get_preset
from .latents import explain_wrong_form
from .progress import busy, steps_callback
# The image functions live in pidkern.images; importable from here as before.
from .images import IMAGE_FORMATS, numbered_paths, save_images, save_png, to_pil, to_uint8  # noqa: F401
from .reference import PiDNet
from .sampler import SAMPLERS, check_noise, philox_draws, release_draws, sample, schedule, seed_int64

log = logging.getLogger("pidkern")

BACKENDS = ("auto", "reference", "fast")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r}: expected 'cpu', 'cuda', 'cuda:N' or a torch.device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available on this machine (torch {torch.__version__})")
    return dev


def resolve_dtype(dtype, device: torch.device, name: str = "dtype") -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"{name}={dtype!r}: expected one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name}={dtype!r}: expected torch.float32, torch.bfloat16 or torch.float16")
    return dtype


def resolve_precision(precision) -> str:
    from .plan import PRECISIONS
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    return precision


def resolve_text_encoder(value, device: torch.device):
    """None, a CaptionEncoder, or a path to Gemma-2-2B-it (loaded on `device`)."""
    if value is None:
        return None
    from .text import CaptionEncoder
    if isinstance(value, (str, Path)):
        return CaptionEncoder.from_pretrained(value, device=device)
    if not isinstance(value, CaptionEncoder):
        raise TypeError(f"text_encoder: expected None, a path or a pidkern.CaptionEncoder, got {type(value).__name__}")
    return value


def resolve_config(preset) -> PiDConfig:
    if isinstance(preset, PiDConfig):
        return preset
    if not isinstance(preset, str):
        raise TypeError(f"preset={preset!r}: expected a preset name or a PiDConfig")
    return get_preset(preset)


@torch.no_grad()
def fill_random_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values quickly, in place.

    nn.init on a 1.35B-parameter model takes ~20 s on a CPU; copying a 1M-number Gaussian
    pool (rotated per tensor) into each weight is memory-bound. Matrices are scaled by
    1/sqrt(fan_in) so activations stay O(1); 1-D norm weights are 1, other vectors 0.02.
    The values only have to be finite and unstructured enough for timing.
    """
    params = list(module.named_parameters())
    if not params or params[0][1].device.type == "meta":
        return module
    dev = params[0][1].device
    gen = torch.Generator(device=dev).manual_seed(seed)
    pool = torch.randn(1 << 20, generator=gen, device=dev, dtype=torch.float32)
    for i, (name, p) in enumerate(params):
        flat = p.view(-1)
        if p.dim() >= 2:
            src = pool * (1.0 / math.sqrt(p[0].numel()))
        elif "norm" in name.lower() and name.endswith("weight"):
            flat.fill_(1.0)
            continue
        else:
            src = pool * 0.02
        src = torch.roll(src, (i * 7919) % pool.numel()).to(p.dtype)
        k, n = src.numel(), flat.numel()
        for start in range(0, n, k):
            m = min(k, n - start)
            flat[start:start + m].copy_(src[:m])
    return module


def random_net(cfg: PiDConfig, device, dtype: torch.dtype, seed: int = 0) -> PiDNet:
    """A PiDNet with random weights allocated straight in `dtype` on `device` (no nn.init
    pass: 1.35 B parameters would take ~20 s on a CPU)."""
    with torch.device("meta"):
        net = PiDNet(cfg)
    net = net.to(dtype).to_empty(device=torch.device(device))
    return fill_random_(net, seed).eval().requires_grad_(False)


def _moved(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A fresh copy of `t` on `device` (pinned when it is host memory for a CUDA tensor, so
    the copies back run at full PCIe speed), made outside inference mode: the copy becomes
    a parameter's data, which the user may later train or load_state_dict into."""
    with torch.inference_mode(False), torch.no_grad():
        pin = device.type == "cpu" and t.device.type == "cuda"
        return torch.empty(t.shape, dtype=t.dtype, device=device, pin_memory=pin).copy_(t)


# The live Decoders of each network. A Decoder parks weights only of a network no other
# Decoder uses: another one would not know to bring them back before running the net.
_decoders_of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_decoders_lock = threading.Lock()


def _adopt(decoder, net) -> None:
    """Register `decoder` as a user of `net`, bringing back weights another one parked."""
    with _decoders_lock:
        others = list(_decoders_of.setdefault(net, weakref.WeakSet()))
        _decoders_of[net].add(decoder)
    for other in others:
        if other is not decoder:
            other.reference_weights_on_device()


def _sole_user(decoder, net) -> bool:
    with _decoders_lock:
        return set(_decoders_of.get(net, ())) == {decoder}


class Decoder:
    """A loaded PiD network and the sampler around it. `net` is the reference PiDNet.

    On CUDA, a fast decode parks the net's parameters the fast path never reads (its
    `FastPiD.unread_parameters`: 1.56 GiB of flux-2k in bf16) in pinned host memory; any
    use of the reference network (`net`, `using_net`, a reference decode) brings them back
    first. See `using_net` for the cost of alternating. Several Decoders may share one
    net; none of them parks while they do."""

    def __init__(self, net: PiDNet, device: torch.device, dtype: torch.dtype, source: str, autocast=None,
                 text_encoder=None, precision: str = "native"):
        self.precision = resolve_precision(precision)
        self._net = net.eval().requires_grad_(False)
        # Where a fast decode parks the weights the fast path never reads, or None: only on
        # CUDA, where they would hold GPU memory; the mechanism itself works for any pair.
        self._park_to = torch.device("cpu") if device.type == "cuda" else None
        self._parked: dict = {}          # parameter name -> the device it came from
        self._net_users = 0              # using_net() blocks in progress: never park under them
        self.device = device
        self.dtype = dtype
        self.source = source
        # Non-float32 weights run under autocast, as the release does (its residual stream
        # turns float32 at the first adapter gate). float32 weights may opt in too.
        self.autocast = autocast if autocast is not None else (None if dtype == torch.float32 else dtype)
        self._engine = None
        # Re-entrant: building the engine (under the lock) reads `net`, which takes it too.
        self._lock = threading.RLock()
        self.text_encoder = text_encoder
        _adopt(self, self._net)

    @property
    def net(self) -> PiDNet:
        """The reference PiDNet, whole on the decoder's device: weights a fast decode parked
        come back first. Keep using it in other threads while fast decodes run only inside
        `using_net()` (a later fast decode parks them again)."""
        with self._lock:
            self._restore()
            return self._net

    @net.setter
    def net(self, value):
        # A replaced network (torch.compile's wrapper, other weights) gets a new fast engine.
        with self._lock:
            self._restore()
            with _decoders_lock:
                _decoders_of.get(self._net, weakref.WeakSet()).discard(self)
            _adopt(self, value)
            self._net = value
            self._engine = None

    @contextmanager
    def using_net(self):
        """`with decoder.using_net() as net:` the reference network, whole on the device, and
        kept so until the block ends, even while other threads decode fast.

        Alternating reference use and fast decodes moves the parked weights each time:
        device -> host at the first fast decode after a use, host -> device at the next
        use (flux-2k bf16: 1.56 GiB each way, some 30-70 ms over PCIe 5; not measured)."""
        with self._lock:
            self._restore()
            self._net_users += 1
        try:
            yield self._net
        finally:
            with self._lock:
                self._net_users -= 1

    def _park(self, names) -> None:
        """Move the named parameters' data to `_park_to`; the Parameter objects stay."""
        if self._park_to is None or self._parked:     # the cheap check every fast decode makes
            return
        with self._lock:
            if self._parked or self._net_users or not _sole_user(self, self._net):
                return
            params = dict(self._net.named_parameters())
            for name in names:
                p = params[name]
                self._parked[name] = p.device
                p.data = _moved(p.data, self._park_to)

    def _restore(self) -> None:
        """Bring parked parameters back to the devices they came from (call under the lock)."""
        if not self._parked:
            return
        params = dict(self._net.named_parameters())
        for name, device in self._parked.items():
            params[name].data = _moved(params[name].data, device)
        self._parked = {}

    def parked_parameters(self) -> tuple[str, ...]:
        """Names of the net's parameters parked in host memory right now (empty when the
        net is whole on the device)."""
        return tuple(self._parked)

    @property
    def text_encoder(self):
        """The CaptionEncoder behind `decode(prompt=...)`, or None. Settable: None, a
        CaptionEncoder, or a path (loaded with CaptionEncoder.from_pretrained on this
        decoder's device)."""
        return self._text_encoder

    @text_encoder.setter
    def text_encoder(self, value):
        self._text_encoder = resolve_text_encoder(value, self.device)

    @property
    def config(self) -> PiDConfig:
        return self._net.cfg

    def __repr__(self):
        fp8 = ", precision=fp8" if self.precision == "fp8" else ""
        return f"Decoder({self.config.name}, device={self.device}, dtype={self.dtype}{fp8}, source={self.source})"

    # -- input checks -------------------------------------------------------------------
    def _check_latent(self, latent) -> torch.Tensor:
        cfg = self.config
        if not isinstance(latent, torch.Tensor):
            raise TypeError(f"latent: expected a torch.Tensor [B, {cfg.latent_channels}, h, w], got {type(latent).__name__}")
        hint = explain_wrong_form(latent, cfg)      # a generator's own form: name the converter
        if hint:
            raise ValueError(f"latent: shape {tuple(latent.shape)} does not fit preset {cfg.name}: {hint}")
        if latent.dim() != 4:
            raise ValueError(f"latent: expected 4 dims [B, {cfg.latent_channels}, h, w], got shape {tuple(latent.shape)}")
        if not latent.is_floating_point():
            raise TypeError(f"latent: expected a floating-point tensor, got dtype {latent.dtype}")
        if latent.shape[1] != cfg.latent_channels:
            raise ValueError(f"latent: preset {cfg.name} takes {cfg.latent_channels} channels, got shape "
                             f"{tuple(latent.shape)} ({latent.shape[1]} channels)")
        if latent.shape[0] == 0 or latent.shape[2] == 0 or latent.shape[3] == 0:
            raise ValueError(f"latent: empty shape {tuple(latent.shape)}")
        if not torch.isfinite(latent).all():
            raise ValueError("latent: contains NaN or Inf")
        return latent.to(self.device, torch.float32)

    def _check_sigma(self, sigma, batch: int) -> torch.Tensor:
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float, torch.Tensor)):
            raise TypeError(f"sigma={sigma!r}: expected a float in [0, 1] or a [B] tensor")
        s = torch.as_tensor(sigma, dtype=torch.float32).detach().to(self.device)
        if s.dim() == 0:
            s = s.expand(batch)
        if s.dim() != 1 or s.shape[0] != batch:
            raise ValueError(f"sigma: expected a float or a [{batch}] tensor (one per sample), got shape {tuple(s.shape)}")
        if not torch.isfinite(s).all() or (s < 0).any() or (s > 1).any():
            raise ValueError(f"sigma={s.tolist()}: every value must be finite and in [0, 1]")
        return s.contiguous()

    def _check_text(self, text, batch: int) -> torch.Tensor:
        cfg = self.config
        if text is None:
            # The release's empty caption is Gemma-2-2B's encoding of "" (prompt=""); without
            # an encoder, zeros stand in. Pass prompt= or real embeddings for its exact images.
            return torch.zeros(batch, cfg.max_text, cfg.text_dim, device=self.device)
        if not isinstance(text, torch.Tensor):
            raise TypeError(f"text: expected a torch.Tensor [B, T<={cfg.max_text}, {cfg.text_dim}] or None")
        if text.dim() != 3 or text.shape[2] != cfg.text_dim:
            raise ValueError(f"text: expected shape [B, T<={cfg.max_text}, {cfg.text_dim}], got {tuple(text.shape)}")
        if text.shape[1] > cfg.max_text or text.shape[1] == 0:
            raise ValueError(f"text: {text.shape[1]} tokens; expected 1 to {cfg.max_text} (captions are padded to "
                             f"{cfg.max_text})")
        if text.shape[0] != batch:
            raise ValueError(f"text: batch {text.shape[0]} does not match the latent's batch {batch}")
        if not torch.isfinite(text).all():
            raise ValueError("text: contains NaN or Inf")
        return text.to(self.device, torch.float32)

    def encode_prompt(self, prompt, batch: int) -> torch.Tensor:
        """Caption embeddings for `prompt` through `text_encoder`: a str (for every sample)
        or a list of `batch` str -> float32 [batch, 300, text_dim] on the decoder's device,
        ready for the network (and for `decode(text=...)`)."""
        if isinstance(prompt, str):
            captions = [prompt] * batch
        elif isinstance(prompt, (list, tuple)):
            bad = [i for i, p in enumerate(prompt) if not isinstance(p, str)]
            if bad:
                raise ValueError(f"prompt[{bad[0]}]={prompt[bad[0]]!r}: expected a str (prompt is a str or a list of str)")
            if len(prompt) != batch:
                raise ValueError(f"prompt: {len(prompt)} captions for a batch of {batch}; pass one str for all or "
                                 f"exactly {batch}")
            captions = list(prompt)
        else:
            raise ValueError(f"prompt: expected a str or a list of str, got {type(prompt).__name__}")
        enc = self.text_encoder
        if enc is None:
            raise ValueError(f"prompt={prompt!r} needs a text encoder and this Decoder has none: pass "
                             f"pidkern.load(..., text_encoder=PATH) or set decoder.text_encoder = PATH "
                             f"(a Gemma-2-2B-it directory or ComfyUI .safetensors; pip install \"pidkern[text]\")")
        text = enc.encode(captions)
        cfg = self.config
        if text.shape[2] != cfg.text_dim or text.shape[1] > cfg.max_text:
            raise ValueError(f"text_encoder: gives [{batch}, {text.shape[1]}, {text.shape[2]}] but {cfg.name} takes "
                             f"at most {cfg.max_text} tokens of width {cfg.text_dim}")
        if not torch.isfinite(text).all():
            # Gemma-2's activations overflow float16; the release runs it in bfloat16.
            raise ValueError(f"text_encoder: encoding prompt={prompt!r} gave NaN or Inf (dtype {text.dtype}; "
                             f"Gemma-2 needs bfloat16 or float32)")
        return text.to(self.device, torch.float32)

    def output_size(self, latent_hw, size=None) -> tuple[int, int]:
        cfg = self.config
        natural = cfg.output_size(*latent_hw)
        if size is None:
            return natural
        if (isinstance(size, int) and not isinstance(size, bool)):
            size = (size, size)
        if (not isinstance(size, (tuple, list)) or len(size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)):
            raise TypeError(f"size={size!r}: expected (height, width) ints or None")
        if any(v <= 0 or v % cfg.patch for v in size):
            raise ValueError(f"size={tuple(size)}: height and width must be positive multiples of {cfg.patch}")
        if tuple(size) != natural:
            raise ValueError(f"size={tuple(size)} does not match the latent: a {latent_hw[0]}x{latent_hw[1]} latent "
                             f"of {cfg.name} decodes to {natural[0]}x{natural[1]} ({cfg.upscale}x)")
        return natural

    def prepare(self, latent, sigma=0.0, text=None, steps=4, seed=None, size=None, sampler="sde", noise="release",
                prompt=None):
        """Check and move every input; returns the validated pieces of a decode."""
        if prompt is not None and text is not None:
            raise ValueError("prompt and text are both given; pass captions (prompt=) or their embeddings (text=)")
        latent = self._check_latent(latent)
        b = latent.shape[0]
        h, w = self.output_size(latent.shape[-2:], size)
        if h % self.config.patch or w % self.config.patch:
            raise ValueError(f"latent: {tuple(latent.shape[-2:])} decodes to {h}x{w}, not a multiple of "
                             f"{self.config.patch}")
        schedule(steps)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r}: expected one of {SAMPLERS}")
        check_noise(noise)
        if noise == "philox":
            seed_int64(seed)     # a bad seed fails here, before any work
        sigma = self._check_sigma(sigma, b)
        # Gemma runs last, once every cheap check has passed.
        text = self._check_text(text, b) if prompt is None else self.encode_prompt(prompt, b)
        return dict(latent=latent, sigma=sigma, text=text, steps=steps, seed=seed, size=(h, w), sampler=sampler,
                    noise=noise)

    # -- decoding ----------------------------------------------------------------------
    def _autocast(self):
        if self.autocast is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast)

    def backend_for(self, backend: str) -> str:
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
        if backend == "auto":
            # the 8-bit GEMMs exist on the fast path only
            fast = self.precision == "fp8" or (self.device.type == "cuda" and self.dtype != torch.float32)
            return "fast" if fast else "reference"
        return backend

    @torch.inference_mode()
    def decode(self, latent, sigma=0.0, text=None, steps: int = 4, seed: int | None = None, size=None,
               sampler: str = "sde", backend: str = "auto", progress=None, noise: str = "release",
               prompt=None, plan=None) -> torch.Tensor:
        """Decode `latent` [B, C, h, w] into images [B, 3, H, W] in [-1, 1] (float32).

        sigma: the latent's noise level, a float or a [B] tensor in [0, 1] (0 = clean).
        text: caption embeddings [B, T<=300, 2304]. With neither text nor prompt, all zeros:
        NOT the release's empty caption (that is `prompt=""` through a text encoder).
        prompt: captions, a str for every sample or a list of B str, encoded by
        `text_encoder` with the release's recipe (see `encode_prompt`).
        steps: 1..4 of the distilled schedule; seed: same seed, same noise stream.
        size: optional (H, W) check against the latent's natural output size.
        backend: "reference" (plain PyTorch), "fast" (CUDA engine) or "auto" (fast on CUDA
        in 16-bit, and for a precision="fp8" decoder anywhere; the reference otherwise).
        A reference decode runs the network's own weights whatever the precision.
        progress: a tqdm bar over the steps on stderr: True, False, or None (default: a bar
        when the call takes long: a reference decode, the first fast decode, which builds
        the engine, races routes and captures graphs, and any fast decode off CUDA, fp8
        included); or a callable(step, steps) to report to instead.
        noise: "release" (the release's torch.Generator stream: its images for a seed) or
        "philox" (a counter-based stream the fast engine draws inside its CUDA graph: no
        noise buffers, nothing on the host for a new seed; other images for the same seed,
        the same on every backend and device).
        plan: the fast path's choices for this decode, overriding its rules and races: a
        dict such as {"attention": "prep+sdpa", "graphs": False}, a "key=value,..." string
        or a `pidkern.plan.Plan` (see `Decoder.plan`); fast backend only.
        """
        args = self.prepare(latent, sigma, text, steps, seed, size, sampler, noise, prompt)
        which = self.backend_for(backend)
        if which != "fast" and plan is not None:
            raise ValueError(f"plan={plan!r}: a plan configures the fast backend, but this decode runs "
                             f"backend={which!r}")
        long = which != "fast" or self._engine is None or self.device.type != "cuda"
        report, bar = steps_callback(progress, steps, long)
        try:
            if which == "fast":
                eng = self.engine()
                self._park(eng.model.unread_parameters)
                return eng.decode(**args, progress=report, plan=plan)
            return self._decode_reference(**args, progress=report)
        finally:
            if bar is not None:
                bar.close()

    def plan(self, latent_shape, text_len: int | None = None, plan=None):
        """The fast path's plan for latents of `latent_shape` [B, C, h, w]: what it will run
        (on CUDA the raced entries are filled by the first decode of that shape)."""
        b, _, lh, lw = latent_shape
        h, w = self.config.output_size(lh, lw)
        return self.engine().plan(b, h, w, self.config.max_text if text_len is None else text_len, plan)

    def reference_weights_on_device(self) -> None:
        """Bring back the weights a fast decode parked in host memory (reading `net` does
        the same)."""
        with self._lock:
            self._restore()

    def _decode_reference(self, latent, sigma, text, steps, seed, size, sampler, noise="release", progress=None):
        with self.using_net() as net:
            return self._sample_reference(net, latent, sigma, text, steps, seed, size, sampler, noise, progress)

    def _sample_reference(self, net, latent, sigma, text, steps, seed, size, sampler, noise, progress):
        b = latent.shape[0]
        h, w = size
        with self._autocast():
            tokens = net.adapter_tokens(latent.to(self.dtype), h, w)   # once per decode, not per step
            text = text.to(self.dtype)

            def velocity(x, t):
                tt = torch.full((b,), t, device=self.device, dtype=torch.float32)
                return net(x, tt, text, None, sigma, lq_tokens=tokens)

            draws = philox_draws if noise == "philox" else release_draws
            return sample(velocity, (b, 3, h, w), steps=steps, sampler=sampler, draw=draws(seed, self.device),
                          device=self.device, progress=progress)

    def engine(self):
        with self._lock:
            if self._engine is None:
                from .engine import Engine  # imported late: only the fast path needs it
                self._engine = Engine(self)
            return self._engine


def load(checkpoint=None, preset=None, device=None, dtype=None, autocast=None, ema: bool = False,
         text_encoder=None, parallel=None, group=None, sp_attention=None, precision: str = "native", *,
         random: bool = False, revision: str | None = None, progress: bool = True) -> Decoder:
    """Load a decoder.

    checkpoint: a DCP directory, .pt/.pth or .safetensors file of released weights; or the
        name of a released checkpoint (`PiD_res2k_sr4x_official_flux_distill_4step`, ...) or
        of its preset (`flux-2k`, ...), fetched from the Hugging Face repository nvidia/PiD
        into the Hugging Face cache (`pidkern.hub`; `revision=` pins a commit, HF_TOKEN and
        HF_HUB_OFFLINE apply). A local path of that name wins over the hub.
    random: build random weights instead (images are noise-like; for timing and tests),
        of `preset` (default "flux-2k"). The only way to random weights, except a PiDConfig
        that is no released preset, which has no weights to fetch (a warning says so).
    preset: a preset name of `pidkern.config.PRESETS` or a PiDConfig. With a checkpoint and
        no preset, the preset is detected from tensor shapes (a release name in the path
        picks among presets that are one network).
    device: default CUDA when available, else CPU. dtype: weight dtype, default bfloat16
        on CUDA and float32 on CPU. autocast: compute dtype for float32 weights (the
        release runs float32 weights under bfloat16 autocast).
    ema: read a training checkpoint's EMA copy (`net_ema.` keys) instead of its regular
        weights (`net.`, the release's default); see `pidkern.checkpoint.load_checkpoint`.
    text_encoder: None, a pidkern.CaptionEncoder, a path to Gemma-2-2B-it (a Hugging Face
        directory or ComfyUI .safetensors) or a hub id such as
        "Efficient-Large-Model/gemma-2-2b-it" (loaded on `device`) for `decode(prompt=...)`.
    parallel: None (one process) or "sequence": every rank of `group` (default: the
        initialised default process group, e.g. torchrun's) calls this and then `decode`
        with the same arguments, and each decodes a band of image rows
        (pidkern.parallel; the device defaults to the rank's own GPU under NCCL).
    sp_attention: how the bands meet in attention under parallel="sequence": "gather"
        (default; all-gather the other bands' keys and values) or "ulysses" (all-to-all
        of heads against sequence: fewer bytes from N = 3 on, for slower links).
    precision: "native" (the GEMMs in `dtype`) or "fp8": the fast path's large GEMMs in
        8-bit e4m3 with per-row scales (docs/fp8.md), quantized once when the fast model is
        built; the 8-bit copies replace the originals in device memory during fast decodes.
        Needs an Ada/Hopper or later GPU on CUDA; on the CPU the same math runs emulated.
    progress: bars on stderr while weights are fetched, read or built.

    The Decoder returned is also what `pidkern.decode` uses when given no `model=`.
    """
    dec = _load(checkpoint, preset, device, dtype, autocast, ema, text_encoder, parallel, group, sp_attention,
                precision, random=random, revision=revision, progress=progress)
    global _last_loaded
    _last_loaded = weakref.ref(dec)
    return dec


def _random_config(preset, random: bool) -> PiDConfig:
    """The config to build random weights of, when load() got no checkpoint."""
    if random:
        return resolve_config(preset or "flux-2k")
    from .hub import names
    if preset is None:
        raise ValueError(f"checkpoint: none given. Name a released checkpoint, e.g. pidkern.load('flux-2k') "
                         f"(fetched from the Hugging Face repository nvidia/PiD; released: {names()}), pass a "
                         f"local file, or ask for random weights: pidkern.load(preset='flux-2k', random=True)")
    cfg = resolve_config(preset)
    if cfg.name in PRESETS and PRESETS[cfg.name] == cfg:
        raise ValueError(f"preset={cfg.name!r} without a checkpoint: pidkern.load({cfg.name!r}) loads the "
                         f"release's weights; pidkern.load(preset={cfg.name!r}, random=True) builds random ones "
                         f"(noise-like images). Random weights are no longer the default")
    return cfg


def _load(checkpoint, preset, device, dtype, autocast, ema, text_encoder, parallel, group, sp_attention, precision,
          random=False, revision=None, progress=True) -> Decoder:
    precision = resolve_precision(precision)
    if not isinstance(random, bool):
        raise TypeError(f"random={random!r}: expected True (random weights) or False")
    if random and checkpoint is not None:
        raise ValueError(f"random=True with checkpoint={str(checkpoint)!r}: give one or the other")
    if parallel is not None or group is not None or sp_attention is not None:
        from .parallel import sequence_parallel, setup
        group, device = setup(parallel, group, device, sp_attention)
        dec = _load(checkpoint, preset, device, dtype, autocast, ema, text_encoder, None, None, None, precision,
                    random=random, revision=revision, progress=progress)
        sp = sequence_parallel(dec, group, attention=sp_attention or "gather")
        sp.precision = dec.precision        # read when its fast engine is built, on the first fast decode
        return sp
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if autocast is not None:
        autocast = resolve_dtype(autocast, dev, "autocast")
    cfg = resolve_config(preset) if preset is not None else None
    if checkpoint is None:
        cfg = _random_config(preset, random)
        if not random:
            warnings.warn(f"pidkern.load: {cfg.name} is no released preset, so there are no weights to fetch; "
                          f"building it with RANDOM weights (noise-like images)", stacklevel=3)
        enc = resolve_text_encoder(text_encoder, dev)
        n = sum(p.numel() for p in _meta_net(cfg).parameters())
        with busy(f"building random {cfg.name} weights ({_count(n)} parameters)", progress):
            net = random_net(cfg, dev, dt)
        return Decoder(net, dev, dt, "random", autocast, enc, precision)
    path = checkpoint
    from .hub import fetch_checkpoint, release_name
    if isinstance(checkpoint, str) and not Path(checkpoint).expanduser().exists() and release_name(checkpoint):
        path = fetch_checkpoint(checkpoint, revision=revision)
    elif revision is not None:
        raise ValueError(f"revision={revision!r}: applies to a released checkpoint fetched by name, not to the local "
                         f"path {str(checkpoint)!r}")
    enc = resolve_text_encoder(text_encoder, dev)
    from .checkpoint import load_checkpoint
    with busy(f"reading {Path(path).name}", progress):
        state, cfg = load_checkpoint(path, preset=cfg, ema=ema)
        with torch.device("meta"):
            net = PiDNet(cfg)
        net.load_state_dict(state, assign=True, strict=True)
        net = net.to(dev, dt)
    return Decoder(net, dev, dt, str(checkpoint), autocast, enc, precision)


def _meta_net(cfg: PiDConfig) -> PiDNet:
    with torch.device("meta"):
        return PiDNet(cfg)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


_cache: dict = {}
_cache_lock = threading.Lock()
_last_loaded = None      # weakref to the Decoder pidkern.load returned last


def check_latent_for(latent, cfg: PiDConfig, what: str = "latent") -> None:
    """The cheap checks of a latent against a preset, made before any weight is read: a
    generator's own form (named helper), dims, channels."""
    if not isinstance(latent, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor [B, {cfg.latent_channels}, h, w], got "
                        f"{type(latent).__name__}")
    hint = explain_wrong_form(latent, cfg)
    if hint:
        raise ValueError(f"{what}: shape {tuple(latent.shape)} does not fit preset {cfg.name}: {hint}")
    if latent.dim() != 4 or latent.shape[1] != cfg.latent_channels:
        raise ValueError(f"{what}: preset {cfg.name} takes [B, {cfg.latent_channels}, h, w], got shape "
                         f"{tuple(latent.shape)}")


def _default_decoder(latent, backbone):
    """The decoder `pidkern.decode` uses without model=: the release checkpoint of
    `backbone`, else the one pidkern.load returned last (while it is alive)."""
    if backbone is not None:
        from .latents import get_backbone
        return get_backbone(backbone).presets[0][1]
    dec = _last_loaded() if _last_loaded is not None else None
    if dec is not None:
        return dec
    chans = latent.shape[1] if isinstance(latent, torch.Tensor) and latent.dim() >= 2 else "?"
    raise ValueError(
        f"model: none given and nothing loaded. Pass model= (a Decoder from pidkern.load, a checkpoint path, or a "
        f"released name such as 'flux-2k') or backbone= (the generator: 'flux', 'sd3', 'qwenimage', ...). A "
        f"{chans}-channel latent cannot name its decoder: FLUX.1, SD3 and Qwen-Image latents all have 16 "
        f"channels and need different weights. Random weights only on request: "
        f"model=pidkern.load(preset='flux-2k', random=True)")


def decode(latent, sigma=0.0, *, model=None, backbone=None, device=None, dtype=None, text_encoder=None,
           precision=None, **kwargs) -> torch.Tensor:
    """One call from latent to image, reusing a cached Decoder.

    model: a Decoder, a checkpoint path, or a released checkpoint's name or preset name
    (fetched from the hub as `load` does). Without model=: the release checkpoint of
    `backbone` (e.g. "flux": `pidkern.preset_for(backbone)`'s first variant), else the
    Decoder `pidkern.load` returned last in this process (while you hold it); otherwise a
    ValueError at once. The latent's shape is checked against the preset before any
    weight is read. text_encoder, precision: as in `load` (a Decoder brings its own; a
    precision given with one must be its own). Other keyword arguments go to
    `Decoder.decode`.
    """
    if precision is not None:
        precision = resolve_precision(precision)
    if model is None:
        model = _default_decoder(latent, backbone)
    elif backbone is not None:
        raise ValueError(f"backbone={backbone!r}: picks the release checkpoint when model= is not given; pass one "
                         f"of them, not both")
    if isinstance(model, Decoder):
        if precision is not None and precision != model.precision:
            raise ValueError(f"precision={precision!r}: model is a Decoder loaded with precision="
                             f"{model.precision!r}; load another with pidkern.load(..., precision={precision!r})")
        if text_encoder is not None and text_encoder is not model.text_encoder:
            raise ValueError("text_encoder: model is a Decoder with its own encoder; attach this one with "
                             "decoder.text_encoder = ... instead")
        dec = model
    else:
        from .hub import release_name
        dev = resolve_device(device)
        # Decoders with different encoders are different decoders: the encoder is in the key.
        enc_key = str(Path(text_encoder).expanduser().resolve()) if isinstance(text_encoder, (str, Path)) else text_encoder
        key = (str(model), str(dev), str(resolve_dtype(dtype, dev)), enc_key, precision or "native")
        with _cache_lock:
            dec = _cache.get(key)
            if dec is None:
                is_path = isinstance(model, Path) or (isinstance(model, str) and Path(model).exists())
                release = None if is_path else release_name(model)
                if not is_path and release is None:
                    raise ValueError(f"model={model!r}: neither a released name ({', '.join(sorted(PRESETS))} or "
                                     f"their release names) nor an existing checkpoint path")
                if release is not None:
                    from .hub import preset_of
                    check_latent_for(latent, get_preset(preset_of(release)))
                where = dict(checkpoint=model)
                if precision not in (None, "native"):
                    where["precision"] = precision
                dec = load(**where, device=dev, dtype=dtype, text_encoder=text_encoder)
                _cache[key] = dec
    return dec.decode(latent, sigma, **kwargs)

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
               prompt=None, plan=None, window=None, overlap=None) -> torch.Tensor:
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
        progress: optional callable(step, steps).
        noise: "release" (the release's torch.Generator stream: its images for a seed) or
        "philox" (a counter-based stream the fast engine draws inside its CUDA graph: no
        noise buffers, nothing on the host for a new seed; other images for the same seed,
        the same on every backend and device).
        plan: the fast path's choices for this decode, overriding its rules and races: a
        dict such as {"attention": "prep+sdpa", "graphs": False}, a "key=value,..." string
        or a `pidkern.plan.Plan` (see `Decoder.plan`); fast backend only.
        window, overlap: None (default): the image whole, refused past the preset's trained
        range (`PiDConfig.trained_res`) with an error naming window="auto"; "auto" or a size
        in output pixels (int or (h, w)): overlapping windows of that size blended at every
        step (pidkern.window, docs/windows.md; a window covering the image is the plain
        decode); "whole": the image whole even past the trained range. progress is then
        called per batch of windows, as (windows evaluated, windows x steps).
        """
        args = self.prepare(latent, sigma, text, steps, seed, size, sampler, noise, prompt)
        grid = self.window_grid(args["size"], window, overlap)
        if grid is not None:
            return self._decode_windows(grid, args, backend, plan, progress)
        which = self.backend_for(backend)
        if which == "fast":
            eng = self.engine()
            self._park(eng.model.unread_parameters)
            return eng.decode(**args, progress=progress, plan=plan)
        if plan is not None:
            raise ValueError(f"plan={plan!r}: a plan configures the fast backend, but this decode runs "
                             f"backend={which!r}")
        return self._decode_reference(**args, progress=progress)

    def plan(self, latent_shape, text_len: int | None = None, plan=None, window=None, overlap=None):
        """The fast path's plan for latents of `latent_shape` [B, C, h, w]: what it will run
        (on CUDA the raced entries are filled by the first decode of that shape). With
        window= (as in `decode`): a `pidkern.window.WindowPlan` (grid, windows per call,
        where the canvas lives, memory) holding the plan of one batch of windows."""
        b, _, lh, lw = latent_shape
        h, w = self.config.output_size(lh, lw)
        grid = None if window is None else self.window_grid((h, w), window, overlap)
        if grid is not None:
            from .memory import estimate_memory
            from .window import window_plan
            e = torch.finfo(self.dtype).bits // 8
            one = estimate_memory(self.config, b, *grid.size, text_len, e)
            return window_plan(self.config, b, grid, self.device.type, one,
                               lambda shape: self.plan(shape, text_len, plan), dtype_bytes=e)
        return self.engine().plan(b, h, w, self.config.max_text if text_len is None else text_len, plan)

    # -- windowed decoding (pidkern.window) ---------------------------------------------
    def window_grid(self, size, window=None, overlap=None):
        """The window grid of a decode of `size` (H, W), or None for the plain decode."""
        from .window import resolve_grid
        return resolve_grid(self.config, size, window, overlap, trained=self.source != "random")

    def _decode_windows(self, grid, args, backend, plan, progress, group=None):
        from .window import fast_evaluator, sample_windows
        which = self.backend_for(backend)
        inputs = {k: args[k] for k in ("latent", "sigma", "text", "steps", "seed", "sampler", "noise")}
        if which == "fast":
            eng = self.engine()
            self._park(eng.model.unread_parameters)
            evaluate = fast_evaluator(eng, grid, args["latent"], args["text"], args["sigma"], plan)
            return sample_windows(None, grid, **inputs, dtype=self.dtype, device=self.device, progress=progress,
                                  group=group, evaluate=evaluate)
        if plan is not None:
            raise ValueError(f"plan={plan!r}: a plan configures the fast backend, but this decode runs "
                             f"backend={which!r}")
        with self.using_net() as net, self._autocast():
            return sample_windows(net, grid, **inputs, dtype=self.dtype, device=self.device, progress=progress,
                                  group=group)

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
         text_encoder=None, parallel=None, group=None, sp_attention=None, precision: str = "native") -> Decoder:
    """Load a decoder.

    checkpoint: a DCP directory, .pt/.pth or .safetensors file of released weights, or
        None for random weights (a loud warning: images will be noise-like).
    preset: a preset name of `pidkern.config.PRESETS` or a PiDConfig. With a checkpoint and
        no preset, the preset is detected from tensor shapes; without a checkpoint the
        default is "flux-2k".
    device: default CUDA when available, else CPU. dtype: weight dtype, default bfloat16
        on CUDA and float32 on CPU. autocast: compute dtype for float32 weights (the
        release runs float32 weights under bfloat16 autocast).
    ema: read a training checkpoint's EMA copy (`net_ema.` keys) instead of its regular
        weights (`net.`, the release's default); see `pidkern.checkpoint.load_checkpoint`.
    text_encoder: None, a pidkern.CaptionEncoder, or a path to Gemma-2-2B-it (a Hugging
        Face directory or ComfyUI .safetensors; loaded on `device`) for `decode(prompt=...)`.
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
    """
    precision = resolve_precision(precision)
    if parallel is not None or group is not None or sp_attention is not None:
        from .parallel import sequence_parallel, setup
        group, device = setup(parallel, group, device, sp_attention)
        dec = load(checkpoint, preset, device, dtype, autocast, ema, text_encoder, precision=precision)
        sp = sequence_parallel(dec, group, attention=sp_attention or "gather")
        sp.precision = dec.precision        # read when its fast engine is built, on the first fast decode
        return sp
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if autocast is not None:
        autocast = resolve_dtype(autocast, dev, "autocast")
    enc = resolve_text_encoder(text_encoder, dev)
    if checkpoint is None:
        cfg = resolve_config(preset or "flux-2k")
        msg = (f"pidkern.load: no checkpoint given, building {cfg.name} with RANDOM weights; "
               f"its images are not real decodes")
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
        return Decoder(random_net(cfg, dev, dt), dev, dt, "random", autocast, enc, precision)
    from .checkpoint import load_checkpoint
    state, cfg = load_checkpoint(checkpoint, preset=None if preset is None else resolve_config(preset), ema=ema)
    with torch.device("meta"):
        net = PiDNet(cfg)
    net.load_state_dict(state, assign=True, strict=True)
    net = net.to(dev, dt)
    return Decoder(net, dev, dt, str(checkpoint), autocast, enc, precision)


_cache: dict = {}
_cache_lock = threading.Lock()


def decode(latent, sigma=0.0, *, model=None, device=None, dtype=None, text_encoder=None, precision=None,
           **kwargs) -> torch.Tensor:
    """One call from latent to image, reusing a cached Decoder.

    model: a Decoder, a preset name (random weights), or a checkpoint path; default
    "flux-2k". text_encoder, precision: as in `load` (a Decoder brings its own; a
    precision given with one must be its own). Other keyword arguments go to
    `Decoder.decode`.
    """
    if precision is not None:
        precision = resolve_precision(precision)
    if isinstance(model, Decoder):
        if precision is not None and precision != model.precision:
            raise ValueError(f"precision={precision!r}: model is a Decoder loaded with precision="
                             f"{model.precision!r}; load another with pidkern.load(..., precision={precision!r})")
        if text_encoder is not None and text_encoder is not model.text_encoder:
            raise ValueError("text_encoder: model is a Decoder with its own encoder; attach this one with "
                             "decoder.text_encoder = ... instead")
        dec = model
    else:
        model = model or "flux-2k"
        dev = resolve_device(device)
        # Decoders with different encoders are different decoders: the encoder is in the key.
        enc_key = str(Path(text_encoder).expanduser().resolve()) if isinstance(text_encoder, (str, Path)) else text_encoder
        key = (str(model), str(dev), str(resolve_dtype(dtype, dev)), enc_key, precision or "native")
        with _cache_lock:
            dec = _cache.get(key)
            if dec is None:
                is_path = isinstance(model, Path) or (isinstance(model, str) and Path(model).exists())
                if not is_path and model not in PRESETS:
                    raise ValueError(f"model={model!r}: neither a preset name ({', '.join(sorted(PRESETS))}) "
                                     f"nor an existing checkpoint path")
                where = dict(checkpoint=model) if is_path else dict(preset=model)
                if precision not in (None, "native"):
                    where["precision"] = precision
                dec = load(**where, device=dev, dtype=dtype, text_encoder=text_encoder)
                _cache[key] = dec
    return dec.decode(latent, sigma, **kwargs)


# -- turning results into bytes -------------------------------------------------------------

def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] on the CPU: round((clamp(x) + 1) * 127.5),
    half to even; the same rule as the fused output stage's uint8 image."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected a [B, 3, H, W] tensor, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    from ._ext import to_uint8 as rule
    return rule(images).permute(0, 2, 3, 1).cpu()


def to_pil(images: torch.Tensor) -> list:
    from PIL import Image
    return [Image.fromarray(a.numpy()) for a in to_uint8(images)]


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def numbered_paths(path, n: int) -> list[Path]:
    """`path` itself for one image, path-0.png, path-1.png... for more."""
    path = Path(path)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(n)]


def save_png(images: torch.Tensor, path) -> list[Path]:
    """Write one PNG per image: `path` itself for one image, path-0.png, path-1.png... for more."""
    return save_images(images, path, format="PNG")


def save_images(images, path, quality: int = 95, format: str | None = None) -> list[Path]:
    """Write images ([B, 3, H, W] in [-1, 1], or a list of PIL images), named as save_png
    names them, as PNG or JPEG by the path's extension (.png, .jpg, .jpeg); `quality`
    (1..95) is JPEG's."""
    path = Path(path)
    if format is None:
        format = IMAGE_FORMATS.get(path.suffix.lower())
        if format is None:
            raise ValueError(f"output {str(path)!r}: unknown image extension {path.suffix or '(none)'!r}; "
                             f"expected one of {', '.join(IMAGE_FORMATS)}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
        raise ValueError(f"quality={quality!r}: expected an int from 1 to 95 (JPEG quality)")
    pics = to_pil(images) if isinstance(images, torch.Tensor) else list(images)
    outs = numbered_paths(path, len(pics))
    for pic, out in zip(pics, outs):
        out.parent.mkdir(parents=True, exist_ok=True)
        if format == "JPEG":
            pic.save(out, format="JPEG", quality=quality)
        else:
            pic.save(out, format="PNG")
    return outs

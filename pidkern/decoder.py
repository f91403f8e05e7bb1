"""The Decoder: a loaded PiD network, its input checks, and its two ways to decode
(the reference network with the release's sampler loop, or the fast engine).

`pidkern.load` builds one (pidkern.api); `pidkern.parallel` extends it across ranks.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

from .config import PiDConfig
from .inputs import DecodeInputs
from .latents import explain_wrong_form
from .parking import Parking
from .reference import PiDNet
from .resolve import BACKENDS, resolve_precision
from .text import resolve_text_encoder
from .sampler import SAMPLERS, check_noise, release_draws, sample, schedule, seed_int64


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
        # Where a fast decode parks the weights the fast path never reads, or None: only on
        # CUDA, where they would hold GPU memory; the mechanism itself works for any pair.
        self._parking = Parking(self, self._net, torch.device("cpu") if device.type == "cuda" else None, self._lock)

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
            self._parking.switch(value)
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
            self._parking.users += 1
        try:
            yield self._net
        finally:
            with self._lock:
                self._parking.users -= 1

    @property
    def _park_to(self):
        """Where a fast decode parks weights (None: nowhere); tests point it elsewhere."""
        return self._parking.to

    @_park_to.setter
    def _park_to(self, device):
        self._parking.to = device

    def _park(self, names) -> None:
        self._parking.park(names)

    def _restore(self) -> None:
        self._parking.restore()

    def parked_parameters(self) -> tuple[str, ...]:
        """Names of the net's parameters parked in host memory right now (empty when the
        net is whole on the device)."""
        return tuple(self._parking.parked)

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
        """Check and move every input: the validated inputs of a decode (inputs.DecodeInputs)."""
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
        return DecodeInputs(latent=latent, sigma=sigma, text=text, steps=steps, seed=seed, size=(h, w),
                            sampler=sampler, noise=noise)

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
        progress: optional callable(step, steps).
        noise: "release" (the release's torch.Generator stream: its images for a seed) or
        "philox" (a counter-based stream the fast engine draws inside its CUDA graph: no
        noise buffers, nothing on the host for a new seed; other images for the same seed,
        the same on every backend and device).
        plan: the fast path's choices for this decode, overriding its rules and races: a
        dict such as {"attention": "prep+sdpa", "graphs": False}, a "key=value,..." string
        or a `pidkern.plan.Plan` (see `Decoder.plan`); fast backend only.
        """
        inputs = self.prepare(latent, sigma, text, steps, seed, size, sampler, noise, prompt)
        which = self.backend_for(backend)
        if which == "fast":
            eng = self.engine()
            self._park(eng.model.unread_parameters)
            return eng.decode(inputs, progress=progress, plan=plan)
        if plan is not None:
            raise ValueError(f"plan={plan!r}: a plan configures the fast backend, but this decode runs "
                             f"backend={which!r}")
        with self.using_net() as net:
            return self.sample_reference(net, inputs, progress)

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

    def sample_reference(self, net, inputs: DecodeInputs, progress=None, shard=None) -> torch.Tensor:
        """The reference decode: the release's sampler loop around `net` (the caller holds
        it whole, e.g. inside `using_net()`). shard: decode that band of rows
        (pidkern.parallel's RowShard): the adapter runs whole (its convolutions read
        neighbouring rows) and is cut to the band, the noise is the whole image's draw
        cut to the band, and the network's attentions meet the other bands'."""
        b = inputs.batch
        h, w = inputs.size
        p = self.config.patch
        from ._ext import philox_draws
        draws = (philox_draws if inputs.noise == "philox" else release_draws)(inputs.seed, self.device)
        shape = (b, 3, h, w)
        with self._autocast():
            tokens = net.adapter_tokens(inputs.latent.to(self.dtype), h, w)   # once per decode, not per step
            extra = {}
            if shard is not None:
                ws = w // p
                tokens = tokens[:, shard.row0 * ws:(shard.row0 + shard.rows) * ws]
                extra = dict(shard=shard)
                full = draws

                def draws(k, shape_):     # noqa: F811  (the full-size draw of one process, this band's rows)
                    return shard.pixel_band(full(k, (b, 3, h, w)), p)
                shape = (b, 3, shard.rows * p, w)
            text = inputs.text.to(self.dtype)
            sigma = inputs.sigma

            def velocity(x, t):
                tt = torch.full((b,), t, device=self.device, dtype=torch.float32)
                return net(x, tt, text, None, sigma, lq_tokens=tokens, **extra)

            return sample(velocity, shape, steps=inputs.steps, sampler=inputs.sampler, draw=draws,
                          device=self.device, progress=progress)

    def engine(self):
        with self._lock:
            if self._engine is None:
                from .engine import Engine  # imported late: only the fast path needs it
                self._engine = Engine(self)
            return self._engine

"""The Decoder: a loaded PiD network, its input checks, and its two ways to decode
(the reference network with the release's sampler loop, or the fast engine).

`pidkern.load` builds one (pidkern.api); `pidkern.parallel` extends it across ranks.
"""
from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager

import torch

from .config import PiDConfig, Sampling, sampling_for
from .inputs import DecodeInputs
from .latents import explain_wrong_form
from .parking import Parking
from .progress import steps_callback
from .reference import PiDNet
from .resolve import BACKENDS, resolve_precision
from .text import NEGATIVE_PROMPT, resolve_text_encoder
from .sampler import (DPM, SAMPLERS, Guidance, check_cfg, check_dpm_steps, check_noise, check_shift, dpm_schedule,
                      release_draws, sample, sample_dpm, schedule, seed_int64)


class Decoder:
    """A loaded PiD network and the sampler around it. `net` is the reference PiDNet.

    On CUDA, a fast decode parks the net's parameters the fast path never reads (its
    `FastPiD.unread_parameters`: 1.56 GiB of flux-2k in bf16) in pinned host memory; any
    use of the reference network (`net`, `using_net`, a reference decode) brings them back
    first. See `using_net` for the cost of alternating. Several Decoders may share one
    net; none of them parks while they do."""

    def __init__(self, net: PiDNet, device: torch.device, dtype: torch.dtype, source: str, autocast=None,
                 text_encoder=None, precision: str = "native", sampling: Sampling | None = None, stored=None):
        self.precision = resolve_precision(precision)
        # What a decode runs when it names no sampler, steps, cfg or shift (the checkpoint's).
        self.sampling = sampling if sampling is not None else sampling_for(net.cfg)
        # a ComfyUI file's quantized Linears as stored (checkpoint.load_quantized): the fast
        # model runs those of its precision's format from their own codes and scales
        self.stored_weights = dict(stored or {})
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
        prec = f", precision={self.precision}" if self.precision != "native" else ""
        return f"Decoder({self.config.name}, device={self.device}, dtype={self.dtype}{prec}, source={self.source})"

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

    def encode_prompt(self, prompt, batch: int, name: str = "prompt") -> torch.Tensor:
        """Caption embeddings for `prompt` through `text_encoder`: a str (for every sample)
        or a list of `batch` str -> float32 [batch, 300, text_dim] on the decoder's device,
        ready for the network (and for `decode(text=...)`). `name`: the argument errors name."""
        if isinstance(prompt, str):
            captions = [prompt] * batch
        elif isinstance(prompt, (list, tuple)):
            bad = [i for i, p in enumerate(prompt) if not isinstance(p, str)]
            if bad:
                raise ValueError(f"{name}[{bad[0]}]={prompt[bad[0]]!r}: expected a str ({name} is a str or a list of str)")
            if len(prompt) != batch:
                raise ValueError(f"{name}: {len(prompt)} captions for a batch of {batch}; pass one str for all or "
                                 f"exactly {batch}")
            captions = list(prompt)
        else:
            raise ValueError(f"{name}: expected a str or a list of str, got {type(prompt).__name__}")
        enc = self.text_encoder
        if enc is None:
            raise ValueError(f"{name}={prompt!r} needs a text encoder and this Decoder has none: pass "
                             f"pidkern.load(..., text_encoder=PATH) or set decoder.text_encoder = PATH "
                             f"(a Gemma-2-2B-it directory or ComfyUI .safetensors; pip install \"pidkern[text]\")")
        text = enc.encode(captions)
        cfg = self.config
        if text.shape[2] != cfg.text_dim or text.shape[1] > cfg.max_text:
            raise ValueError(f"text_encoder: gives [{batch}, {text.shape[1]}, {text.shape[2]}] but {cfg.name} takes "
                             f"at most {cfg.max_text} tokens of width {cfg.text_dim}")
        if not torch.isfinite(text).all():
            # Gemma-2's activations overflow float16; the release runs it in bfloat16.
            raise ValueError(f"text_encoder: encoding {name}={prompt!r} gave NaN or Inf (dtype {text.dtype}; "
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

    def prepare(self, latent, sigma=0.0, text=None, steps=None, seed=None, size=None, sampler=None, noise="release",
                prompt=None, cfg=None, shift=None, negative_text=None, negative_prompt=None, window=None,
                overlap=None):
        """Check and move every input: the validated inputs of a decode (inputs.DecodeInputs;
        its `guidance`, a `pidkern.sampler.Guidance`, for sampler="dpm++"; its `window`, a
        `pidkern.window.WindowGrid`, for a windowed decode)."""
        if prompt is not None and text is not None:
            raise ValueError("prompt and text are both given; pass captions (prompt=) or their embeddings (text=)")
        latent = self._check_latent(latent)
        b = latent.shape[0]
        h, w = self.output_size(latent.shape[-2:], size)
        if h % self.config.patch or w % self.config.patch:
            raise ValueError(f"latent: {tuple(latent.shape[-2:])} decodes to {h}x{w}, not a multiple of "
                             f"{self.config.patch}")
        sampler, steps = self._sampler_steps(sampler, steps, cfg, shift, negative_text, negative_prompt)
        check_noise(noise)
        if noise == "philox":
            seed_int64(seed)     # a bad seed fails here, before any work
        grid = self.window_grid((h, w), window, overlap)
        if grid is not None and sampler == DPM:
            raise ValueError(f"window={window!r}: windowed decoding runs the distilled samplers ('sde', 'ode'); "
                             f"sampler={DPM!r} decodes the image whole (window=None)")
        sigma = self._check_sigma(sigma, b)
        # Gemma runs last, once every cheap check has passed.
        text = self._check_text(text, b) if prompt is None else self.encode_prompt(prompt, b)
        guidance = self._guidance(cfg, shift, negative_text, negative_prompt, text, h, w) if sampler == DPM else None
        return DecodeInputs(latent=latent, sigma=sigma, text=text, steps=steps, seed=seed, size=(h, w),
                            sampler=sampler, noise=noise, guidance=guidance, window=grid)

    # -- the sampler's inputs (sampler="dpm++": docs/samplers.md) ---------------------------
    def _sampler_steps(self, sampler, steps, cfg, shift, negative_text, negative_prompt) -> tuple[str, int]:
        """The sampler and step count (the checkpoint's defaults for None), checked."""
        trained = self.sampling
        sampler = trained.sampler if sampler is None else sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r}: expected one of {SAMPLERS}")
        if sampler == DPM:
            steps = check_dpm_steps(trained.dpm_steps if steps is None else steps)
            check_shift(shift)
            if cfg is not None:
                check_cfg(cfg)
        else:
            schedule(4 if steps is None else steps)
            steps = 4 if steps is None else steps
            given = [f"cfg={cfg!r}"] if cfg is not None and cfg != 1.0 else []      # 1: no guidance, as asked
            given += [f"shift={shift!r}"] if shift is not None else []
            given += [k for k, v in (("negative_text", negative_text), ("negative_prompt", negative_prompt))
                      if v is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: guidance and the flow shift belong to sampler={DPM!r}; the "
                                 f"distilled sampler {sampler!r} has neither (pass sampler={DPM!r})")
        if sampler == DPM and trained.distilled:
            warnings.warn(f"{self.config.name} ({self.source}) is a distilled checkpoint, trained for the 4-step "
                          f"sampler, not for sampler={DPM!r} or guidance; decoding as asked", stacklevel=4)
        elif sampler != DPM and not trained.distilled:
            warnings.warn(f"{self.config.name} ({self.source}) is an undistilled checkpoint, trained for "
                          f"sampler={DPM!r} with guidance, not for the 4-step sampler {sampler!r}; decoding as "
                          f"asked", stacklevel=4)
        return sampler, steps

    def _guidance(self, cfg, shift, negative_text, negative_prompt, text, h: int, w: int) -> Guidance:
        cfg = check_cfg(self.sampling.cfg if cfg is None else cfg)
        shift = check_shift(shift)
        shift = self.sampling.shift.shift(h, w) if shift is None else shift
        if cfg == 1.0:
            for k, v in (("negative_text", negative_text), ("negative_prompt", negative_prompt)):
                if v is not None:
                    raise ValueError(f"{k}: the unconditional caption is used only with guidance (cfg > 1), and "
                                     f"this decode has cfg=1")
            return Guidance(cfg, shift)
        return Guidance(cfg, shift, self._negative(negative_text, negative_prompt, text, cfg))

    def _negative(self, negative_text, negative_prompt, text, cfg) -> torch.Tensor:
        """The unconditional half's caption embeddings, [B, T, text_dim] like `text`."""
        b, t_len, cfgn = text.shape[0], text.shape[1], self.config
        if negative_text is not None and negative_prompt is not None:
            raise ValueError("negative_text and negative_prompt are both given; pass the unconditional caption "
                             "(negative_prompt=) or its embeddings (negative_text=)")
        if negative_text is not None:
            neg = negative_text
            if not isinstance(neg, torch.Tensor):
                raise TypeError(f"negative_text: expected a torch.Tensor [1 or {b}, {t_len}, {cfgn.text_dim}], got "
                                f"{type(neg).__name__}")
            if neg.dim() != 3 or neg.shape[2] != cfgn.text_dim:
                raise ValueError(f"negative_text: expected shape [1 or {b}, {t_len}, {cfgn.text_dim}], got "
                                 f"{tuple(neg.shape)}")
            if neg.shape[0] not in (1, b):
                raise ValueError(f"negative_text: batch {neg.shape[0]}; expected 1 (for every sample) or the "
                                 f"latent's batch {b}")
            if not torch.isfinite(neg).all():
                raise ValueError("negative_text: contains NaN or Inf")
            neg = neg.to(self.device, torch.float32).expand(b, -1, -1)
        elif negative_prompt is not None:
            neg = self.encode_prompt(negative_prompt, b, "negative_prompt")
        elif self.text_encoder is not None:
            neg = self.encode_prompt(NEGATIVE_PROMPT, b, "negative_prompt")      # the release's null caption
        else:
            raise ValueError(f"cfg={cfg:g}: guidance needs the unconditional caption, and this Decoder has no text "
                             f"encoder to build the release's (its encoding of pidkern.text.NEGATIVE_PROMPT): pass "
                             f"negative_text= (embeddings [1 or {b}, {t_len}, {cfgn.text_dim}]), attach a text "
                             f"encoder (pidkern.load(..., text_encoder=PATH)), or cfg=1")
        if neg.shape[1] != t_len:
            raise ValueError(f"negative_text: {neg.shape[1]} tokens but the caption has {t_len}; both halves of a "
                             f"guided step take captions of one length (the release pads both to "
                             f"{cfgn.max_text})")
        return neg

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
            fast = self.precision != "native" or (self.device.type == "cuda" and self.dtype != torch.float32)
            return "fast" if fast else "reference"
        return backend

    @torch.inference_mode()
    def decode(self, latent, sigma=0.0, text=None, steps: int | None = None, seed: int | None = None, size=None,
               sampler: str | None = None, backend: str = "auto", progress=None, noise: str = "release",
               prompt=None, plan=None, cfg: float | None = None, shift: float | None = None, negative_text=None,
               negative_prompt=None, window=None, overlap=None) -> torch.Tensor:
        """Decode `latent` [B, C, h, w] into images [B, 3, H, W] in [-1, 1] (float32).

        sigma: the latent's noise level, a float or a [B] tensor in [0, 1] (0 = clean).
        text: caption embeddings [B, T<=300, 2304]. With neither text nor prompt, all zeros:
        NOT the release's empty caption (that is `prompt=""` through a text encoder).
        prompt: captions, a str for every sample or a list of B str, encoded by
        `text_encoder` with the release's recipe (see `encode_prompt`).
        sampler: "sde" (the distilled checkpoints' default), "ode", or "dpm++" (DPM-Solver++
        with guidance, the undistilled checkpoints' default); None = the checkpoint's
        (`decoder.sampling`; docs/samplers.md).
        steps: 1..4 of the distilled schedule, 1..100 for "dpm++"; None = 4, or the
        checkpoint's DPM-Solver++ default (25). seed: same seed, same noise stream.
        cfg, shift, negative_text, negative_prompt ("dpm++" only): the guidance scale (>= 1;
        1 = no guidance and one network evaluation per step, else two: on the fast path one
        batch of 2B; None = the checkpoint's, 5), the flow shift (None = the checkpoint's
        rule at this output size), and the unconditional half's caption: embeddings
        [1 or B, T, 2304] or captions through `text_encoder` (default: the release's null
        caption, its encoding of `pidkern.text.NEGATIVE_PROMPT`).
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
        window, overlap: None (default): the image whole, refused past the preset's trained
        range (`PiDConfig.trained_res`) with an error naming window="auto"; "auto" or a size
        in output pixels (int or (h, w)): overlapping windows of that size blended at every
        step (pidkern.window, docs/windows.md; a window covering the image is the plain
        decode); "whole": the image whole even past the trained range. progress is then
        called per batch of windows, as (windows evaluated, windows x steps).
        """
        inputs = self.prepare(latent, sigma, text, steps, seed, size, sampler, noise, prompt, cfg, shift,
                              negative_text, negative_prompt, window, overlap)
        if inputs.window is not None:
            return self._decode_windows(inputs, backend, plan, progress)
        which = self.backend_for(backend)
        if which != "fast" and plan is not None:
            raise ValueError(f"plan={plan!r}: a plan configures the fast backend, but this decode runs "
                             f"backend={which!r}")
        long = which != "fast" or self._engine is None or self.device.type != "cuda"
        report, bar = steps_callback(progress, inputs.steps, long)
        try:
            if which == "fast":
                eng = self.engine()
                self._park(eng.model.unread_parameters)
                return eng.decode(inputs, progress=report, plan=plan)
            with self.using_net() as net:
                return self.sample_reference(net, inputs, report)
        finally:
            if bar is not None:
                bar.close()

    def plan(self, latent_shape, text_len: int | None = None, plan=None, guided: bool = False, window=None,
             overlap=None):
        """The fast path's plan for latents of `latent_shape` [B, C, h, w]: what it will run
        (on CUDA the raced entries are filled by the first decode of that shape). guided: a
        sampler="dpm++" decode with cfg != 1, whose network runs a batch of 2B. With
        window= (as in `decode`): a `pidkern.window.WindowPlan` (grid, windows per call,
        where the canvas lives, memory) holding the plan of one batch of windows."""
        b, _, lh, lw = latent_shape
        b = 2 * b if guided else b
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

    def _decode_windows(self, inputs: DecodeInputs, backend, plan, progress, group=None):
        from .window import fast_evaluator, sample_windows
        which = self.backend_for(backend)
        if which == "fast":
            eng = self.engine()
            self._park(eng.model.unread_parameters)
            # one CUDA graph per batch of windows only when asked (plan={"graphs": True}): not yet
            # checked on a GPU, so windows run eagerly by default (docs/windows.md)
            from .plan import check_overrides
            graphs = self.device.type == "cuda" and check_overrides(plan).get("graphs") is True
            evaluate = fast_evaluator(eng, inputs.window, inputs.latent, inputs.text, inputs.sigma, plan, graphs)
            return sample_windows(None, inputs, dtype=self.dtype, device=self.device, progress=progress,
                                  group=group, evaluate=evaluate)
        if plan is not None:
            raise ValueError(f"plan={plan!r}: a plan configures the fast backend, but this decode runs "
                             f"backend={which!r}")
        with self.using_net() as net, self._autocast():
            return sample_windows(net, inputs, dtype=self.dtype, device=self.device, progress=progress, group=group)

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
            if inputs.sampler == DPM:
                g = inputs.guidance
                negative = None if g.negative is None else g.negative.to(self.dtype)
                sched = dpm_schedule(inputs.steps, g.cfg, g.shift, self.device)

                def velocities(x, i, guided):
                    tt = sched.times[i].expand(b)
                    # the release runs the halves one after the other, the unconditional first
                    v_uncond = net(x, tt, negative, None, sigma, lq_tokens=tokens, **extra) if guided else None
                    return net(x, tt, text, None, sigma, lq_tokens=tokens, **extra), v_uncond

                return sample_dpm(velocities, shape, sched, draws, progress)

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

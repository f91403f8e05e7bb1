"""The fast decode path's orchestration: plans, noise, the sampler loop, CUDA graphs.

`Engine` owns one `FastPiD` (pidkern.fast: the network prepared for the fast path) and
runs whole decodes with it:

- per decode shape, a `Plan` (pidkern.plan) fixes every implementation choice before
  capture: overrides and rules at once, races during the first warm-up on CUDA;
- once per decode, FastPiD's prologue: the adapter's tokens and heads, the text stream;
- per step, `FastPiD.forward`, then the output stage (pidkern._ext: final layer, fold and
  the sampler update of pidkern.sampler in one pass), with the noise stream's draws in
  the order pidkern.sampler defines;
- on CUDA the whole decode (adapter, steps, sampler) is one CUDA graph per shape and plan,
  kept in a small LRU cache (pidkern.graphs), sized against the memory model
  (pidkern.memory) before it is built.

See docs/design.md for the data flow.
"""
from __future__ import annotations

import threading

import torch

from . import fp8
from .fast import FastPiD
from .graphs import GraphCache, Runner, capture
from .inputs import DecodeInputs
from .memory import check_fits
from .plan import Plan, check_overrides, resolve
from .reference import fold_patch_pixels
from .routes import DeviceSpec
from .sampler import check_noise, ode_update, philox_key, release_draws, renoise_count, schedule, seed_int64


class Engine:
    """Fast decoding for one Decoder. Build through `Decoder.engine()`.

    plan: default overrides for every decode (see pidkern.plan; a decode's own `plan=`
    is applied on top). graphs: shorthand for plan={"graphs": ...}."""

    def __init__(self, decoder, plan=None, graphs: bool | None = None, graph_capacity: int = 2):
        self.decoder = decoder
        self.cfg = decoder.config
        self.device = decoder.device
        self.dtype = decoder.dtype
        self.overrides = check_overrides(plan)
        if graphs is not None:
            self.overrides.update(check_overrides({"graphs": graphs}))
        if self.overrides.get("graphs") and self.device.type != "cuda":
            raise ValueError(f"graphs=True: CUDA graphs need a CUDA device, got {self.device}")
        self.precision = getattr(decoder, "precision", "native")
        if self.precision == "fp8":
            why = fp8.fp8_supported(self.device)
            if why:
                raise ValueError(f"precision='fp8': {why}")
        with decoder.using_net() as net:      # whole on the device while FastPiD reads it
            self.model = FastPiD(net, self.dtype, self.precision)
        self.spec = DeviceSpec.of(self.device)    # what the route table's capability rules read
        self.plans: dict = {}
        self._scalars: dict = {}
        self._tables: dict = {}
        self._lock = threading.Lock()
        self.graphs = GraphCache(self._build_runner, graph_capacity)

    # -- plans -------------------------------------------------------------------------
    def plan(self, batch: int, h: int, w: int, text_len: int, overrides=None, collectives: str | None = None) -> Plan:
        """The plan of one decode shape (cached per shape and overrides). On CUDA its raced
        entries stay open until the first decode of that shape runs its warm-up.
        collectives: the group backend of a sequence-parallel band decode (plan.resolve)."""
        over = {**self.overrides, **check_overrides(overrides)}
        key = (batch, h, w, text_len, tuple(sorted(over.items())), collectives)
        with self._lock:
            if key not in self.plans:
                self.plans[key] = resolve(self.cfg, batch, h, w, text_len, self.device,
                                          torch.finfo(self.dtype).bits // 8, overrides=over, collectives=collectives,
                                          precision=self.precision, spec=self.spec)
            return self.plans[key]

    def tables(self, h: int, w: int, text_len: int) -> dict:
        key = (h, w, text_len)
        if key not in self._tables:
            self._tables[key] = self.model.tables(h, w, text_len, self.device)
        return self._tables[key]

    # -- one decode ----------------------------------------------------------------------
    def run(self, latent, sigma, text, noise, steps, sampler, h, w, plan: Plan, racing=False, shard=None):
        """The whole decode. noise: the release stream's draws (noise[0] the initial image,
        noise[k] the k-th eps), or a 0-d int64 Philox key, whose draw k is made here, in
        the graph (the initial image by philox_normal, the eps inside the output stage).
        shard: decode that band of the h x w image (pidkern.parallel; no graph); noise is
        then the band's rows of the release stream's draws."""
        from . import _ext
        cfg, model = self.cfg, self.model
        if shard is None:
            tab = self.tables(h, w, text.shape[1])
        else:
            tab = model.tables(h, w, text.shape[1], self.device, shard)
            h = shard.rows * cfg.patch           # from here on, the band is the image
        heads, y = model.prologue(latent, text, h if shard is None else shard.grid_rows * cfg.patch, w,
                                  plan["keep_heads"], shard)
        fl = model.net.final_layer
        philox = isinstance(noise, torch.Tensor)
        x = _ext.philox_normal(noise, self._counter(0), (latent.shape[0], 3, h, w)) if philox else noise[0]
        times = schedule(steps)
        for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
            p = model.forward(x, t, heads, y, sigma, tab, plan, racing, shard)
            head = (p, fl.norm.weight, fl.linear.weight, fl.linear.bias, x, self._scalar(t))
            if sampler == "sde" and t_next > 0:
                eps = dict(seed=noise, step=self._counter(i + 1)) if philox else dict(noise=noise[i + 1])
                x = _ext.pixel_output_step(*head, self._scalar(t_next), **eps, patch=cfg.patch, eps=cfg.rms_eps)
            elif sampler == "sde":
                x, _ = _ext.pixel_output_final(*head, patch=cfg.patch, eps=cfg.rms_eps)
            else:
                v = fold_patch_pixels(fl(p.to(fl.linear.weight.dtype)), x.shape[0], h, w, cfg.patch)
                x = ode_update(x, v, t, t_next)
        return x.clamp(-1, 1)

    def _counter(self, k: int) -> torch.Tensor:
        """The Philox stream's draw index k as a device scalar (graphs freeze Python ints)."""
        return self._device_scalar(k, torch.int64)

    def _scalar(self, t: float) -> torch.Tensor:
        # float64: the extension then reproduces the release's Python-float update exactly
        return self._device_scalar(t, torch.float64)

    def _device_scalar(self, value, dtype: torch.dtype) -> torch.Tensor:
        key = (dtype, value)
        if key not in self._scalars:
            self._scalars[key] = torch.tensor(value, dtype=dtype, device=self.device)
        return self._scalars[key]

    # -- graphs ------------------------------------------------------------------------
    def graph_key(self, inputs: DecodeInputs, plan=None) -> tuple:
        """What a captured decode is keyed by: every shape, the sampler, the noise stream and
        the plan's overrides (a different plan never replays another's graph)."""
        return (inputs.batch, *inputs.latent.shape[1:], inputs.text.shape[1], inputs.steps, inputs.sampler,
                inputs.noise, tuple(sorted({**self.overrides, **check_overrides(plan)}.items())))

    def static_buffers(self, key, noise_shape=None) -> dict:
        """A graph's static inputs for `key` (graph_key's): latent, sigma, text, and the noise
        (the Philox key, or one [B, 3, H, W] buffer per draw; with `noise_shape`
        always buffers of that shape, e.g. a band's rows of the draws). Filled with random values: a warm-up must not meet
        zeros it would never meet in use."""
        b, c, lh, lw, t_len, steps, sampler, noise, _ = key
        h, w = self.cfg.output_size(lh, lw)
        dev = self.device
        bufs = dict(latent=torch.zeros(b, c, lh, lw, device=dev).normal_(), sigma=torch.zeros(b, device=dev),
                    text=torch.zeros(b, t_len, self.cfg.text_dim, device=dev).normal_())
        if noise == "philox" and noise_shape is None:
            bufs["noise"] = torch.zeros((), dtype=torch.int64, device=dev)     # the key
        else:
            shape = noise_shape or (b, 3, h, w)
            bufs["noise"] = [torch.zeros(shape, device=dev).normal_() for _ in range(1 + renoise_count(steps, sampler))]
        return bufs

    def capture(self, key, run, noise_shape=None) -> Runner:
        """Capture run(bufs, first) over the static buffers of `key` (the first warm-up races
        the plan's open choices: all of it before capture)."""
        bufs = self.static_buffers(key, noise_shape)
        graph, out = capture(lambda first: run(bufs, first), self.device)
        return Runner(graph, bufs, out)

    def _build_runner(self, key):
        b, c, lh, lw, t_len, steps, sampler, noise, over = key
        h, w = self.cfg.output_size(lh, lw)
        plan = self.plan(b, h, w, t_len, dict(over))
        return self.capture(key, lambda bufs, first: self.run(bufs["latent"], bufs["sigma"], bufs["text"],
                                                              bufs["noise"], steps, sampler, h, w, plan, racing=first))

    # -- entry point ---------------------------------------------------------------------
    def draw_noise(self, shape, steps, sampler, seed, out=None):
        """The release's stream in sampler.py's order: initial noise, then one eps per
        re-noising step.

        With `out` (a graph's static buffers) the draws go straight into them: a separate
        set would hold as many more image-sized float32 buffers at the decode's peak."""
        draw = release_draws(seed, self.device)
        n = 1 + renoise_count(steps, sampler)
        if out is None:
            return [draw(k, shape) for k in range(n)]
        return [draw(k, shape, out=buf) for k, buf in enumerate(out[:n])]

    def check_memory(self, batch, h, w, text_len, noise="release"):
        check_fits(self.cfg, self.device, batch, h, w, text_len, noise)

    @torch.inference_mode()
    def decode(self, inputs: DecodeInputs, progress=None, plan=None):
        """One whole fast decode of checked inputs (Decoder.prepare's)."""
        check_noise(inputs.noise)
        h, w = inputs.size
        b, t_len, steps, sampler, seed = inputs.batch, inputs.text.shape[1], inputs.steps, inputs.sampler, inputs.seed
        the_plan = self.plan(b, h, w, t_len, plan)
        if not the_plan["graphs"]:
            self.check_memory(b, h, w, t_len, inputs.noise)
            draws = philox_key(seed, self.device) if inputs.noise == "philox" else self.draw_noise(
                (b, 3, h, w), steps, sampler, seed)
            out = self.run(inputs.latent, inputs.sigma, inputs.text, draws, steps, sampler, h, w, the_plan,
                           racing=True)
            if progress:
                progress(steps, steps)
            return out
        key = self.graph_key(inputs, plan)
        if key not in self.graphs.keys():
            self.check_memory(b, h, w, t_len, inputs.noise)
        entry = self.graphs.get(key)
        with entry.lock:
            r = entry.runner
            if inputs.noise == "philox":
                r.bufs["noise"].fill_(seed_int64(seed))      # the whole stream follows on the device
            else:
                self.draw_noise((b, 3, h, w), steps, sampler, seed, out=r.bufs["noise"])
            out = r.replay(latent=inputs.latent, sigma=inputs.sigma, text=inputs.text)
        if progress:
            progress(steps, steps)
        return out

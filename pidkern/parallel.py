"""Sequence-parallel decoding: one decode split by image rows across a torch.distributed group.

Every rank holds a contiguous band of patch rows (and the matching pixel rows) of the
image; rows are split as evenly as possible, so bands may differ by one row. What does
not grow with the image, or is needed whole by every band, is replicated: the latent
adapter (its 3x3 convolutions see neighbouring rows), the text stream (its queries attend
to every image key), the per-time conditioning and the sampler's noise draws (every rank
draws the full-size noise from the seed's stream and keeps its rows, so the numbers are
those of one process). Attention is the only place bands meet: each rank all-gathers the
image keys and values of the other bands (torch.distributed's all_gather_single, padded
to the longest band) and attends with its own queries (sp_attention="gather"). The output
stage runs on each band; rank 0 (or every rank) gathers the whole image at the end. Both
backends run this way; the fast one is one CUDA graph per shape, collectives inside, under NCCL. With
sp_attention="ulysses" attention exchanges heads for rows instead (two all-to-alls per
layer, fewer bytes from N = 3 on). See docs/parallel.md.

    torchrun --nproc-per-node 2 -m pidkern decode latent.safetensors -o out.png \\
        --checkpoint flux-2k.safetensors --sequence-parallel

    dec = pidkern.load(ckpt, parallel="sequence")      # inside an initialised process group
    image = dec.decode(latent, sigma, seed=0)          # [B, 3, H, W] on rank 0, None elsewhere
    dec = pidkern.load(ckpt, parallel="sequence", sp_attention="ulysses")   # heads all-to-all
"""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .decoder import Decoder
from .inputs import DecodeInputs
from .graphs import GraphCache, Runner
from .sizes import split_rows  # noqa: F401  (re-exported: the split is part of the parallel API)
from .sampler import resolve_seed

MODES = ("sequence",)
OUTPUTS = ("rank0", "all")
# How the bands meet in attention: "gather" all-gathers the other bands' keys and values
# (each rank attends with all heads of its own queries); "ulysses" exchanges heads for
# sequence with two all-to-alls (each rank attends with all queries of 1/N of the heads).
SP_ATTENTION = ("gather", "ulysses")


def _dist():
    import torch.distributed as dist
    if not dist.is_available():
        raise ValueError("parallel='sequence': this torch build has no torch.distributed")
    return dist


def resolve_group(group):
    """The process group to split decodes over: `group`, or the default one."""
    dist = _dist()
    if not dist.is_initialized():
        raise ValueError("parallel='sequence' needs an initialised torch.distributed process group: run under "
                         "torchrun and call torch.distributed.init_process_group() first (the pidkern command "
                         "line does this for --sequence-parallel), or pass group=")
    if group is None:
        return dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group={group!r}: expected a torch.distributed.ProcessGroup or None")
    if dist.get_rank(group) < 0:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the group "
                         f"of {group.size()} ranks it was asked to decode in")
    return group


def default_device(device, group):
    """Where this rank decodes: the given device, else its own GPU (LOCAL_RANK) under NCCL,
    else the CPU. A group's backend must be able to move tensors of that device."""
    dist = _dist()
    backend = str(dist.get_backend(group)).lower()
    if device is None:
        if torch.cuda.is_available() and "nccl" in backend:
            local = int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count()))
            return torch.device("cuda", local)
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cpu" and backend == "nccl":
        raise ValueError(f"device={device!r}: the process group's backend is nccl, which moves CUDA tensors "
                         f"only; decode on cuda:LOCAL_RANK or use a gloo group")
    return dev


def fingerprint(net: torch.nn.Module) -> str:
    """A short hash of the weights: names, shapes, dtypes and ~4096 evenly spaced values of
    every tensor. Cheap on 1.35 B parameters, and two checkpoints that differ anywhere that
    matters differ here."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in net.state_dict().items():
            flat = t.detach().reshape(-1)
            sample_ = flat[:: max(1, flat.numel() // 4096)].float().cpu()
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(sample_.numpy().tobytes())
    return h.hexdigest()[:16]


def _tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


class RowShard:
    """One rank's band of patch rows, and the collectives that let it attend to the rest.

    Passed to PiDNet.forward as `shard=` (reference.py reads `row0`, `grid_rows` and
    `attend`); FastPiD's attentions call `attend` too."""

    def __init__(self, group, grid_rows: int, grid_cols: int, attention: str = "gather"):
        dist = _dist()
        if attention not in SP_ATTENTION:
            raise ValueError(f"sp_attention={attention!r}: expected one of {SP_ATTENTION}")
        self.attention = attention
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.grid_rows, self.grid_cols = grid_rows, grid_cols
        self.bands = split_rows(grid_rows, self.world)
        self.row0, self.rows = self.bands[self.rank]
        self.max_rows = max(n for _, n in self.bands)
        self.bytes_received = 0      # by the attention collectives: what bench.parallel_cost models

    def _padded(self, t: torch.Tensor, dim: int, unit: int) -> torch.Tensor:
        """`t` (this band's rows * unit entries along `dim`) grown with zeros to the longest
        band's: the collectives want equal sizes on every rank (gloo and NCCL alike)."""
        missing = self.max_rows * unit - t.shape[dim]
        if missing:
            pad = list(t.shape)
            pad[dim] = missing
            t = torch.cat([t, t.new_zeros(pad)], dim=dim)
        return t.contiguous()

    def _all_gather_padded(self, t: torch.Tensor, dim: int, unit: int) -> list[torch.Tensor]:
        """Every rank's `t` (its band's rows * unit entries along `dim`), in rank order."""
        t = self._padded(t, dim, unit)
        out = t.new_empty((self.world * t.shape[0], *t.shape[1:]))   # the concatenated form: gloo has no stacked one
        _dist().all_gather_single(out, t, group=self.group)
        out = out.view(self.world, *t.shape)
        return [out[r].narrow(dim, 0, rows * unit) for r, (_, rows) in enumerate(self.bands)]

    def gather_kv(self, k: torch.Tensor, v: torch.Tensor, dim: int = 2,
                  text: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v of this band -> of the whole image, in row order: the sequence is dimension
        `dim` (the reference's [B, heads, N, hd]: 2; the fast path's [B, N, heads, hd]: 1),
        its first `text` entries are text tokens, replicated, kept as they are. One
        collective for both (they are stacked)."""
        if self.world == 1:
            return k, v
        n = k.shape[dim] - text
        img = torch.stack([k.narrow(dim, text, n), v.narrow(dim, text, n)])
        parts = self._all_gather_padded(img, dim + 1, self.grid_cols)
        chunk = img[0].numel() // n * self.max_rows * self.grid_cols   # one rank's padded K (or V)
        self.bytes_received += 2 * (self.world - 1) * chunk * k.element_size()
        full = torch.cat(parts, dim=dim + 1)
        if text:
            full = torch.cat([torch.stack([k.narrow(dim, 0, text), v.narrow(dim, 0, text)]), full], dim=dim + 1)
        return full[0], full[1]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, core, dim: int = 2,
               text: int = 0) -> torch.Tensor:
        """The attention output of this rank's queries, in q's layout.

        q, k, v hold the sequence along `dim` (the reference's [B, heads, N, hd]: 2; the
        fast path's [B, N, heads, hd]: 1; the heads along the other of dims 1 and 2): its
        first `text` entries are the text tokens (replicated on every rank), then this
        band's image tokens. core(q, k, v) is the attention one process runs (same layout,
        any sequence length and head count). Exchanges what `attention` says."""
        if self.world == 1:
            return core(q, k, v)
        if self.attention == "gather":
            return core(q, *self.gather_kv(k, v, dim, text))
        return self._ulysses(q, k, v, core, dim, text)

    def _ulysses(self, q, k, v, core, dim, text):
        """Heads for sequence and back (DeepSpeed-Ulysses), with torch.distributed's
        all_to_all_single and uneven splits for uneven bands.

        Rank r attends with head group r (heads padded with zero q, k, v to a multiple of
        N, dropped after: a zero head's output is zero and touches no other head) over the
        whole sequence: the text tokens it holds already, every band's image tokens from
        the first exchange. The second sends each band its rows of the output and, with
        them, the text queries' output of this head group, so every rank gets the text
        stream's output of all heads, as one process computes it."""
        dist = _dist()
        hdim, world = 3 - dim, self.world
        heads = q.shape[hdim]
        g = -(-heads // world)                          # heads per rank, padding included
        x = torch.stack([q, k, v])                      # seq at dim + 1, heads at hdim + 1
        if g * world > heads:
            pad = list(x.shape)
            pad[hdim + 1] = g * world - heads
            x = torch.cat([x, x.new_zeros(pad)], dim=hdim + 1)
        n = x.shape[dim + 1] - text
        cols = self.grid_cols
        # first exchange: rank j gets head group j of this band's image tokens
        send = x.narrow(dim + 1, text, n).unflatten(hdim + 1, (world, g)).movedim(hdim + 1, 0).contiguous()
        per_token = send[0].numel() // n                # 3 * B * g * hd
        recv_splits = [rows * cols * per_token for _, rows in self.bands]
        recv = send.new_empty(sum(recv_splits))
        dist.all_to_all_single(recv, send.view(-1), recv_splits, [n * per_token] * world, group=self.group)
        mine = x.narrow(hdim + 1, self.rank * g, g)
        parts = [mine.narrow(dim + 1, 0, text)]
        for part, (_, rows) in zip(recv.split(recv_splits), self.bands):
            shape = list(mine.shape)
            shape[dim + 1] = rows * cols
            parts.append(part.view(shape))
        full = torch.cat(parts, dim=dim + 1)
        del send, recv, parts, x, mine
        o = core(full[0], full[1], full[2])             # head group `rank`, text + every band
        del full
        # second exchange: band i's rows (and the text rows) of this head group to rank i
        back = torch.cat([torch.cat([o.narrow(dim, 0, text), o.narrow(dim, text + r0 * cols, rows * cols)],
                                    dim=dim).reshape(-1) for r0, rows in self.bands])
        per_row = o[0].numel() // o.shape[dim] * o.shape[0]   # B * g * hd
        send_splits = [(text + rows * cols) * per_row for _, rows in self.bands]
        mine_n = text + n
        ret = back.new_empty(world * mine_n * per_row)
        dist.all_to_all_single(ret, back, [mine_n * per_row] * world, send_splits, group=self.group)
        shape = list(o.shape)
        shape[dim] = mine_n
        out = ret.view(world, *shape).movedim(0, hdim).flatten(hdim, hdim + 1).narrow(hdim, 0, heads)
        self.bytes_received += q.element_size() * (sum(recv_splits) - n * per_token
                                                   + (world - 1) * mine_n * per_row)
        return out

    def pixel_band(self, t: torch.Tensor, patch: int) -> torch.Tensor:
        """This band's pixel rows of a full-size [..., H, W] tensor."""
        return t[..., self.row0 * patch:(self.row0 + self.rows) * patch, :]

    def collect(self, x: torch.Tensor, patch: int, output: str) -> torch.Tensor | None:
        """The whole image from every band's [B, C, rows*P, W]: on every rank ("all") or
        on rank 0 of the group only ("rank0"; other ranks get None)."""
        if self.world == 1:
            return x
        dist = _dist()
        if output == "all":
            return torch.cat(self._all_gather_padded(x, 2, patch), dim=2)
        padded = self._padded(x, 2, patch)
        if self.rank == 0:
            bufs = [torch.empty_like(padded) for _ in range(self.world)]
            dist.gather(padded, bufs, group=self.group, group_dst=0)
            return torch.cat([b[:, :, :rows * patch] for b, (_, rows) in zip(bufs, self.bands)], dim=2)
        dist.gather(padded, None, group=self.group, group_dst=0)
        return None


@dataclass
class BandGraph:
    """A captured band decode and what one replay receives through its collectives."""
    runner: Runner
    kv_bytes: int


class SequenceParallelDecoder(Decoder):
    """A Decoder whose decodes are split by image rows across a process group.

    Every rank of the group calls `decode` with the same arguments; the result is the
    image one process would decode (rank 0 gets it; with output="all" every rank does)."""

    def __init__(self, dec: Decoder, group, output: str = "rank0", attention: str = "gather"):
        # every load option the decoder carries (precision, dtype, autocast, text encoder;
        # the weights as loaded, ema or not) is the sequence-parallel decoder's too
        super().__init__(dec.net, dec.device, dec.dtype, dec.source, dec.autocast, dec.text_encoder, dec.precision)
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r}: expected one of {OUTPUTS}")
        if attention not in SP_ATTENTION:
            raise ValueError(f"sp_attention={attention!r}: expected one of {SP_ATTENTION}")
        self.group = group
        self.output = output
        self.attention = attention
        self.fingerprint = fingerprint(self.net)
        self.last_kv_bytes = 0   # what this rank received through the attention collectives in its last decode
        self.last_plan = None    # the fast path's plan of the last decode (graphs, sp_attention rows)
        self.collectives = str(_dist().get_backend(group)).lower()
        self._graphs = None      # captured band decodes (NCCL on CUDA), built on first use

    @property
    def rank(self) -> int:
        return _dist().get_rank(self.group)

    @property
    def world_size(self) -> int:
        return _dist().get_world_size(self.group)

    def __repr__(self):
        return (f"SequenceParallelDecoder({self.config.name}, rank {self.rank} of {self.world_size}, "
                f"sp_attention={self.attention}, device={self.device}, dtype={self.dtype}, source={self.source})")

    def _describe(self, args: DecodeInputs, output: str) -> dict:
        """What this rank is about to decode, for the entry check."""
        return dict(
            preset=self.config.name, weights=self.fingerprint, dtype=str(self.dtype),
            autocast=str(self.autocast), device_type=self.device.type, precision=self.precision,
            latent_shape=tuple(args.latent.shape), latent=_tensor_hash(args.latent),
            text_shape=tuple(args.text.shape), text=_tensor_hash(args.text),
            sigma=[round(float(s), 9) for s in args.sigma.tolist()], steps=args.steps,
            sampler=args.sampler, noise=args.noise, size=tuple(args.size),
            seed=args.seed, output=output, sp_attention=self.attention)

    def _agree(self, mine: dict | None, drawn: int | None, error: Exception | None) -> int:
        """Check that every rank decodes the same thing; returns the seed they share.

        Every rank sends its description (or the error its own checks raised) to every
        rank, so all of them raise the same error and none is left waiting in a
        collective."""
        everyone = [None] * self.world_size
        _dist().all_gather_object(everyone, (mine, drawn, None if error is None else str(error)), group=self.group)
        if error is not None:
            raise error
        for r, (_, _, theirs) in enumerate(everyone):
            if theirs is not None:
                raise ValueError(f"sequence-parallel decode: rank {r} of the group refused its inputs ({theirs}); "
                                 f"every rank must decode the same inputs")
        first = everyone[0][0]
        for r, (theirs, _, _) in enumerate(everyone):
            bad = [k for k in first if theirs[k] != first[k]]
            if bad:
                what = "; ".join(f"{k}: rank 0 has {first[k]!r}, rank {r} has {theirs[k]!r}" for k in bad)
                raise ValueError(f"sequence-parallel decode: the ranks of the group disagree ({what}); every "
                                 f"rank must load the same checkpoint and decode the same inputs")
        return everyone[0][1] if first["seed"] is None else first["seed"]

    @torch.inference_mode()
    def decode(self, latent, sigma=0.0, *, backend: str = "auto", progress=None, output: str | None = None,
               **inputs):
        """As Decoder.decode (the same keyword arguments: text, prompt, steps, seed, size,
        sampler, noise), on every rank of the group at once. Returns the images on rank 0
        (None on the other ranks), or on every rank with output="all" (default: the
        decoder's `output`, "rank0")."""
        mine = drawn = error = None
        try:   # a rank's own input errors go to every rank through the entry check
            if output is not None and output not in OUTPUTS:
                raise ValueError(f"output={output!r}: expected one of {OUTPUTS}")
            output = output or self.output
            which = self.backend_for(backend)
            plan = inputs.pop("plan", None)
            if plan is not None and which != "fast":
                raise ValueError(f"plan={plan!r}: a plan configures the fast backend, but this decode runs "
                                 f"backend={which!r}")
            args = self.prepare(latent, sigma, **inputs)
            drawn = resolve_seed(args.seed)         # used only if every rank passed seed=None
            mine = self._describe(args, output)
            mine["backend"] = which
        except (ValueError, TypeError) as e:
            error = e
        seed = self._agree(mine, drawn, error)    # raises every rank's error first
        args = args.with_seed(seed)
        if which == "fast":
            return self._decode_sharded_fast(args, progress, output, plan)
        return self._decode_sharded(args, progress, output)

    def _decode_sharded_fast(self, inputs: DecodeInputs, progress, output, plan=None):
        """The fast path (FastPiD, pidkern.engine) on this rank's band: the noise of either
        stream is drawn whole and cut to the band, and the attention routes are the ones
        with a point where the bands meet. Under an NCCL group on CUDA the band decode is
        one CUDA graph with the collectives inside (the plan's graphs; off under gloo)."""
        from . import _ext
        from .sampler import philox_key, renoise_count
        b = inputs.batch
        h, w = inputs.size
        p = self.config.patch
        steps, sampler = inputs.steps, inputs.sampler
        eng = self.engine()
        the_plan = self._band_plan(b, h, w, inputs.text.shape[1], plan)
        self.last_plan = the_plan
        shard = RowShard(self.group, h // p, w // p, self.attention)
        full = (b, 3, h, w)
        if inputs.noise == "philox":   # the output stage would number a band's draws from its own start
            key = philox_key(inputs.seed, self.device)
            draws = [_ext.philox_normal(key, torch.tensor(k, dtype=torch.int64, device=self.device), full)
                     for k in range(1 + renoise_count(steps, sampler))]
        else:
            draws = eng.draw_noise(full, steps, sampler, inputs.seed)
        draws = [shard.pixel_band(d, p).contiguous() for d in draws]
        if the_plan["graphs"]:
            key = eng.graph_key(inputs, plan)
            x, self.last_kv_bytes = self._band_graph(key, inputs, draws)
        else:
            x, self.last_kv_bytes = self._band_eager(the_plan, inputs, draws)
        if progress:
            progress(steps, steps)
        return shard.collect(x, p, output)

    def _band_plan(self, b, h, w, t_len, plan):
        """The engine's plan for the decode with the band decode's attention routes: the
        shard point needs the QK-norm/RoPE prep apart from the attention core."""
        the_plan = self.engine().plan(b, h, w, t_len, plan, collectives=self.collectives)
        for name, value in (("attention.patch", "qkv_rope+sdpa"), ("attention.pixel", "prep+sdpa")):
            if name not in the_plan.overrides:
                the_plan.set(name, value, "rule: sequence-parallel (QKV + QK-norm/RoPE, exchange, SDPA)")
        the_plan.set("sp_attention", self.attention, f"load: {self.world_size} ranks")
        return the_plan

    def _band_run(self, shard, plan, latent, sigma, text, draws, steps, sampler, h, w, racing):
        """One band decode (Engine.run with the shard): what runs eagerly, and what a CUDA
        graph captures, collectives included."""
        shard.bytes_received = 0
        return self.engine().run(latent, sigma, text, draws, steps, sampler, h, w, plan, racing=racing, shard=shard)

    def _band_eager(self, plan, inputs: DecodeInputs, draws):
        h, w = inputs.size
        shard = RowShard(self.group, h // self.config.patch, w // self.config.patch, self.attention)
        raced = bool(plan.pending())
        x = self._band_run(shard, plan, inputs.latent, inputs.sigma, inputs.text, draws, inputs.steps,
                           inputs.sampler, h, w, racing=True)
        if raced:   # this decode's routes were each rank's own fastest; from the next one on, rank 0's
            self._agree_plan(plan)
        return x, shard.bytes_received

    def _band_graph(self, key, inputs: DecodeInputs, draws):
        """The band decode as a captured CUDA graph (built once per shape, replayed)."""
        with self._lock:
            if self._graphs is None:
                self._graphs = GraphCache(self._build_band_graph)
        entry = self._graphs.get(key)
        with entry.lock:
            band = entry.runner
            for buf, d in zip(band.runner.bufs["noise"], draws):
                buf.copy_(d)
            return band.runner.replay(latent=inputs.latent, sigma=inputs.sigma, text=inputs.text), band.kv_bytes

    def _build_band_graph(self, key):
        """Capture one band decode with its collectives (NCCL) inside, through the engine's
        capture (Engine.capture: its static buffers, its warm-ups).

        The gather and all-to-all buffers are allocated inside the capture, from the
        graph's private pool, so their addresses are fixed for every replay. Every rank
        builds the same key at the same decode, so all capture the same sequence of
        collectives: two eager warm-ups (the first races the plan's open choices, and then
        every rank takes rank 0's choices, so the graphs agree), then the capture."""
        b, c, lh, lw, t_len, steps, sampler, _, over = key
        h, w = self.config.output_size(lh, lw)
        plan = self._band_plan(b, h, w, t_len, dict(over))
        p = self.config.patch
        shard = RowShard(self.group, h // p, w // p, self.attention)

        def run(bufs, first):
            x = self._band_run(shard, plan, bufs["latent"], bufs["sigma"], bufs["text"], bufs["noise"], steps,
                               sampler, h, w, racing=first)
            if first:
                self._agree_plan(plan)
            return x
        runner = self.engine().capture(key, run, noise_shape=(b, 3, shard.rows * p, w))
        return BandGraph(runner, shard.bytes_received)

    def _agree_plan(self, plan):
        """Every rank takes rank 0's raced choices: the ranks' graphs then run the same routes."""
        from .plan import CHOICES
        mine = {k: plan.choices[k] for k in CHOICES if k in plan.choices}
        everyone = [None] * self.world_size
        _dist().all_gather_object(everyone, mine, group=self.group)
        for k, (value, how) in everyone[0].items():
            if value != plan[k]:
                plan.set(k, value, f"{how} (rank 0's)")

    def _decode_sharded(self, inputs: DecodeInputs, progress, output):
        """The reference decode on this rank's band: the Decoder's own loop with the shard."""
        h, w = inputs.size
        p = self.config.patch
        shard = RowShard(self.group, h // p, w // p, self.attention)
        with self.using_net() as net:
            x = self.sample_reference(net, inputs, progress, shard=shard)
        self.last_kv_bytes = shard.bytes_received
        return shard.collect(x, p, output)


def setup(mode, group, device, attention=None):
    """Check `load`'s parallel arguments: the resolved group and this rank's device."""
    if attention is not None and attention not in SP_ATTENTION:
        raise ValueError(f"sp_attention={attention!r}: expected one of {SP_ATTENTION}")
    if attention is not None and mode is None:
        raise ValueError(f"sp_attention={attention!r}: needs parallel='sequence'")
    if mode not in MODES:
        hint = " (group= is given, so parallel='sequence' was probably meant)" if mode is None else ""
        raise ValueError(f"parallel={mode!r}: expected one of {MODES}, or None for one process{hint}")
    group = resolve_group(group)
    device = default_device(device, group)
    if device.type == "cuda":   # NCCL's object collectives (the entry check) use the current device
        torch.cuda.set_device(device)
    return group, device


def sequence_parallel(dec: Decoder, group, output: str = "rank0", attention: str = "gather") -> SequenceParallelDecoder:
    return SequenceParallelDecoder(dec, group, output, attention)


@contextmanager
def torchrun_group(device=None):
    """The default process group of a torchrun job, initialised here if needed (NCCL for a
    CUDA decode, gloo otherwise) and destroyed on the way out if this made it."""
    dist = _dist()
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"--sequence-parallel: run under torchrun (e.g. torchrun --nproc-per-node 2 -m pidkern "
                         f"decode ...); the environment lacks {', '.join(missing)}")
    cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()

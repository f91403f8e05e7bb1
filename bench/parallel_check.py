"""The sequence-parallel code path at N = 1 on one GPU: its overhead against the plain path.

    python -m bench.parallel_check [--sizes 1024,2048] [--out DIR]

The issue's bar: a one-rank sequence-parallel decode costs at most 3% more than the plain
fast decode. On one CUDA GPU this initialises a one-process NCCL group (environment
rendezvous on 127.0.0.1, a free port) unless one is initialised already, builds flux-2k
with random bfloat16 weights (the same seed for both decoders), and in the same run times
at each size:

- `plain`: `Decoder.decode(backend="fast")`, one CUDA graph per shape (its plan raced);
- `sequence`: `SequenceParallelDecoder.decode(backend="fast")` on the one-rank group: the
  band decode (row shard, `RowShard.attend` at every attention, band tables and noise)
  captured in its CUDA graph, collectives included (at N = 1 they are no-ops);
- `plain_same_routes`: the plain decode with the attention routes the band decode must
  take (the QKV GEMM with QK-norm/RoPE in its epilogue, then SDPA), so the overhead of
  the parallel machinery itself is told apart from that of the route it forces.

It returns (and prints, and writes as parallel_check_<card>_<date>.json) the medians, the
ratios sequence / plain and sequence / plain_same_routes, whether each is within 3%, the
plans, and the relative L2 distance of the two images (same weights, seed and noise).
On a machine without CUDA it refuses (RuntimeError; exit status 2 from the command line).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys

import torch

BAR = 1.03
SIZES = (1024, 2048)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_rank_group():
    """The default group, or a one-process NCCL group made here (returned with made=True)."""
    import torch.distributed as dist
    if dist.is_initialized():
        return dist.group.WORLD, False
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    return dist.group.WORLD, True


def check(sizes=SIZES, preset: str = "flux-2k", reps: int = 5, log=print) -> dict:
    """Time the plain and the one-rank sequence-parallel fast decode at each square size."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench.parallel_check times CUDA graphs with NCCL collectives on a GPU, and this "
                           "machine has no CUDA device; run it on a GPU machine")
    import torch.distributed as dist

    from pidkern import benchmark as pb
    from pidkern.config import get_preset
    from pidkern.parallel import sequence_parallel

    dev = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(dev)
    group, made = one_rank_group()
    if dist.get_world_size(group) != 1:
        raise RuntimeError(f"bench.parallel_check measures N = 1, and the initialised group has "
                           f"{dist.get_world_size(group)} ranks")
    try:
        cfg = get_preset(preset)
        plain = pb.random_decoder(cfg, dev, torch.bfloat16)
        # its own copy of the same random weights: each Decoder parks what its engine never reads
        seq = sequence_parallel(pb.random_decoder(cfg, dev, torch.bfloat16), group)
        rows = []
        for side in sizes:
            g = torch.Generator().manual_seed(1)
            latent = torch.randn(1, cfg.latent_channels, side // cfg.upscale, side // cfg.upscale, generator=g).to(dev)
            text = torch.randn(1, cfg.max_text, cfg.text_dim, generator=g).to(dev)
            sigma = torch.tensor([0.1], device=dev)
            same_routes = {"attention.patch": "qkv_rope+sdpa", "attention.pixel": "prep+sdpa"}
            runs = {
                "plain": lambda: plain.decode(latent, sigma, text=text, seed=0, backend="fast"),
                "plain_same_routes": lambda: plain.decode(latent, sigma, text=text, seed=0, backend="fast",
                                                          plan=same_routes),
                "sequence": lambda: seq.decode(latent, sigma, text=text, seed=0, backend="fast"),
            }
            ms = {name: pb.measure(fn, dev, reps=reps, warmup=2, max_s=20)["median_ms"] for name, fn in runs.items()}
            a, b = runs["plain"]().float(), runs["sequence"]().float()
            row = dict(preset=preset, side=side, ms=ms,
                       overhead=ms["sequence"] / ms["plain"],
                       overhead_same_routes=ms["sequence"] / ms["plain_same_routes"],
                       rel_l2=((a - b).norm() / a.norm()).item(),
                       plan_plain=plain.plan(latent.shape, text.shape[1]).as_dict(),
                       plan_sequence=seq.last_plan.as_dict())
            row["within_3_percent"] = row["overhead"] <= BAR
            row["within_3_percent_same_routes"] = row["overhead_same_routes"] <= BAR
            if not seq.last_plan["graphs"]:
                raise RuntimeError(f"the sequence-parallel decode ran without CUDA graphs:\n{seq.last_plan}")
            log(f"{preset} {side}²: plain {ms['plain']:.1f} ms, same routes {ms['plain_same_routes']:.1f} ms, "
                f"sequence N=1 {ms['sequence']:.1f} ms: x{row['overhead']:.3f} "
                f"(x{row['overhead_same_routes']:.3f} against the same routes), images rel L2 {row['rel_l2']:.1e}")
            rows.append(row)
        return dict(bar=BAR, rows=rows, passed=all(r["within_3_percent"] for r in rows))
    finally:
        if made:
            dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.parallel_check", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="square sides, comma-separated")
    ap.add_argument("--preset", default="flux-2k")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="directory for the JSON result (default: bench/results)")
    args = ap.parse_args(argv)
    try:
        result = check(tuple(int(s) for s in args.sizes.split(",")), args.preset, args.reps)
    except RuntimeError as e:
        print(f"parallel_check: {e}", file=sys.stderr)
        return 2
    from pidkern.timing import environment, write_result
    result["env"] = environment()
    print(json.dumps({k: v for k, v in result.items() if k != "env"}, indent=1, default=str))
    print(f"written {write_result(result, 'parallel_check', args.out)}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Cost model of sequence-parallel decoding (pidkern.parallel) for machines this one is not.

    python -m bench.parallel_cost              # the README table (flux-2k, 4 steps, bf16)
    python -m bench.parallel_cost --markdown
    python -m bench.parallel_cost --windows    # windowed decodes (pidkern.window) over N ranks

Inputs, nothing else:
- measured single-H200 decode times of the fast path (bench/results/engine_check_nvidia-h200_
  2026-11-26.json: 2048² and 4096²; 8192² is not measured and is extrapolated at 4096²'s
  achieved TFLOP/s, which attention dominates at both sizes);
- pidkern.flops: the per-rank FLOPs of a band of rows (its queries attend to the whole
  image; the text stream and the latent adapter are computed whole on every rank);
- link bandwidths: NVLink-class 450 GB/s per direction effective (H200 NVLink 4), PCIe-class
  25 GB/s (PCIe 4 x16 effective), and a per-collective latency.

Per step, a rank's compute time is the single-GPU step time times its share of the FLOPs
(so a band is assumed as efficient as the whole image: optimistic for small bands). Its
traffic is what pidkern.parallel moves, in bf16, under either sp_attention scheme:
- "gather": one all-gather of the image keys and values per attention layer (14 patch +
  2 pixel), each rank receiving the (N-1) padded bands it does not hold;
- "ulysses": two all-to-alls per layer, q, k, v of its head group for the tokens it lacks
  in, then every other head group's output for its own tokens (and the text's) back:
  about 4 (N-1)/N of its band's q/k/v-sized tensors (`ulysses_bytes`).
The collectives are not overlapped with compute in pidkern.parallel, so a step costs
compute + communication (bytes / link bandwidth + a latency per collective and ring step).
Ulysses's compute is taken as the all-gather's: the text queries it splits by heads are
0.5% of the attention work at 2048², and flux-2k's 24 and 16 heads divide N = 1, 2, 4, 8.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pidkern.config import PiDConfig, get_preset
from pidkern.flops import _step_parts, decode_flops
from pidkern.parallel import split_rows

RESULTS = Path(__file__).parent / "results" / "engine_check_nvidia-h200_2026-11-26.json"
LINKS = {  # name: (bytes/s per direction, seconds per collective step)
    "NVLink": (450e9, 10e-6),
    "PCIe": (25e9, 20e-6),
}
SIZES = (2048, 4096, 8192)
WORLDS = (1, 2, 4, 8)
STEPS = 4
BYTES = 2  # bf16 activations


def measured_ms(path: Path = RESULTS) -> dict[int, float]:
    """{side: median decode ms} of square batch-1 decodes measured on one H200."""
    rows = json.loads(path.read_text())["memory"]
    return {r["height"]: r["median_ms"] for r in rows if r["batch"] == 1 and r["height"] == r["width"]}


def single_gpu_ms(cfg: PiDConfig, side: int, measured: dict[int, float]) -> tuple[float, bool]:
    """(decode ms on one GPU, measured?): measured, or at the largest measured size's TFLOP/s."""
    if side in measured:
        return measured[side], True
    ref = max(measured)
    rate = decode_flops(cfg, 1, ref, ref, STEPS)["total"] / measured[ref]
    return decode_flops(cfg, 1, side, side, STEPS)["total"] / rate, False


def kv_gather_bytes(cfg: PiDConfig, side: int, world: int, width: int | None = None, batch: int = 1,
                    dtype_bytes: int = BYTES) -> int:
    """Bytes one rank receives per step: every attention layer's image K and V it lacks
    (its all-gather is padded to the longest band, as pidkern.parallel pads it). `side`
    is the height (and the width unless `width` is given)."""
    hs, ws = side // cfg.patch, (width or side) // cfg.patch
    longest = max(n for _, n in split_rows(hs, world))
    tokens_received = batch * (world - 1) * longest * ws
    per_token = 2 * (cfg.patch_blocks * cfg.hidden + cfg.pixel_blocks * cfg.pixel_attn_dim)  # K and V
    return tokens_received * per_token * dtype_bytes


def ulysses_bytes(cfg: PiDConfig, side: int, world: int, width: int | None = None, batch: int = 1,
                  dtype_bytes: int = BYTES, text_len: int | None = None, rank: int | None = None) -> int:
    """Bytes one rank receives per step under sp_attention="ulysses" (pidkern.parallel's
    two all-to-alls per attention layer), for `rank` (default: the one that receives most).

    Heads are padded to a multiple of N, g = ceil(heads / N) per rank. Per layer a rank
    with n of the L image tokens receives q, k, v of its head group for the L - n tokens
    it lacks, then the output of every other head group for its n tokens and the T text
    tokens: B g hd (3 (L - n) + (N - 1)(T + n)). Patch layers carry the text stream
    (T = text_len, default the preset's 300), pixel layers none."""
    if world == 1:
        return 0
    hs, ws = side // cfg.patch, (width or side) // cfg.patch
    t = cfg.max_text if text_len is None else text_len
    L = hs * ws

    def received(n: int) -> int:
        total = 0
        for layers, heads, hd, text in ((cfg.patch_blocks, cfg.heads, cfg.head_dim, t),
                                        (cfg.pixel_blocks, cfg.pixel_heads, cfg.pixel_head_dim, 0)):
            g = -(-heads // world)
            total += layers * batch * g * hd * (3 * (L - n) + (world - 1) * (text + n))
        return total * dtype_bytes

    bands = [rows * ws for _, rows in split_rows(hs, world)]
    return received(bands[rank]) if rank is not None else max(received(n) for n in set(bands))


def rank_model(cfg: PiDConfig, side: int, world: int, measured: dict[int, float]) -> dict:
    """Per-step and per-decode time of the busiest rank (the longest band), per link and
    per sp_attention scheme: out[link] for the K/V all-gather, out[link + " Ulysses"] for
    the head all-to-all."""
    decode_ms, was_measured = single_gpu_ms(cfg, side, measured)
    total = decode_flops(cfg, 1, side, side, STEPS)
    step_ms = decode_ms * total["per_step"] / total["total"]
    once_ms = decode_ms * total["once"] / total["total"]          # the adapter: replicated
    longest = max(n for _, n in split_rows(side // cfg.patch, world))
    share = sum(_step_parts(cfg, side, side, cfg.max_text, longest).values()) / total["per_step"]
    compute_ms = step_ms * share
    gathered, exchanged = kv_gather_bytes(cfg, side, world), ulysses_bytes(cfg, side, world)
    image_bytes = 3 * side * side * 4 * (world - 1) / world     # float32 image to rank 0, once
    out = dict(side=side, world=world, measured=was_measured, one_gpu_step_ms=step_ms, compute_ms=compute_ms,
               kv_bytes=gathered, ulysses_bytes=exchanged)
    layers = cfg.patch_blocks + cfg.pixel_blocks
    # one all-gather per layer, or two all-to-alls; each a ring of N - 1 steps of latency
    for scheme, moved, collectives in (("", gathered, layers), (" Ulysses", exchanged, 2 * layers)):
        for name, (bw, latency) in LINKS.items():
            comm_ms = 0.0 if world == 1 else 1e3 * (moved / bw + collectives * (world - 1) * latency)
            step = compute_ms + comm_ms
            decode = once_ms + STEPS * step + (1e3 * image_bytes / bw if world > 1 else 0.0)
            out[name + scheme] = dict(comm_ms=comm_ms, step_ms=step, decode_ms=decode, speedup=decode_ms / decode)
    return out


WINDOW_SIZES = (8192, 16384)
WINDOW = 2048


def window_rank_model(cfg: PiDConfig, side: int, world: int, measured: dict[int, float], window: int = WINDOW) -> dict:
    """A windowed decode (pidkern.window) over N ranks: the busiest rank evaluates
    ceil(windows / N) windows per step (each at one `window`² decode's step time, its
    adapter once per decode), and the ranks' weighted velocities meet in one all_reduce
    of the float32 canvas per step (a ring: 2 (N-1)/N of the canvas in and out per rank,
    2 (N-1) latency steps). The final image needs no gather: every rank holds the canvas."""
    from pidkern.window import make_grid, rank_windows
    grid = make_grid(cfg, (side, side), window)
    n = len(grid)
    busiest = max(len(rank_windows(n, r, world)) for r in range(world))
    one_ms, was_measured = single_gpu_ms(cfg, window, measured)
    total = decode_flops(cfg, 1, window, window, STEPS)
    step_ms = one_ms * total["per_step"] / total["total"]
    once_ms = one_ms * total["once"] / total["total"]
    canvas = 3 * side * side * 4
    moved = 2 * (world - 1) / world * canvas
    out = dict(side=side, world=world, windows=n, busiest=busiest, window=window, measured=was_measured,
               compute_ms=busiest * step_ms, allreduce_bytes=moved, ideal_ms=n * one_ms)
    for name, (bw, latency) in LINKS.items():
        comm_ms = 0.0 if world == 1 else 1e3 * (moved / bw + 2 * (world - 1) * latency)
        step = busiest * step_ms + comm_ms
        decode = busiest * once_ms + STEPS * step
        out[name] = dict(comm_ms=comm_ms, step_ms=step, decode_ms=decode, speedup=n * one_ms / decode)
    return out


def window_table(preset: str = "flux-2k", window: int = WINDOW) -> list[dict]:
    cfg, measured = get_preset(preset), measured_ms()
    return [window_rank_model(cfg, side, n, measured, window) for side in WINDOW_SIZES for n in WORLDS]


def render_windows(rows: list[dict]) -> str:
    head = ("| size | windows | N | windows/rank | compute ms/step/rank | all_reduce MB/step/rank | NVLink ms/step "
            "(speed-up vs windows x one window decode on one GPU) | PCIe ms/step (speed-up) |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        cells = [f"{r['side']}²", f"{r['windows']} x {r['window']}²", str(r["world"]), str(r["busiest"]),
                 f"{r['compute_ms']:.0f}", f"{r['allreduce_bytes'] / 1e6:,.0f}"]
        cells += [f"{r[k]['step_ms']:.0f} ({r[k]['speedup']:.2f}x)" for k in LINKS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(preset: str = "flux-2k") -> list[dict]:
    cfg, measured = get_preset(preset), measured_ms()
    return [rank_model(cfg, side, n, measured) for side in SIZES for n in WORLDS]


def render(rows: list[dict]) -> str:
    head = ("| size | N | one-GPU ms/step | compute ms/step/rank | all-gather MB/step/rank | Ulysses MB/step/rank "
            "| NVLink ms/step, all-gather (decode speed-up) | NVLink, Ulysses | PCIe, all-gather | PCIe, Ulysses |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        size = f"{r['side']}²" + ("" if r["measured"] else " (extrapolated)")
        cells = [size, str(r["world"]), f"{r['one_gpu_step_ms']:.0f}", f"{r['compute_ms']:.0f}",
                 f"{r['kv_bytes'] / 1e6:,.0f}", f"{r['ulysses_bytes'] / 1e6:,.0f}"]
        cells += [f"{r[k + s]['step_ms']:.0f} ({r[k + s]['speedup']:.2f}x)" for k in LINKS for s in ("", " Ulysses")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.parallel_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="flux-2k")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--windows", action="store_true",
                        help="the windowed decode's rows (pidkern.window: 2048² windows spread over the ranks)")
    args = parser.parse_args(argv)
    rows = window_table(args.preset) if args.windows else table(args.preset)
    print(json.dumps(rows, indent=1) if args.json else (render_windows if args.windows else render)(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a card will do before it is bought: published facts and a calibrated prediction.

`CARDS` holds each card's compute capability, SMs, shared memory per block, memory,
bandwidth and peak dense tensor rates (bf16 with float32 accumulation, fp8 e4m3 with
float32 accumulation, int8), each with its published source. `predict(card, size,
precision)` turns the FLOP count of every planned kernel (pidkern.flops) and a byte count
of the memory-bound passes into a decode time on that card, using the efficiencies
measured on an NVIDIA H200 on 2026-11-26 (bench/results/): each kind of work is assumed
to reach the same fraction of the card's peak as it did on the H200. Two constants (the
memory-bound passes' effective bandwidth share and a fixed per-decode cost) are fitted to
the three measured H200 decodes; tests/test_cards.py checks the model reproduces them
within 10%.

Every number this module returns for a card other than the H200 is a PREDICTION: no such
card has run pidkern. docs/cards.md says what the model leaves out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Card:
    key: str
    name: str
    capability: tuple[int, int]
    sms: int
    smem_per_block: int        # bytes a block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin)
    memory_gb: float           # nominal, 10^9 bytes
    bandwidth_gbs: float       # GB/s, nominal
    bf16_tflops: float         # dense, float32 accumulation
    fp8_tflops: float | None   # dense e4m3 with float32 accumulation; None: no fp8 tensor cores
    int8_tops: float | None    # dense; None: no int8 tensor cores
    source: str

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 1e9)

    def precisions(self) -> tuple[str, ...]:
        """The precisions whose tensor cores this card has: bf16 always (sm_80 on), fp8
        e4m3 from sm_89, int8 from sm_75."""
        out = ["bf16"]
        if self.fp8_tflops is not None and self.capability >= (8, 9):
            out.append("fp8")
        if self.int8_tops is not None and self.capability >= (7, 5):
            out.append("int8")
        return tuple(out)

    def peak_tflops(self, precision: str) -> float:
        rate = {"bf16": self.bf16_tflops, "fp8": self.fp8_tflops, "int8": self.int8_tops}[precision]
        if rate is None:
            raise ValueError(f"{self.name} has no {precision} tensor cores; it runs {self.precisions()}")
        return rate


KB = 1024
# Shared memory per block by capability: the CUDA C++ Programming Guide's table of
# technical specifications per compute capability (8.0: 163 KB, 8.6/8.9/12.0: 99 KB,
# 9.0/10.0: 227 KB). GeForce rates with float32 accumulation are half the float16-
# accumulation ones NVIDIA headlines; the whitepapers' appendix tables list both.
CARDS: dict[str, Card] = {c.key: c for c in (
    # NVIDIA RTX Blackwell GPU Architecture whitepaper (2025), appendix table "GeForce RTX
    # 5090": 170 SMs, 32 GB GDDR7 at 1792 GB/s; peak FP16/BF16 tensor with FP32 accumulate
    # 209.5 TFLOPS dense (419 with FP16 accumulate), FP8 with FP32 accumulate 419, INT8 838
    # TOPS dense (838.4 / 1676.8 / 3352 are the sparse FP16 / FP8 / FP4 headline figures)
    Card("rtx5090", "GeForce RTX 5090", (12, 0), 170, 99 * KB, 32, 1792, 209.5, 419.0, 838.0,
         "NVIDIA RTX Blackwell GPU Architecture whitepaper, GeForce RTX 5090 table"),
    # NVIDIA Ada Lovelace GPU Architecture whitepaper (v2.1), appendix table "GeForce RTX
    # 4090": 128 SMs, 24 GB GDDR6X at 1008 GB/s; FP16/BF16 tensor with FP32 accumulate 165.2
    # TFLOPS dense, FP8 with FP32 accumulate 330.3, INT8 660.6 TOPS dense
    Card("rtx4090", "GeForce RTX 4090", (8, 9), 128, 99 * KB, 24, 1008, 165.2, 330.3, 660.6,
         "NVIDIA Ada Lovelace GPU Architecture whitepaper, GeForce RTX 4090 table"),
    # NVIDIA Ampere GA102 GPU Architecture whitepaper, appendix table "GeForce RTX 3090":
    # 82 SMs, 24 GB GDDR6X at 936 GB/s; FP16/BF16 tensor with FP32 accumulate 71 TFLOPS
    # dense, INT8 284 TOPS dense; no FP8
    Card("rtx3090", "GeForce RTX 3090", (8, 6), 82, 99 * KB, 24, 936, 71.0, None, 284.0,
         "NVIDIA Ampere GA102 GPU Architecture whitepaper, GeForce RTX 3090 table"),
    # NVIDIA Ada Lovelace GPU Architecture whitepaper ratios applied to the GeForce RTX 4060
    # Ti 8 GB product page (34 SMs, 8 GB GDDR6 at 288 GB/s, 353 "AI TOPS" = FP8 sparse with
    # FP16 accumulate): FP8 with FP32 accumulate 88.3 dense, BF16 44.1, INT8 176.6 dense.
    # The 8 GB tier's stand-in: derived, not a published dense figure.
    Card("rtx4060ti-8gb", "GeForce RTX 4060 Ti 8 GB", (8, 9), 34, 99 * KB, 8, 288, 44.1, 88.3, 176.6,
         "NVIDIA GeForce RTX 4060 Ti product page (353 AI TOPS), Ada whitepaper ratios"),
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4 80 GB): 108 SMs (A100 whitepaper), 2039
    # GB/s HBM2e; BF16 tensor 312 TFLOPS dense, INT8 624 TOPS dense; no FP8
    Card("a100", "A100 SXM4 80 GB", (8, 0), 108, 163 * KB, 80, 2039, 312.0, None, 624.0,
         "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB)"),
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): 132 SMs, 80 GB HBM3 at 3.35 TB/s; BF16
    # 1979 TFLOPS and FP8 3958 / INT8 3958 TOPS with sparsity, half that dense
    Card("h100", "H100 SXM5 80 GB", (9, 0), 132, 227 * KB, 80, 3350, 989.4, 1978.9, 1978.9,
         "NVIDIA H100 Tensor Core GPU datasheet (SXM5)"),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): 141 GB HBM3e at 4.8 TB/s, the H100's
    # tensor rates; 132 SMs read on the measured card (bench/results/*nvidia-h200*)
    Card("h200", "H200 SXM 141 GB", (9, 0), 132, 227 * KB, 141, 4800, 989.4, 1978.9, 1978.9,
         "NVIDIA H200 Tensor Core GPU datasheet (SXM)"),
    # NVIDIA DGX B200 datasheet, per GPU (the system's figures / 8): 180 GB HBM3e at 8 TB/s;
    # FP8 72 PFLOPS and FP16/BF16 36 PFLOPS with sparsity per system -> 4.5 / 2.25 PFLOPS
    # dense per GPU; INT8 as FP8; 148 SMs (NVIDIA Blackwell architecture technical brief)
    Card("b200", "B200 180 GB", (10, 0), 148, 227 * KB, 180, 8000, 2250.0, 4500.0, 4500.0,
         "NVIDIA DGX B200 datasheet (per GPU: system / 8)"),
)}
ALIASES = {"5090": "rtx5090", "4090": "rtx4090", "3090": "rtx3090", "8gb": "rtx4060ti-8gb", "4060ti": "rtx4060ti-8gb",
           "a100-80gb": "a100", "h100-sxm": "h100", "h200-sxm": "h200"}


def get_card(name: str) -> Card:
    """A card by key ("rtx5090"), short name ("5090") or its name ("GeForce RTX 5090")."""
    k = str(name).strip().lower().replace(" ", "").replace("_", "").replace("geforce", "")
    k = ALIASES.get(k, k)
    for card in CARDS.values():
        if k in (card.key, card.name.lower().replace(" ", "")):
            return card
    raise ValueError(f"card {name!r}: expected one of {', '.join(CARDS)} (or {', '.join(ALIASES)})")


# --------------------------------------------------------------------------- calibration
#
# Measured on the H200 (bench/results/, 2026-11-26; torch 2.11 + CUDA 13.0, Triton 3.6):
# the fast path's warm 4-step flux-2k decode, batch 1 (engine_check_nvidia-h200_2026-11-26.json,
# "memory" rows, median_ms) and its resident memory (resident_gib).
H200_DECODE_MS = {1024: 63.752, 2048: 428.003, 4096: 4715.416}
H200_RESIDENT_GIB = {1024: 3.387, 2048: 4.355, 4096: 8.457}
# Efficiencies = achieved / the H200's peak (989.4 dense bf16 TFLOPS):
# - GEMMs: a bf16 Linear 16384x1536 -> 4608 ran at 727 TFLOP/s (docs/perf.md anchors),
#   the fp8 GEMM 8192³ at 1448 TFLOP/s of 1978.9;
# - attention, the route the plan picked at 2048² (prep+sdpa, kernels_nvidia-h200_2026-11-26.json):
#   patch blocks (24 heads x 64, 16 684 tokens) 380.2 TFLOP/s, pixel blocks (16 x 72) 352.6;
# - int8 GEMMs were never measured: they are given fp8's share of their own peak.
EFF_GEMM = {"bf16": 727.0 / 989.4, "fp8": 1448.0 / 1978.9, "int8": 1448.0 / 1978.9}
EFF_PATCH_ATTENTION = 380.2 / 989.4
EFF_PIXEL_ATTENTION = 352.6 / 989.4
# Fitted to H200_DECODE_MS (least squares on the relative error; tests/test_cards.py
# refits and checks): the share of the nominal bandwidth the memory-bound passes reach
# (the fit gives 0.526; the fused rms_modulate kernel measured 2.55 TB/s of 4.8, 0.53, in
# kernels_nvidia-h200_2026-11-26.json), and a fixed cost per decode (CUDA-graph replay,
# the output stage, the small kernels between GEMMs that neither count models).
EFF_MEMORY = 0.526
FIXED_MS = 10.9
# The memory estimate undershot the H200's resident memory by 7% (1024²) to 22% (4096²):
# a card "fits" a decode when estimate / (1 - 0.22) does.
ESTIMATE_UNDERSHOOT = 0.22
# Driver, CUDA context and display: not measured here; a desktop card gives up more
CONTEXT_RESERVE = int(0.8 * GIB)


def memory_bound_bytes(cfg, height: int, width: int, steps: int = 4, text_tokens: int | None = None) -> float:
    """Bytes the fused memory-bound passes move in a decode (each tensor read or written
    once per pass, at the fast path's dtypes: float32 residual, bf16 otherwise).

    Per patch block and token (D channels, Hm MLP width): two add+RMSNorm+modulate passes
    (read x, y; write x, h: 12 D), the QK-norm/RoPE prep (read and write q, k, v: 12 D),
    SiLU*up (read 2 Hm, write Hm, bf16: 6 Hm). Per pixel block and pixel (16 channels):
    the pre-attention RMSNorm+modulate (read p and its 2 modulation chunks, write u: 128 B),
    the modulation GEMMs' outputs written (192 B) and the expansion (32 B), the fused
    post-attention pass (read p, e, 4 chunks; write p: 224 B)."""
    t = cfg.max_text if text_tokens is None else text_tokens
    L = (height // cfg.patch) * (width // cfg.patch)
    patch = cfg.patch_blocks * (L + t) * (24 * cfg.hidden + 6 * cfg.mlp_hidden)
    pixel = cfg.pixel_blocks * L * cfg.pixels_per_patch * (128 + 192 + 32 + 224)
    return float(steps * (patch + pixel))


@dataclass
class Prediction:
    card: str
    size: int
    precision: str
    ms: float
    parts_ms: dict
    resident_bytes: int
    fits: bool
    answer: str                          # memory.fitting_settings' rung, or what is left when none fits
    overrides: dict | None               # the plan overrides of that rung (None: no rung fits)
    best_ms: float = math.nan            # attention at the GEMMs' share of peak instead of the H200's SDPA share
    measured_ms: float | None = None     # the H200 bf16 rows only

    def as_dict(self) -> dict:
        return {"card": self.card, "size": self.size, "precision": self.precision, "ms": round(self.ms, 1),
                "best_ms": round(self.best_ms, 1),
                "parts_ms": {k: round(v, 2) for k, v in self.parts_ms.items()},
                "resident_gib": round(self.resident_bytes / GIB, 2), "fits": self.fits,
                "answer": self.answer, "overrides": self.overrides,
                "measured_ms": self.measured_ms, "kind": "measured" if self.measured_ms else "prediction"}


# The FLOP parts of pidkern.flops each kind of work covers. fp8/int8 models run the patch
# blocks' GEMMs (qkv, proj, w13, w2: fast.FP8_LAYERS) in 8 bits; the rest stays bf16, and
# attention is priced as bf16 (the 8-bit attention routes were never timed on a GPU).
_8BIT_PARTS = ("patch_gemm",)
_GEMM_PARTS = ("patch_gemm", "pixel_gemm", "adapter_gates", "embed_and_head", "adapter_convs", "adapter_heads")


def _memory_precision(precision: str) -> str:
    # int8 weights take fp8's bytes (one per weight, a float32 scale per output row)
    return "native" if precision == "bf16" else "fp8"


def budget_bytes(card: Card) -> int:
    """What a decode may take on `card`: its memory less the context reserve."""
    return card.memory_bytes - CONTEXT_RESERVE


def predict(card, size: int, precision: str = "bf16", preset: str = "flux-2k") -> Prediction:
    """The predicted warm 4-step decode of one size x size image on `card` (a Card or a
    name), with the time per kind of work and the resident memory (memory.estimate_memory)."""
    from .config import get_preset
    from .flops import decode_flops
    card = card if isinstance(card, Card) else get_card(card)
    if precision not in ("bf16", "fp8", "int8"):
        raise ValueError(f"precision={precision!r}: expected 'bf16', 'fp8' or 'int8'")
    if precision not in card.precisions():
        raise ValueError(f"precision={precision!r}: {card.name} (sm_{card.capability[0]}{card.capability[1]}) "
                         f"has no {precision} tensor cores; it runs {', '.join(card.precisions())}")
    cfg = get_preset(preset)
    parts = decode_flops(cfg, 1, size, size)["breakdown"]
    bf16 = card.bf16_tflops * 1e12
    ms = {}
    gemm_8 = sum(parts[k] for k in _8BIT_PARTS) if precision != "bf16" else 0.0
    gemm_16 = sum(parts[k] for k in _GEMM_PARTS) - gemm_8
    ms["gemm"] = 1e3 * gemm_16 / (bf16 * EFF_GEMM["bf16"])
    if gemm_8:
        ms["gemm_8bit"] = 1e3 * gemm_8 / (card.peak_tflops(precision) * 1e12 * EFF_GEMM[precision])
    ms["attention"] = 1e3 * (parts["patch_attention"] / (bf16 * EFF_PATCH_ATTENTION)
                             + parts["pixel_attention"] / (bf16 * EFF_PIXEL_ATTENTION))
    # the best case: attention as efficient as the GEMMs (FlashAttention-2 style kernels on
    # the mma.sync cards are not known to reach a lower share of their peak than cuDNN on Hopper)
    attention_best = 1e3 * (parts["patch_attention"] + parts["pixel_attention"]) / (bf16 * EFF_GEMM["bf16"])
    ms["memory_bound"] = 1e3 * memory_bound_bytes(cfg, size, size) / (card.bandwidth_gbs * 1e9 * EFF_MEMORY)
    ms["fixed"] = FIXED_MS
    from .memory import estimate_memory, fitting_settings
    mp = _memory_precision(precision)
    resident = estimate_memory(cfg, 1, size, size, precision=mp)
    fit = fitting_settings(cfg, 1, size, size, budget_bytes(card), precision=mp, margin=1 / (1 - ESTIMATE_UNDERSHOOT))
    fits = fit is not None and not fit[1]
    answer = fit[0] if fit else "no plan setting fits: windowed decoding (or a smaller batch)"
    measured = H200_DECODE_MS.get(size) if card.key == "h200" and precision == "bf16" and preset == "flux-2k" else None
    total = sum(ms.values())
    return Prediction(card.key, size, precision, total, ms, resident, fits, answer, fit[1] if fit else None,
                      total - ms["attention"] + attention_best, measured)


def predict_card(card, sizes=(1024, 2048, 4096), preset: str = "flux-2k") -> list[Prediction]:
    card = card if isinstance(card, Card) else get_card(card)
    return [predict(card, s, p, preset) for s in sizes for p in card.precisions()]


def predict_lines(card, preset: str = "flux-2k") -> list[str]:
    """`pidkern info --predict CARD`: the table, marked as a prediction."""
    card = card if isinstance(card, Card) else get_card(card)
    cap = f"sm_{card.capability[0]}{card.capability[1]}"
    lines = [f"PREDICTION (no {card.name} has run pidkern; model: pidkern/cards.py, calibrated on the H200 "
             f"measured 2026-11-26)",
             f"{card.name}: {cap}, {card.sms} SMs, {card.memory_gb:g} GB at {card.bandwidth_gbs:g} GB/s, "
             f"{card.smem_per_block // KB} KB shared memory per block; dense tensor peaks: bf16 {card.bf16_tflops:g} "
             f"TFLOP/s" + (f", fp8 {card.fp8_tflops:g}" if card.fp8_tflops else ", no fp8")
             + (f", int8 {card.int8_tops:g} TOPS" if card.int8_tops else ", no int8"),
             f"source: {card.source}",
             f"{preset}, batch 1, 4 steps, warm (CUDA graphs):",
             f"  {'size':>6} {'precision':<9} {'time':>10} {'best case':>10} {'resident':>10}  fits"]
    for p in predict_card(card, preset=preset):
        note = f"  (measured {p.measured_ms:.0f} ms)" if p.measured_ms else ""
        fit = "yes" if p.fits else f"no; the plan's answer: {p.answer}" + (f" {p.overrides}" if p.overrides else "")
        lines.append(f"  {p.size:>5}² {p.precision:<9} {p.ms:>7.0f} ms {p.best_ms:>7.0f} ms "
                     f"{p.resident_bytes / GIB:>6.2f} GiB  {fit}{note}")
    lines += ["time: every kind of work at the share of this card's peak it reached on the H200; best case: "
              "attention at the GEMMs' share instead.",
              "resident: memory.estimate_memory (it undershot the H200's by 7-22%; 'fits' allows for that).",
              "int8: the precision of issue 21, priced at the card's int8 rate with fp8's measured efficiency; "
              "attention is priced in bf16 for every precision."]
    return lines

"""Which GEMM and attention routes a CUDA compute capability can run, without the card.

Each rule says whether a route exists on a capability and how that is known: the
hardware (which tensor-core formats an architecture has), the libraries' own sources and
issue trackers (which kernels a library ships for which architecture). `True`: the route
runs there; `False`: it cannot; `None`: unverified, the plan races it and a failing
candidate is dropped with its error recorded (plan.race). A card at hand overrides every
rule: the race runs what imports and launches.

These rules decide what `pidkern info --plan ... --device-capability 12.0` prints for a
card that is not present (docs/cards.md, "Capability rules").
"""
from __future__ import annotations

# The hardware, per NVIDIA's PTX ISA (mma / wgmma / tcgen05 operand types per target):
BF16_FROM = (8, 0)           # bf16 mma.sync: Ampere on (the fast path's dtype on CUDA)
INT8_FROM = (7, 5)           # int8 mma.sync: Turing on
E4M3_FROM = (8, 9)           # e4m3/e5m2 mma: Ada (sm_89), Hopper, Blackwell
BLOCK_SCALED = ((10, 0), (12, 0))   # mxfp8/nvfp4 block-scaled MMA: tcgen05 (sm_100) and sm_120's mma.sync.kind::mxf8f6f4


def _major_in(cap, majors) -> bool:
    return cap[0] in majors


def _rules() -> dict:
    """route -> (test(capability) -> True/False/None, how it is known)."""
    return {
        # ---- GEMM routes ----
        "native": (lambda c: c >= BF16_FROM, "bf16 tensor cores from sm_80"),
        "scaled_mm": (
            lambda c: False if c < E4M3_FROM else (None if c[0] == 12 else True),
            "torch._scaled_mm with row-wise scales: it refuses capabilities below 8.9 ('only supported on CUDA "
            "devices with compute capability >= 9.0 or 8.9'); PyTorch's CUTLASS row-wise kernel "
            "(aten/src/ATen/native/cuda/RowwiseScaledMM.cu) has sm_89, sm_9x and sm_10x paths; on sm_12x "
            "torch 2.10+cu130 sent row-wise scales to cuBLASLt, which refuses them (pytorch/pytorch#192707, "
            "#161236), and the sm_12x CUTLASS path is newer: unverified, raced where a card is present"),
        "torchao": (lambda c: False if c < E4M3_FROM else (None if c[0] == 12 else True),
                    "torchao float8 inference runs on torch._scaled_mm: its rule"),
        "int8": (lambda c: c >= INT8_FROM, "int8 tensor cores (mma.sync s8) from sm_75"),
        "block_scaled_fp8": (lambda c: any(c[0] == b[0] for b in BLOCK_SCALED),
                             "block-scaled fp8 (mxfp8) MMA exists on sm_100 (tcgen05) and sm_120 only"),
        # ---- attention routes ----
        "prep+sdpa": (lambda c: c >= BF16_FROM, "torch SDPA (cuDNN, flash or memory-efficient, whichever the card "
                                                "takes): every CUDA card with bf16"),
        "qkv_rope+sdpa": (lambda c: c >= BF16_FROM, "Triton GEMM + torch SDPA"),
        "triton": (lambda c: c >= BF16_FROM, "Triton kernels; configs per architecture family (kernels._common)"),
        "prep+triton": (lambda c: c >= BF16_FROM, "Triton kernels"),
        "torch": (lambda c: True, "PyTorch math"),
        "int8qk-triton": (lambda c: c >= BF16_FROM, "int8 QK^T (sm_75 on), bf16 PV (sm_80 on)"),
        "prep+int8qk-triton": (lambda c: c >= BF16_FROM, "int8 QK^T (sm_75 on), bf16 PV (sm_80 on)"),
        **{r: (lambda c: c >= E4M3_FROM, "e4m3 tensor cores from sm_89")
           for r in ("fp8-triton", "prep+fp8-triton", "fp8qk-triton", "prep+fp8qk-triton", "int8-triton",
                     "prep+int8-triton")},
        "prep+flash": (lambda c: True if (8, 0) <= c < (10, 0) else None,
                       "flash-attn 2 builds for sm_80 to sm_90; Blackwell only in recent releases: unverified"),
        "prep+flash3-fp8": (lambda c: c[0] == 9, "FlashAttention-3 is written for Hopper (wgmma, TMA): sm_90 only"),
        "prep+sage": (lambda c: c >= BF16_FROM, "SageAttention 1 is Triton (int8 QK^T, fp16 PV): sm_80 on"),
        "prep+cudnn-fp8": (lambda c: True if c[0] in (9, 10) else (False if c < E4M3_FROM else None),
                           "cuDNN's fp8 SDPA is documented for Hopper and Blackwell datacenter parts; Ada and "
                           "sm_120 unverified (the race drops it where the graph does not build)"),
    }


RULES = _rules()

# The `gemm` entry's routes by their own names: "int8-triton" there is the int8 GEMM kernel
# (int8 operands only, Turing on), not the attention mode of that name (PV in e4m3).
GEMM_RULES = {
    "native": RULES["native"], "scaled_mm": RULES["scaled_mm"], "torchao": RULES["torchao"],
    "int_mm": (lambda c: c >= INT8_FROM, "torch._int_mm (cuBLASLt int8 IMMA): int8 tensor cores from sm_75"),
    "int8-triton": (lambda c: True if c >= BF16_FROM else (None if c >= INT8_FROM else False),
                    "Triton's int8 dot lowers to mma.sync s8 on sm_80 on; Turing (sm_75) unverified"),
}


def parse_capability(text) -> tuple[int, int]:
    """'12.0', '12,0', 'sm_120', (12, 0) -> (12, 0)."""
    if isinstance(text, tuple) and len(text) == 2 and all(isinstance(v, int) for v in text):
        return text
    s = str(text).strip().lower().removeprefix("sm_").rstrip("a")
    try:
        if "." in s or "," in s:
            major, minor = (int(v) for v in s.replace(",", ".").split("."))
        else:
            major, minor = int(s[:-1]), int(s[-1])
    except ValueError:
        raise ValueError(f"device capability {text!r}: expected MAJOR.MINOR, e.g. 12.0 (RTX 5090) or 8.9 "
                         f"(RTX 4090)") from None
    if not (5 <= major <= 15 and 0 <= minor <= 9):
        raise ValueError(f"device capability {text!r}: expected MAJOR.MINOR with major 5-15, got {major}.{minor}")
    return major, minor


def rules_for(entry: str | None = None) -> dict:
    """The rules of a plan entry's routes: the `gemm` entry's own, else the attention ones."""
    return GEMM_RULES if entry == "gemm" else RULES


def route_support(route: str, capability, entry: str | None = None) -> tuple[bool | None, str]:
    """(runs: True / False / None when unverified, how it is known) of a route on a capability
    (entry: the plan entry the route fills, where a name means another route there)."""
    cap = parse_capability(capability)
    rules = rules_for(entry)
    if route not in rules:
        raise ValueError(f"route {route!r}: no capability rule; expected one of {sorted(rules)}")
    test, why = rules[route]
    return test(cap), why


def allowed(routes, capability) -> tuple[str, ...]:
    """The routes of `routes` a capability may run (True or unverified), in order."""
    return tuple(r for r in routes if r not in RULES or route_support(r, capability)[0] is not False)


def precisions(capability) -> tuple[str, ...]:
    """The model precisions whose GEMMs have tensor cores on a capability."""
    cap = parse_capability(capability)
    out = ["native"]
    if cap >= E4M3_FROM:
        out.append("fp8")
    if cap >= INT8_FROM:
        out.append("int8")
    return tuple(out)


def capability_lines(capability) -> list[str]:
    """The rules for one capability, one route a line."""
    cap = parse_capability(capability)
    mark = {True: "yes", False: "no", None: "unverified"}
    lines = [f"routes on compute capability {cap[0]}.{cap[1]} (sm_{cap[0]}{cap[1]}), by rule (no card present):"]
    for route in RULES:
        ok, why = route_support(route, cap)
        lines.append(f"  {route:<20} {mark[ok]:<10} {why}")
    return lines

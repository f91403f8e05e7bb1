"""The route table: every implementation the fast path can run for an op, in one place.

A *route* is one named way to compute one plan entry (docs/design.md, "The plan"): the
patch or pixel attention, a SwiGLU, a fused memory-bound op, the fp8 GEMMs. Each entry of
`TABLE` says

- which plan entries it may fill, and the value users write for it (`plan={"attention":
  "prep+sdpa"}`, `PIDKERN_PLAN`, `pidkern bench --plan`);
- its capability rule: device types, model precisions, the minimum CUDA compute
  capability, whether it needs Triton (on CUDA, or on the CPU under TRITON_INTERPRET=1),
  the library it imports, the activation dtypes it takes;
- how `pidkern.ops` runs it (`kind`, and the 8-bit `mode` or `library` where it has one:
  fields, never parsed out of the name), and the function it ends in (`impl`, for people);
- its accuracy class: "exact" (the reference math, rounding aside), or the 8-bit
  arithmetic it trades accuracy for (docs/fp8.md, docs/attention_fp8.md);
- whether a race may time it, per model precision (`race`, lower ranks first: ties go
  to the first).

`pidkern.plan` builds its allowed values, rules and race candidates from this table, the
CLI its choices, docs/design.md its listing (`listing()`). The capability rule takes a
`DeviceSpec` (device type, compute capability, importable libraries), so a plan can be
resolved for a card that is not in this machine: `DeviceSpec.of(device)` describes a live
device, `DeviceSpec.cuda((12, 0), libraries=...)` any other.

Adding a route: one `Route(...)` in `TABLE` and, when its `kind` is new, one branch in the
op of `pidkern.ops` that runs that kind.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass, field

# Libraries a route may import: module -> the pip package a person installs.
LIBRARIES = {
    "triton": "triton",
    "torchao": "torchao",
    "flash_attn": "flash-attn",
    "flash_attn_interface": "flash-attn 3 (the hopper/ build of flash-attention)",
    "sageattention": "sageattention",
    "cudnn": "nvidia-cudnn-frontend",
}
PRECISIONS = ("native", "fp8", "int8")
# e4m3 arithmetic (fp8 tensor cores) starts with Ada (8.9) and Hopper
E4M3_CAPABILITY = (8, 9)
# int8 tensor cores (IMMA) start with Turing (7.5)
INT8_CAPABILITY = (7, 5)
# An int8 model races the attention, SwiGLU and kernel routes an fp8 one does (its GEMMs
# are its own): the 8-bit attention set was measured within the bar next to fp8 GEMMs,
# whose error is the larger (docs/int8.md).
RACE_AS = {"int8": "fp8"}


def importable(module: str) -> bool:
    """Whether `module` imports here (a failing import counts as missing)."""
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


@dataclass(frozen=True)
class DeviceSpec:
    """What a route's capability rule looks at: the device type ("cuda" or "cpu"), the
    CUDA compute capability (None: unknown, no minimum is enforced), the libraries that
    import, and whether Triton kernels run on the CPU (TRITON_INTERPRET=1)."""
    type: str
    capability: tuple | None = None
    libraries: frozenset = field(default_factory=frozenset)
    interpret: bool = False

    @classmethod
    def of(cls, device) -> "DeviceSpec":
        """The live device: its capability asked from CUDA, the libraries probed by import."""
        import torch
        dev = torch.device(device) if not isinstance(device, torch.device) else device
        cap = None
        if dev.type == "cuda" and torch.cuda.is_available():
            cap = tuple(torch.cuda.get_device_capability(dev))
        return cls(dev.type, cap, frozenset(m for m in LIBRARIES if _probe(m)),
                   os.environ.get("TRITON_INTERPRET") == "1")

    @classmethod
    def cuda(cls, capability, libraries=("triton",)) -> "DeviceSpec":
        """A CUDA card of `capability` (e.g. (12, 0)) with `libraries` installed."""
        if not (isinstance(capability, tuple) and len(capability) == 2):
            raise ValueError(f"capability={capability!r}: expected (major, minor), e.g. (9, 0)")
        unknown = set(libraries) - set(LIBRARIES)
        if unknown:
            raise ValueError(f"libraries={sorted(unknown)}: expected some of {sorted(LIBRARIES)}")
        return cls("cuda", capability, frozenset(libraries))

    @property
    def triton(self) -> bool:
        """Whether the Triton kernels run here: Triton on CUDA, or the interpreter."""
        return "triton" in self.libraries and (self.type == "cuda" or self.interpret)


def _probe(module: str) -> bool:
    if module in ("triton", "torchao"):       # find_spec: importing them is slow and unneeded
        try:
            return importlib.util.find_spec(module) is not None
        except ValueError:
            return False
    return importable(module)


@dataclass(frozen=True)
class Route:
    """One implementation of one or more plan entries; see the module doc."""
    name: str                        # the value users write
    entries: tuple                   # the plan entries it may fill
    kind: str                        # how pidkern.ops runs it
    impl: str                        # the function it ends in (for the listing)
    accuracy: str = "exact"
    devices: tuple = ("cuda", "cpu")
    precisions: tuple = PRECISIONS
    min_capability: tuple | None = None
    triton: bool = False
    library: str | None = None
    dtypes: tuple | None = None      # activation dtype names it takes (None: any)
    mode: str | None = None          # the Triton attention kernel's 8-bit mode
    race: dict = field(default_factory=dict)   # precision -> rank in that precision's race

    @property
    def capability_rule(self) -> bool:
        """Whether pidkern.capability holds a rule for this route beyond min_capability
        (the attention and GEMM routes: FA3 on Hopper only, row-wise _scaled_mm, ...)."""
        from .capability import rules_for
        return any((e.startswith("attention") or e == "gemm") and self.name in rules_for(e) for e in self.entries)

    def why_not(self, spec: DeviceSpec, precision: str = "native") -> str | None:
        """None when this route can run on `spec` for a model of `precision`, else why not."""
        if precision not in self.precisions:
            return f"{self.name} is for precision {' or '.join(self.precisions)}, the model's is {precision}"
        if spec.type not in self.devices:
            return f"{self.name} runs on {' or '.join(self.devices)}, not {spec.type}"
        if self.triton and not spec.triton:
            return f"{self.name} needs Triton on CUDA (or TRITON_INTERPRET=1)"
        if (spec.type == "cuda" and self.min_capability and spec.capability is not None
                and spec.capability < self.min_capability):
            need = ".".join(map(str, self.min_capability))
            return f"{self.name} needs compute capability {need} or later, the card has {spec.capability}"
        if spec.type == "cuda" and spec.capability is not None and self.capability_rule:
            from .capability import route_support
            ok, why = route_support(self.name, spec.capability, "gemm" if self.entries == ("gemm",) else None)
            if ok is False:
                return f"{self.name} cannot run on compute capability {spec.capability[0]}.{spec.capability[1]}: {why}"
        if self.library and self.library not in spec.libraries:
            return f"{self.name} needs the {LIBRARIES[self.library]!r} package (import {self.library})"
        return None


ATTENTION = ("attention.patch", "attention.pixel")
SWIGLU = ("swiglu.image", "swiglu.text")
KERNEL_ENTRIES = ("gate", "embed", "rms_modulate", "pixel_modulate")
_MODE_DOC = {"fp8": "QK^T and PV in e4m3", "fp8qk": "QK^T in e4m3", "int8": "QK^T in int8, PV in e4m3",
             "int8qk": "QK^T in int8"}


def _attention_8bit():
    out = []
    # the order of the fp8 model's race candidates (ties go to the first)
    for mode in ("fp8", "int8", "fp8qk", "int8qk"):
        e4m3 = mode != "int8qk"
        # int8 QK^T with 16-bit PV is the only mode whose image error stays within the
        # bar with the fp8 GEMMs (docs/fp8.md): the only one an fp8 model races
        race = {"fp8": 10} if mode == "int8qk" else {}
        out.append(Route(f"{mode}-triton", ATTENTION, "fused", "kernels.attention.attention_8bit",
                         f"8-bit: {_MODE_DOC[mode]}", ("cuda", "cpu"), triton=True, mode=mode,
                         min_capability=E4M3_CAPABILITY if e4m3 else None, race=race))
        out.append(Route(f"prep+{mode}-triton", ATTENTION, "prep", "kernels.attention.attention_core_8bit",
                         f"8-bit: {_MODE_DOC[mode]}", ("cuda", "cpu"), triton=True, mode=mode,
                         min_capability=E4M3_CAPABILITY if e4m3 else None, race=dict(race)))
    return out


_ROUTES = [
    # attention (ops.attention; the 8-bit routes: docs/attention_fp8.md)
    Route("triton", ATTENTION, "fused", "kernels.attention.attention_fused", triton=True,
          race={"native": 2, "fp8": 2}),
    Route("prep+sdpa", ATTENTION, "prep", "kernels.attention.attention_prep, then ops.attend (SDPA)", triton=True,
          race={"native": 1, "fp8": 1}),
    Route("qkv_rope+sdpa", ("attention.patch",), "qkv_rope", "kernels.qkv_rope, then ops.attend (SDPA)",
          triton=True, race={"native": 3, "fp8": 3}),
    Route("prep+triton", ATTENTION, "prep", "kernels.attention.attention_core", triton=True),
    Route("torch", ATTENTION, "torch", "ops.prep_qkv, then ops.attend (SDPA)"),
    *_attention_8bit(),
    Route("prep+flash", ATTENTION, "prep", "attention_routes.flash (FA2)", "exact (16-bit)", ("cuda",),
          triton=True, library="flash_attn", dtypes=("float16", "bfloat16"), race={"native": 4, "fp8": 4}),
    Route("prep+sage", ATTENTION, "prep", "attention_routes.sage (SageAttention)", "8-bit: QK^T in int8",
          ("cuda",), triton=True, library="sageattention", race={"fp8": 11}),
    Route("prep+cudnn-fp8", ATTENTION, "prep", "attention_routes.cudnn_fp8 (cuDNN fp8 SDPA)",
          "8-bit: QK^T and PV in e4m3", ("cuda",), triton=True, library="cudnn", min_capability=E4M3_CAPABILITY),
    Route("prep+flash3-fp8", ATTENTION, "prep", "attention_routes.flash3_fp8 (FA3)", "8-bit: QK^T and PV in e4m3",
          ("cuda",), triton=True, library="flash_attn_interface", min_capability=E4M3_CAPABILITY),
    # SwiGLU gate-up (ops.swiglu_gate_up)
    Route("triton", SWIGLU, "fused", "kernels.swiglu.swiglu_gate_up", triton=True,
          race={"native": 1, "fp8": 1}),
    Route("torch", SWIGLU, "torch", "two GEMMs and the PyTorch product", race={"native": 2, "fp8": 2}),
    Route("split", SWIGLU, "split", "one GEMM, then kernels.swiglu.silu_mul", triton=True,
          race={"native": 3, "fp8": 3}),
    # the fused memory-bound ops and GEMM epilogues: the kernel or the reference math
    *[Route("triton", (e,), "fused", f"kernels.{mod}", triton=True,
            race={"native": 1, "fp8": 1} if raced else {})
      for e, mod, raced in (("gate", "gate", True), ("embed", "embed", True),
                            ("rms_modulate", "rms_modulate", False), ("pixel_modulate", "pixel_modulate", False))],
    *[Route("torch", (e,), "torch", "the reference math (pidkern.reference)",
            race={"native": 2, "fp8": 2} if e in ("gate", "embed") else {})
      for e in KERNEL_ENTRIES],
    # the GEMMs of a precision="fp8" model's 8-bit layers (pidkern.layers, docs/fp8.md)
    Route("native", ("gemm",), "native", "torch.nn.functional.linear", precisions=("native",)),
    Route("scaled_mm", ("gemm",), "scaled_mm", "fp8.scaled_mm (torch._scaled_mm, rowwise)",
          "8-bit: e4m3 weights and activations", precisions=("fp8",), min_capability=E4M3_CAPABILITY,
          race={"fp8": 1}),
    Route("torchao", ("gemm",), "torchao", "fp8.torchao_linear (torchao Float8Tensor)",
          "8-bit: e4m3 weights and activations", precisions=("fp8",), min_capability=E4M3_CAPABILITY,
          library="torchao", race={"fp8": 2}),
    # the GEMMs of a precision="int8" model's 8-bit layers (pidkern.int8, docs/int8.md)
    Route("int_mm", ("gemm",), "int_mm", "int8.linear (torch._int_mm)",
          "8-bit: int8 weights and per-token activations", precisions=("int8",), min_capability=INT8_CAPABILITY,
          race={"int8": 1}),
    Route("int8-triton", ("gemm",), "int8_triton", "kernels.int8_gemm.int8_gemm",
          "8-bit: int8 weights and per-token activations", precisions=("int8",), min_capability=INT8_CAPABILITY,
          triton=True, race={"int8": 2}),
]

# plan entry -> {value: Route}, in the order above (the CLI's and the docs' order)
TABLE: dict = {}
for _r in _ROUTES:
    for _e in _r.entries:
        TABLE.setdefault(_e, {})[_r.name] = _r
del _r, _e
ENTRIES = tuple(TABLE)


def route(entry: str, name: str) -> Route:
    """The route `name` of plan entry `entry`, or ValueError naming the allowed ones."""
    if entry not in TABLE:
        raise ValueError(f"plan entry {entry!r}: expected one of {ENTRIES}")
    if name not in TABLE[entry]:
        raise ValueError(f"plan {entry}={name!r}: expected one of {tuple(TABLE[entry])}")
    return TABLE[entry][name]


def values(entry: str) -> tuple:
    """Every value `entry` accepts."""
    return tuple(TABLE[entry])


def attention(name: str) -> Route:
    """An attention route by name (ops.attention's `backend`)."""
    if name not in TABLE["attention.pixel"] and name not in TABLE["attention.patch"]:
        raise ValueError(f"backend={name!r}; expected one of {values('attention.patch')}")
    return TABLE["attention.patch"].get(name) or TABLE["attention.pixel"][name]


def available(entry: str, spec: DeviceSpec, precision: str = "native") -> tuple:
    """The values of `entry` whose capability rule `spec` meets."""
    return tuple(n for n, r in TABLE[entry].items() if r.why_not(spec, precision) is None)


def race_candidates(entry: str, precision: str = "native", spec: DeviceSpec | None = None) -> tuple:
    """The values a race of `entry` times for a model of `precision`, in race order; with a
    `spec`, only those that can run there."""
    key = precision if entry == "gemm" else RACE_AS.get(precision, precision)
    rs = [r for r in TABLE[entry].values() if key in r.race
          and (spec is None or r.why_not(spec, precision) is None)]
    return tuple(r.name for r in sorted(rs, key=lambda r: r.race[key]))


def listing() -> str:
    """The table as Markdown (docs/design.md carries a copy; a test keeps them equal)."""
    rows = [f"| entry | value | runs | accuracy | needs | raced ({' / '.join(PRECISIONS)}) |", "|---|---|---|---|---|---|"]
    for entry, rs in TABLE.items():
        for r in rs.values():
            needs = [("/".join(r.devices))]
            if r.triton:
                needs.append("Triton")
            if r.min_capability:
                needs.append("sm " + ".".join(map(str, r.min_capability)) + "+")
            if r.library:
                needs.append(r.library)
            if r.precisions != PRECISIONS:
                needs.append(f"precision {'/'.join(r.precisions)}")
            race = " / ".join(str(r.race.get(p if entry == "gemm" else RACE_AS.get(p, p), "-")) for p in PRECISIONS)
            rows.append(f"| {entry} | `{r.name}` | {r.impl} | {r.accuracy} | {', '.join(needs)} | {race} |")
    return "\n".join(rows)

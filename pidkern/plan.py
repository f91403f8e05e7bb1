"""The fast path's per-shape choices, made once before capture and kept in one object.

A `Plan` says, for one decode shape, which implementation every step of `FastPiD.forward`
runs: the attention route of the patch and of the pixel blocks, the SwiGLU route of the
image and of the text stream, whether each memory-bound fusion runs its Triton kernel,
the modulation band size, whether adapter heads are kept, whether the decode is one
CUDA graph, the model's precision and the route of its 8-bit GEMMs. Each entry is
decided one of three ways, recorded beside it:

- "override": the caller said so (`Decoder.decode(..., plan={...})`, `pidkern bench
  --plan ...`, or the PIDKERN_PLAN debugging switch, read here and nowhere else);
- "race": on CUDA, the candidates are timed once on the real tensors during the warm-up
  run that precedes capture, and the fastest is kept (the winner depends on card and shape);
- "rule": everything else, and every choice off CUDA (where nothing is timed).

`print(plan)` shows the table; `pidkern info --plan PRESET HxW` prints it for a shape.
See docs/design.md, "The plan".
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass, field

from . import routes as R
from .routes import PRECISIONS, DeviceSpec
from .sizes import heads_fit, modulation_band_rows

# Every route value and race order below is generated from pidkern.routes.TABLE: a route
# is added there, never here.
PATCH_ATTENTION = R.values("attention.patch")
PIXEL_ATTENTION = R.values("attention.pixel")
ATTENTION_8BIT = tuple(n for n, r in R.TABLE["attention.patch"].items() if r.accuracy != "exact"
                       or r.library is not None)
SWIGLU = R.values("swiglu.image")
KERNEL = R.values("gate")
GEMM = R.values("gemm")
# what each entry configures (the op of pidkern.ops)
_OPS = {"attention.patch": "attention", "attention.pixel": "attention", "swiglu.image": "swiglu",
        "swiglu.text": "swiglu", "gate": "gate", "embed": "embed", "rms_modulate": "rms_modulate",
        "pixel_modulate": "pixel_modulate", "gemm": "linear"}


def _installed(r) -> bool:
    if r.library is None:
        return True
    try:
        return importlib.util.find_spec(r.library) is not None
    except ValueError:   # a module in sys.modules without a spec
        return False


def flash_race() -> tuple[str, ...]:
    """("prep+flash",) where flash_attn is installed: FA2 joins the bf16 attention race (an
    install that fails to load fails its race, loudly, like any other candidate)."""
    return tuple(n for n in R.race_candidates("attention.patch") if R.TABLE["attention.patch"][n].library
                 and _installed(R.TABLE["attention.patch"][n]))


# name -> (allowed values, the op of pidkern.ops it configures, the candidates a native
# model races on CUDA in this order (ties go to the first), or () when a rule decides)
CHOICES: dict[str, tuple] = {
    e: (R.values(e), _OPS[e], tuple(n for n in R.race_candidates(e, "native" if e != "gemm" else "fp8")
                                    if _installed(R.TABLE[e][n])))
    for e in R.ENTRIES}
# precision is the model's (fixed when `pidkern.load` builds it): the plan records it, and
# an override may only repeat it
SETTINGS = ("graphs", "band_rows", "keep_heads", "precision")


def fp8_attention_candidates(device, accurate_only: bool = True) -> tuple[str, ...]:
    """The 8-bit attention routes an fp8 model races on `device` (a torch.device or a
    routes.DeviceSpec) besides the native ones: with accurate_only those the route table
    lets an fp8 model race (the modes whose image error was measured within the bar,
    docs/fp8.md), else every 8-bit route that can run there; () off CUDA."""
    spec = device if isinstance(device, DeviceSpec) else DeviceSpec.of(device)
    if spec.type != "cuda":
        return ()
    native = set(R.race_candidates("attention.patch", "native"))
    if accurate_only:
        return tuple(n for n in R.race_candidates("attention.patch", "fp8", spec) if n not in native)
    return tuple(n for n in R.available("attention.patch", spec, "fp8") if n in ATTENTION_8BIT
                 and n != "prep+flash")


ENV = "PIDKERN_PLAN"


def _parse_value(key: str, value):
    if key in ("graphs", "keep_heads"):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("on", "off", "1", "0", "true", "false"):
            return value.lower() in ("on", "1", "true")
        raise ValueError(f"plan {key}={value!r}: expected on/off (or True/False)")
    if key == "band_rows":
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"plan band_rows={value!r}: expected a positive number of patches")
        return value
    if key == "precision":
        if value not in PRECISIONS:
            raise ValueError(f"plan precision={value!r}: expected one of {PRECISIONS}")
        return value
    allowed = CHOICES[key][0]
    if value not in allowed:
        raise ValueError(f"plan {key}={value!r}: expected one of {allowed}")
    return value


def check_overrides(overrides) -> dict:
    """Validate a {name: value} mapping (or a Plan: its decided routes and its overrides)
    and expand the short names: "attention" sets both attention entries, "swiglu" both
    SwiGLU ones."""
    if overrides is None:
        return {}
    if isinstance(overrides, Plan):
        # a plan handed back: its routes as they were decided (raced ones included) and its
        # overrides; the shape-bound settings (band_rows, keep_heads, graphs) follow the new
        # shape's rules unless they were overrides
        return {**{k: v for k, (v, _) in overrides.choices.items() if k in CHOICES and v is not None},
                **overrides.overrides}
    if isinstance(overrides, str):
        return parse(overrides)
    if not isinstance(overrides, dict):
        raise TypeError(f"plan={overrides!r}: expected a dict of choices, a Plan, a 'key=value,...' string or None")
    out = {}
    for key, value in overrides.items():
        keys = [k for k in CHOICES if k.split(".")[0] == key] if key in ("attention", "swiglu") else [key]
        if key == "attention" and value == "qkv_rope+sdpa":
            out["attention.patch"] = value              # the GEMM route exists for the patch blocks only
            out["attention.pixel"] = "prep+sdpa"
            continue
        for k in keys:
            if k not in CHOICES and k not in SETTINGS:
                raise ValueError(f"plan key {key!r}: expected one of {sorted(CHOICES) + list(SETTINGS)} "
                                 f"(or 'attention', 'swiglu' for both of theirs)")
            out[k] = _parse_value(k, value)
    return out


def parse(text: str) -> dict:
    """'attention=prep+sdpa,graphs=off' -> validated overrides."""
    pairs = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise ValueError(f"plan {text!r}: {item!r} is not key=value")
        k, v = item.split("=", 1)
        pairs[k.strip()] = v.strip()
    return check_overrides(pairs)


def env_overrides() -> dict:
    """The debugging switch PIDKERN_PLAN (same syntax as `parse`); a caller's plan wins."""
    text = os.environ.get(ENV, "")
    return parse(text) if text else {}


@dataclass
class Plan:
    """Every choice of one decode shape: `choices[name] = (value, how)`; see the module doc."""
    shape: tuple                      # (batch, height, width, text_len)
    device: str
    choices: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)
    race_ms: dict = field(default_factory=dict)     # name -> {candidate: median ms, or the error}
    # name -> the candidates raced for it when they differ from CHOICES' (an fp8 model's
    # attention entries race the accurate 8-bit routes too)
    candidates: dict = field(default_factory=dict)

    def raced(self, name) -> tuple:
        """The candidates a race of `name` times, in order."""
        return self.candidates.get(name, CHOICES[name][2])

    def __getitem__(self, name):
        return self.choices[name][0]

    def pending(self) -> list[str]:
        return [k for k, (v, _) in self.choices.items() if v is None]

    def set(self, name, value, how):
        self.choices[name] = (value, how)

    def as_dict(self) -> dict:
        return {"shape": list(self.shape), "device": self.device,
                "choices": {k: {"value": v, "how": how} for k, (v, how) in self.choices.items()},
                "race_ms": self.race_ms, "candidates": self.candidates}

    def __str__(self):
        b, h, w, t = self.shape
        lines = [f"plan for batch {b}, {h}x{w}, {t} text tokens on {self.device}:"]
        for k, (v, how) in self.choices.items():
            timing = ""
            if k in self.race_ms:
                timing = "  (" + ", ".join(f"{c} {ms:.3f} ms" if isinstance(ms, float) else f"{c} failed"
                                           for c, ms in self.race_ms[k].items()) + ")"
            elif k in self.candidates:
                timing = "  (candidates: " + ", ".join(self.candidates[k]) + ")"
            lines.append(f"  {k:<16} {'(decided at warm-up)' if v is None else v!s:<14} {how}{timing}")
        return "\n".join(lines)


def _gemm_rule(precision: str, cuda: bool, torchao_ok: bool, over: dict):
    """(value, how) of the "gemm" entry for a model of `precision`."""
    value = over.get("gemm")
    if value is not None:
        if (value == "native") != (precision == "native"):
            raise ValueError(f"plan gemm={value!r}: the model was loaded with precision={precision!r}, whose "
                             f"GEMMs are {'native' if precision == 'native' else 'scaled_mm or torchao'} "
                             f"(pidkern.load(..., precision=...) fixes it)")
        if value == "torchao" and not torchao_ok:
            raise ValueError("plan gemm='torchao': torchao cannot run here (not installed, or a CUDA card "
                             "without fp8 tensor cores); use gemm='scaled_mm' or pip install 'pidkern[fp8]'")
        return value, "override"
    if precision == "native":
        return "native", "rule: native precision"
    if cuda and torchao_ok:
        return None, "race"
    return "scaled_mm", "rule" if not cuda else "rule: no torchao here"


def resolve(cfg, batch: int, height: int, width: int, text_len: int, device, dtype_bytes: int,
            triton_ok: bool | None = None, overrides=None, collectives: str | None = None,
            precision: str = "native", torchao_ok: bool | None = None, spec: DeviceSpec | None = None) -> Plan:
    """The plan for one shape before any timing: overrides, then rules; on CUDA the raced
    choices stay open (None, "race") until the warm-up run times them.

    spec: what the route table's capability rules look at (routes.DeviceSpec); default the
    live `device`'s. Give one to resolve a plan for a card that is not here.
    triton_ok, torchao_ok: force whether the Triton kernels / the torchao GEMM route can
    run (default: the spec's rules).
    collectives: the process group backend of a sequence-parallel band decode
    (pidkern.parallel), None for one process: a CUDA graph captures NCCL's only.
    precision: the model's ("native" or "fp8"; an override naming another is an error)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    if spec is None:
        spec = DeviceSpec.of(device)
    libs = set(spec.libraries)
    for lib, ok in (("triton", triton_ok), ("torchao", torchao_ok)):
        if ok is not None:
            (libs.add if ok else libs.discard)(lib)
    spec = DeviceSpec(spec.type, spec.capability, frozenset(libs), bool(spec.interpret or (triton_ok and spec.type != "cuda")))
    over = {**env_overrides(), **check_overrides(overrides)}
    if over.get("precision", precision) != precision:
        raise ValueError(f"plan precision={over['precision']!r}: this model was loaded with precision={precision!r}; "
                         f"the precision is fixed when the model is built (pidkern.load(..., precision=...))")
    cuda = spec.type == "cuda"
    plan = Plan((batch, height, width, text_len), str(device), overrides=over)
    for name in CHOICES:
        if name == "gemm":
            plan.set(name, *_gemm_rule(precision, cuda, R.TABLE["gemm"]["torchao"].why_not(spec, "fp8") is None,
                                       over))
        elif name in over:
            plan.set(name, over[name], "override")
        elif not spec.triton:
            plan.set(name, "torch", "rule: no Triton here")
        elif cuda and CHOICES[name][2]:
            plan.set(name, None, "race")
        else:
            plan.set(name, "triton", "rule")
    rows = batch * (height // cfg.patch) * (width // cfg.patch)
    graphs = (cuda, "rule: CUDA" if cuda else "rule: not CUDA")
    if cuda and collectives not in (None, "nccl"):
        graphs = (False, f"rule: {collectives} collectives cannot be captured")
    elif cuda and collectives == "nccl":
        graphs = (True, "rule: CUDA, NCCL collectives captured")
    settings = {"graphs": graphs,
                "band_rows": (modulation_band_rows(cfg, rows, dtype_bytes), "rule: 128 MiB per band"),
                "keep_heads": (heads_fit(cfg, rows, dtype_bytes), "rule: kept while <= 256 MiB"),
                "precision": (precision, "load")}
    for name, (value, how) in settings.items():
        plan.set(name, *((over[name], "override") if name in over else (value, how)))
    if precision == "fp8" and cuda:
        extra = fp8_attention_candidates(spec)
        for name in ("attention.patch", "attention.pixel"):
            if plan[name] is None and extra:
                plan.candidates[name] = CHOICES[name][2] + extra
    if plan["graphs"] and not cuda:
        raise ValueError(f"plan graphs=on: CUDA graphs need a CUDA device, got {device}")
    if plan["graphs"] and collectives not in (None, "nccl"):
        raise ValueError(f"plan graphs=on: a CUDA graph can capture NCCL collectives only, and this decode's "
                         f"process group uses {collectives}; use an NCCL group or graphs=off")
    return plan


def race(plan: Plan, name: str, runs: dict, device) -> None:
    """Time each candidate of `runs` ({value: callable}) once and record the fastest.

    A candidate that raises for this shape is skipped and its error recorded (and
    warned about); if every one fails the PyTorch route is taken."""
    from .timing import time_ms
    times = {}
    for value, fn in runs.items():
        try:
            times[value] = time_ms(fn, warmup=2, reps=5, device=str(device))["median_ms"]
        except Exception as err:  # noqa: BLE001 - a route that cannot run this shape is skipped, loudly
            times[value] = f"{type(err).__name__}: {err}"
            warnings.warn(f"pidkern: {name} route {value} failed for plan {plan.shape}: {err}", RuntimeWarning,
                          stacklevel=2)
    ok = {v: ms for v, ms in times.items() if isinstance(ms, float)}
    plan.race_ms[name] = times
    fallback = "scaled_mm" if name == "gemm" else "torch"
    plan.set(name, min(ok, key=ok.get) if ok else fallback, "race" if ok else "race: every route failed")

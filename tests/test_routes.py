"""The route table is the one source of the plan's values, races and capability rules,
and a plan can be resolved for a card that is not in this machine."""
from pathlib import Path

import pytest

from pidkern import plan as P
from pidkern import routes as R
from pidkern.config import tiny

H100 = R.DeviceSpec.cuda((9, 0))
A100 = R.DeviceSpec.cuda((8, 0))


def test_every_plan_value_is_a_route_of_the_table():
    for entry, (allowed, _, raced) in P.CHOICES.items():
        assert allowed == tuple(R.TABLE[entry]), entry
        assert set(raced) <= set(allowed), entry
        for name in allowed:
            r = R.route(entry, name)
            assert r.name == name and entry in r.entries
    with pytest.raises(ValueError, match="expected one of"):
        R.route("attention.pixel", "qkv_rope+sdpa")    # the QKV GEMM route exists for the patch blocks only
    with pytest.raises(ValueError, match="attention.patch"):
        P.check_overrides({"attention.patch": "flash9"})


def test_capability_rules_read_the_spec_not_the_machine():
    # e4m3 arithmetic needs 8.9: an A100 keeps only the int8 QK^T routes of the 8-bit ones
    eight = [n for n, r in R.TABLE["attention.patch"].items() if r.accuracy.startswith("8-bit")]
    on_a100 = [n for n in eight if R.TABLE["attention.patch"][n].why_not(A100, "fp8") is None]
    assert on_a100 == ["int8qk-triton", "prep+int8qk-triton"]
    assert "compute capability 8.9" in R.TABLE["gemm"]["scaled_mm"].why_not(A100, "fp8")
    assert R.TABLE["gemm"]["scaled_mm"].why_not(H100, "fp8") is None
    assert "torchao" in R.TABLE["gemm"]["torchao"].why_not(H100, "fp8")          # not in its libraries
    assert R.TABLE["gemm"]["torchao"].why_not(R.DeviceSpec.cuda((9, 0), ("triton", "torchao")), "fp8") is None
    assert "precision" in R.TABLE["gemm"]["native"].why_not(H100, "fp8")
    cpu = R.DeviceSpec("cpu", None, frozenset({"triton"}))
    assert "Triton" in R.TABLE["gate"]["triton"].why_not(cpu)                    # no interpreter
    assert R.TABLE["gate"]["triton"].why_not(R.DeviceSpec("cpu", None, frozenset({"triton"}), True)) is None
    assert "runs on cuda" in R.TABLE["attention.patch"]["prep+flash"].why_not(cpu)
    with pytest.raises(ValueError, match="capability"):
        R.DeviceSpec.cuda(12)
    with pytest.raises(ValueError, match="libraries"):
        R.DeviceSpec.cuda((12, 0), ("flash9",))


def test_a_plan_resolves_for_a_card_that_is_not_here():
    cfg = tiny("flux-2k")
    spec = R.DeviceSpec.cuda((12, 0), ("triton", "sageattention"))
    p = P.resolve(cfg, 1, 64, 64, 8, "cuda", 2, precision="fp8", spec=spec)
    assert p["attention.patch"] is None and p.choices["attention.patch"][1] == "race"
    # the fp8 race adds the accurate 8-bit routes that run there, in the table's order
    assert p.raced("attention.patch")[-3:] == ("int8qk-triton", "prep+int8qk-triton", "prep+sage")
    assert p["gemm"] == "scaled_mm" and p.choices["gemm"][1] == "rule: no torchao here"
    old = P.resolve(cfg, 1, 64, 64, 8, "cuda", 2, precision="fp8",
                    spec=R.DeviceSpec.cuda((8, 0), ("triton", "sageattention")))
    assert old.raced("attention.patch")[-3:] == ("int8qk-triton", "prep+int8qk-triton", "prep+sage")
    native = P.resolve(cfg, 1, 64, 64, 8, "cuda", 2, spec=spec)
    assert native.raced("attention.patch") == R.race_candidates("attention.patch", "native", spec)
    assert native["gemm"] == "native"


def test_design_doc_carries_the_generated_listing():
    text = (Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text()
    assert R.listing() in text, "docs/design.md's route table is stale: paste pidkern.routes.listing()"


def test_info_plan_for_a_card_that_is_not_here():
    from pidkern.cli import plan_lines
    text = "\n".join(plan_lines("flux-2k", "1024x1024", precision="fp8",
                                spec=R.DeviceSpec.cuda((12, 0), ("triton", "sageattention"))))
    assert "on cuda" in text and "bfloat16 weights" in text
    assert "prep+sage" in text and "(decided at warm-up)" in text       # raced there, with sage a candidate

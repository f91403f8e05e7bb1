"""The capability rules (pidkern.capability): what a card that is not here may run."""
from __future__ import annotations

import pytest

from pidkern import capability as C
from pidkern.plan import CHOICES


def test_parse_capability():
    assert C.parse_capability("12.0") == (12, 0) == C.parse_capability("sm_120") == C.parse_capability("sm_120a")
    assert C.parse_capability("8,9") == (8, 9) == C.parse_capability((8, 9))
    with pytest.raises(ValueError, match="MAJOR.MINOR"):
        C.parse_capability("ada")


def test_hardware_rules():
    # e4m3 from sm_89: the 8-bit Triton attention modes with e4m3 arithmetic, fp8 GEMMs
    for route in ("fp8-triton", "int8-triton", "fp8qk-triton"):
        assert C.route_support(route, "8.6")[0] is False and C.route_support(route, "8.9")[0] is True
    assert C.route_support("scaled_mm", "8.0")[0] is False
    assert C.route_support("scaled_mm", "8.9")[0] is True and C.route_support("scaled_mm", "9.0")[0] is True
    assert C.route_support("scaled_mm", "12.0")[0] is None          # unverified on consumer Blackwell
    assert C.route_support("int8", "7.5")[0] is True and C.route_support("int8", "7.0")[0] is False
    assert [C.route_support("block_scaled_fp8", c)[0] for c in ("9.0", "10.0", "12.0", "8.9")] == [False, True, True,
                                                                                                   False]
    assert C.route_support("prep+flash3-fp8", "9.0")[0] is True and C.route_support("prep+flash3-fp8", "12.0")[0] is False
    assert C.precisions("8.6") == ("native", "int8") and C.precisions("12.0") == ("native", "fp8", "int8")


def test_every_plan_route_has_a_rule():
    for name, (values, _, _) in CHOICES.items():
        if name.startswith("attention") or name == "gemm":
            missing = [v for v in values if v not in C.rules_for(name)]
            assert not missing, (name, missing)


def test_a_gemm_route_has_its_own_rule_where_an_attention_route_shares_its_name():
    # the int8 GEMM kernel is int8 operands only; the attention mode of that name has PV in e4m3
    assert C.route_support("int8-triton", "8.6", "gemm")[0] is True
    assert C.route_support("int8-triton", "8.6")[0] is False
    assert C.route_support("int_mm", "7.5", "gemm")[0] is True and C.route_support("int_mm", "7.0", "gemm")[0] is False
    from pidkern import routes as R
    ampere = R.DeviceSpec.cuda((8, 6), libraries=("triton",))
    assert "int8-triton" in R.available("gemm", ampere, "int8")
    assert "int8-triton" not in R.available("attention.patch", ampere, "fp8")


def test_allowed_keeps_order_and_unverified():
    routes = ("prep+sdpa", "fp8-triton", "prep+flash3-fp8", "prep+cudnn-fp8", "int8qk-triton")
    assert C.allowed(routes, "8.6") == ("prep+sdpa", "int8qk-triton")
    assert C.allowed(routes, "12.0") == ("prep+sdpa", "fp8-triton", "prep+cudnn-fp8", "int8qk-triton")
    assert C.allowed(routes, "9.0") == routes
    text = "\n".join(C.capability_lines("12.0"))
    assert "sm_120" in text and "unverified" in text


def test_route_table_applies_the_rules_to_a_card_that_is_not_here():
    from pidkern import routes as R
    spec = R.DeviceSpec.cuda((12, 0), libraries=("triton", "flash_attn_interface", "cudnn", "torchao"))
    fa3 = R.TABLE["attention.patch"]["prep+flash3-fp8"]
    assert "cannot run on compute capability 12.0" in fa3.why_not(spec, "fp8")
    assert fa3.why_not(R.DeviceSpec.cuda((9, 0), libraries=("triton", "flash_attn_interface")), "fp8") is None
    # unverified stays a candidate (the race decides on the card)
    assert R.TABLE["gemm"]["scaled_mm"].why_not(spec, "fp8") is None
    assert R.TABLE["attention.patch"]["prep+cudnn-fp8"].why_not(spec, "fp8") is None
    ada = R.DeviceSpec.cuda((8, 6), libraries=("triton",))
    assert "fp8-triton" not in R.available("attention.patch", ada, "fp8")
    assert "int8qk-triton" in R.available("attention.patch", ada, "fp8")


def test_info_plan_for_a_device_capability(capsys):
    from pidkern.cli import main
    assert main(["info", "--plan", "flux-2k", "2048x2048", "--device-capability", "12.0", "--precision", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "compute capability 12.0 (sm_120)" in out and "plan for batch 1, 2048x2048" in out
    assert "gemm             scaled_mm" in out and "scaled_mm: unverified" in out
    assert main(["info", "--plan", "flux-2k", "2048x2048", "--device-capability", "8.6", "--precision", "fp8"]) != 0
    assert "no fp8 tensor cores" in capsys.readouterr().err

"""The card facts and the decode-time prediction (pidkern.cards), pinned to the H200 measurements."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pidkern import cards
from pidkern.config import get_preset

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def _engine_rows():
    data = json.loads((RESULTS / "engine_check_nvidia-h200_2026-11-26.json").read_text())
    assert data["env"]["card"] == "NVIDIA H200"
    return {r["height"]: r for r in data["memory"] if r["batch"] == 1 and r["height"] == r["width"]}


def test_calibration_constants_are_the_measured_files():
    rows = _engine_rows()
    for size, ms in cards.H200_DECODE_MS.items():
        assert rows[size]["median_ms"] == pytest.approx(ms, abs=0.01)
        assert rows[size]["resident_gib"] == pytest.approx(cards.H200_RESIDENT_GIB[size], abs=0.01)
    kernels = {r["name"]: r for r in json.loads((RESULTS / "kernels_nvidia-h200_2026-11-26.json").read_text())["kernels"]}
    peak = cards.CARDS["h200"].bf16_tflops
    assert kernels["attention/patch-hd64-prep+sdpa-vs-chain"]["fused_tflops"] == pytest.approx(
        cards.EFF_PATCH_ATTENTION * peak, abs=0.1)
    assert kernels["attention/pixel-hd72-prep+sdpa-vs-chain"]["fused_tflops"] == pytest.approx(
        cards.EFF_PIXEL_ATTENTION * peak, abs=0.1)


@pytest.mark.parametrize("size", [1024, 2048, 4096])
def test_model_reproduces_the_measured_h200_decodes_within_10_percent(size):
    measured = _engine_rows()[size]["median_ms"]
    p = cards.predict("h200", size, "bf16")
    assert p.measured_ms == pytest.approx(measured, abs=0.01)
    assert abs(p.ms / measured - 1) <= 0.10, (size, p.ms, measured)


def test_fitted_constants_are_the_least_squares_fit():
    """EFF_MEMORY and FIXED_MS solve the relative least squares over the three H200 decodes
    (refit here from the model's other parts)."""
    cfg = get_preset("flux-2k")
    a, y = [], []
    for size, measured in cards.H200_DECODE_MS.items():
        p = cards.predict("h200", size)
        known = p.parts_ms["gemm"] + p.parts_ms["attention"]
        byte_ms = 1e3 * cards.memory_bound_bytes(cfg, size, size) / (cards.CARDS["h200"].bandwidth_gbs * 1e9)
        a.append([byte_ms / measured, 1 / measured])
        y.append((measured - known) / measured)
    (inv_eff, fixed), *_ = np.linalg.lstsq(np.array(a), np.array(y), rcond=None)
    assert 1 / inv_eff == pytest.approx(cards.EFF_MEMORY, abs=0.005)
    assert fixed == pytest.approx(cards.FIXED_MS, abs=0.1)


def test_time_scales_with_the_card_rates():
    """Every part is work / (rate x the H200's share): a card with every rate halved takes
    twice as long, less the fixed cost."""
    h200 = cards.CARDS["h200"]
    half = cards.Card("half", "half", h200.capability, h200.sms, h200.smem_per_block, h200.memory_gb,
                      h200.bandwidth_gbs / 2, h200.bf16_tflops / 2, h200.fp8_tflops / 2, h200.int8_tops / 2, "test")
    for precision in ("bf16", "fp8"):
        a, b = cards.predict(h200, 2048, precision), cards.predict(half, 2048, precision)
        assert b.ms - cards.FIXED_MS == pytest.approx(2 * (a.ms - cards.FIXED_MS), rel=1e-9)
    # 8-bit GEMMs cost less than bf16 ones, attention the same
    p16, p8 = cards.predict("rtx4090", 2048, "bf16"), cards.predict("rtx4090", 2048, "fp8")
    assert p8.ms < p16.ms and p8.parts_ms["attention"] == p16.parts_ms["attention"]


def test_precisions_follow_the_capability():
    assert cards.get_card("rtx3090").precisions() == ("bf16", "int8")       # sm_86: no e4m3
    assert cards.get_card("a100").precisions() == ("bf16", "int8")
    assert cards.get_card("4090").precisions() == ("bf16", "fp8", "int8")
    assert cards.get_card("GeForce RTX 5090").capability == (12, 0)
    with pytest.raises(ValueError, match="no fp8 tensor cores"):
        cards.predict("rtx3090", 1024, "fp8")
    with pytest.raises(ValueError, match="expected one of"):
        cards.get_card("rtx5080")


def test_card_shared_memory_matches_the_compile_matrix_targets():
    from bench.compile_matrix import TARGETS
    by_cap = {cap: limit for cap, limit in TARGETS.values()}
    for card in cards.CARDS.values():
        assert card.smem_per_block == by_cap[card.capability], card.key


def test_small_cards_get_the_plans_answer_not_an_error():
    p = cards.predict("rtx4060ti-8gb", 4096, "fp8")
    assert not p.fits and p.overrides == {"keep_heads": False, "band_rows": p.overrides["band_rows"], "graphs": False}
    p = cards.predict("rtx4060ti-8gb", 4096, "bf16")
    assert not p.fits and p.overrides is None and "window" in p.answer
    p = cards.predict("rtx5090", 4096, "bf16")
    assert p.fits and p.overrides == {}


def test_predict_lines_say_prediction():
    text = "\n".join(cards.predict_lines("rtx5090"))
    assert text.startswith("PREDICTION") and "2048²" in text and "int8" in text
    h200 = "\n".join(cards.predict_lines("h200"))
    assert "(measured 428 ms)" in h200


def test_memory_ladder_settings_shrink_the_estimate_and_fitting_settings_takes_the_first_that_fits():
    from pidkern.memory import estimate_memory, fitting_settings, small_card_ladder
    cfg = get_preset("flux-2k")
    rows = (2048 // cfg.patch) ** 2
    ladder = small_card_ladder(cfg, rows)
    needs = [estimate_memory(cfg, 1, 2048, 2048, **over) for _, over in ladder]
    assert needs[0] == estimate_memory(cfg, 1, 2048, 2048)
    assert all(b <= a for a, b in zip(needs, needs[1:])) and needs[-1] < needs[0]
    for i, need in enumerate(needs):
        what, over = fitting_settings(cfg, 1, 2048, 2048, need)
        assert estimate_memory(cfg, 1, 2048, 2048, **over) <= need
        assert (what, over) == next((w, o) for (w, o), n in zip(ladder, needs) if n <= need)
    assert fitting_settings(cfg, 1, 2048, 2048, needs[-1] - 1) is None


def test_cli_info_predict(capsys):
    from pidkern.cli import main
    assert main(["info", "--predict", "rtx4090"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("PREDICTION") and "GeForce RTX 4090" in out and "sm_89" in out

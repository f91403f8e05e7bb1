"""bench/device_check.py's plumbing on the CPU: stage order, the time budget, the JSON."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# a script (run as bench/device_check.py): loaded from its path, without putting bench/ on
# sys.path (its kernels.py would shadow the `kernels` package diffusers imports)
_spec = importlib.util.spec_from_file_location("device_check", ROOT / "bench" / "device_check.py")
D = sys.modules.setdefault("device_check", importlib.util.module_from_spec(_spec))   # dataclasses look it up
_spec.loader.exec_module(D)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def fake_runner(clock, spend):
    """Each stage takes spend(name, limit) seconds of the fake clock."""
    calls = []

    def runner(cmd, limit, log_path):
        name = next(s for s in STAGES if s.cmd[0] == cmd[0])
        calls.append((name.name, limit))
        clock.t += spend(name.name, limit)
        return (0, f"{name.name} done\n")
    return runner, calls


STAGES = [D.Stage(n, [n], share, opt) for n, share, opt in
          (("install", 60, False), ("launch", 45, False), ("tests", 90, False), ("suite", 150, False),
           ("attention8", 60, False), ("engine", 100, True), ("kernels", 70, True), ("parallel", 90, True))]


def test_every_stage_fits_a_roomy_budget_in_order():
    clock = Clock()
    runner, calls = fake_runner(clock, lambda name, limit: 10)
    s = D.run(STAGES, 480, runner=runner, clock=clock)
    assert [c[0] for c in calls] == [st.name for st in STAGES]
    assert all(limit == st.share for (_, limit), st in zip(calls, STAGES))
    assert s["total_s"] == 80 and all(v["rc"] == 0 for v in s["stages"].values())


def test_stages_that_use_their_whole_share_stop_the_run_within_budget():
    clock = Clock()
    runner, calls = fake_runner(clock, lambda name, limit: limit)
    s = D.run(STAGES, 480, runner=runner, clock=clock)
    assert s["total_s"] <= 480
    ran = [c[0] for c in calls]
    assert ran[:5] == ["install", "launch", "tests", "suite", "attention8"]   # the required ones first
    # 405 s spent, 75 left: the engine gets 70 (the margin kept back), then nothing is left
    assert calls[5] == ("engine", 480 - 405 - D.MARGIN_S)
    assert s["stages"]["kernels"]["note"].startswith("no time left") and s["stages"]["parallel"]["rc"] is None


def test_a_short_budget_cuts_limits_and_skips_with_a_reason():
    clock = Clock()
    runner, calls = fake_runner(clock, lambda name, limit: limit)
    s = D.run(STAGES, 120, skip={"launch"}, runner=runner, clock=clock)
    assert s["stages"]["launch"] == {"rc": None, "note": "skipped by --skip"}
    assert calls[0] == ("install", 60) and calls[1] == ("tests", 120 - 60 - D.MARGIN_S)
    assert s["total_s"] <= 120
    assert all(s["stages"][n]["note"].startswith("no time left") for n in ("suite", "attention8", "engine"))


def test_dry_run_writes_the_plan_as_json(tmp_path):
    summary = D.main(["--dry-run", "--out", str(tmp_path), "--budget-s", "480"])
    data = json.loads((tmp_path / "device_check.json").read_text())
    assert data == json.loads(json.dumps(summary))
    assert list(data["stages"])[:5] == ["install", "launch", "tests", "suite", "attention8"]
    suite = data["stages"]["suite"]["cmd"]
    rows = suite[suite.index("--rows") + 1].split(",")
    assert rows[:2] == ["fast", "fp8"] and {"release", "compile"} <= set(rows)
    assert suite[suite.index("--sizes") + 1] == "1024,2048"
    from bench.suite import ROWS
    assert ("int8" in rows) == ("int8" in ROWS)
    assert ("int8" in data["skipped"]["suite"]) != ("int8" in ROWS)
    assert data["budget_s"] == 480 and all(v["limit_s"] <= 480 for v in data["stages"].values())

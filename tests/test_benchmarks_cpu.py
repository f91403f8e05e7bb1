"""CPU micro-benchmarks tracked by pytest-benchmark in CI (few rounds: trends, not verdicts)."""
import pytest
import torch

pytest.importorskip("pytest_benchmark")

from pidkern import benchmark as pb
from pidkern.checkpoint import load_checkpoint, save_safetensors
from pidkern.config import get_preset, tiny
from pidkern.flops import decode_flops

ROUNDS = dict(rounds=3, iterations=1, warmup_rounds=1)


@pytest.fixture(scope="module")
def tiny_net():
    return pb.random_net(tiny("flux-2k"), "cpu", torch.float32)


def test_load_tiny_safetensors(benchmark, tmp_path, tiny_net):
    path = save_safetensors(tiny_net.state_dict(), tiny_net.cfg, tmp_path / "tiny.safetensors")
    state, cfg = benchmark.pedantic(load_checkpoint, args=(path,), **ROUNDS)
    assert cfg.hidden == tiny_net.cfg.hidden and set(state) == set(tiny_net.state_dict())


def test_reference_forward_tiny(benchmark, tiny_net):
    cfg = tiny_net.cfg
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 96, generator=g)
    args = (x, torch.rand(2, generator=g), torch.randn(2, cfg.max_text, cfg.text_dim, generator=g),
            torch.randn(2, cfg.latent_channels, 2, 3, generator=g), torch.rand(2, generator=g))
    with torch.no_grad():
        out = benchmark.pedantic(tiny_net, args=args, **ROUNDS)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_random_weights_tiny(benchmark):
    net = benchmark.pedantic(pb.random_net, args=(tiny("flux2-2kto4k-v1.5"), "cpu", torch.bfloat16), **ROUNDS)
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_flop_model(benchmark):
    f = benchmark.pedantic(decode_flops, args=(get_preset("flux-2k"), 1, 2048, 2048), rounds=5, iterations=10)
    assert f["total"] > 0


def test_time_graph_ms_times_on_the_host_without_cuda():
    from pidkern.timing import time_graph_ms
    calls = []
    r = time_graph_ms(lambda: calls.append(1), warmup=2, reps=4, device="cpu")
    assert r["mode"] == "host" and len(r["runs_ms"]) == 4 and len(calls) == 6


def test_engine_check_plan_runs_every_case_once():
    from bench import engine_check as ec
    want = ([("parity", c) for c in ec.FULL_CASES] + [("memory", c) for c in ec.MEMORY_CASES]
            + [("profile", ("flux-2k", 1, 2048, 2048))])
    got = ec.plan(quick=False)
    assert sorted(map(str, got)) == sorted(map(str, want))
    assert got[:3] == [("parity", ec.FULL_CASES[1]), ("memory", ec.MEMORY_CASES[1]),
                       ("profile", ("flux-2k", 1, 2048, 2048))]     # the bars' numbers first
    assert all(k in ("parity", "memory") for k, _ in ec.plan(quick=True))

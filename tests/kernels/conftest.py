import pytest
import torch

_empty, _empty_like = torch.empty, torch.empty_like


def _poisoned(t):
    if t.is_floating_point() and t.numel():
        t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def nan_poisoned_outputs(monkeypatch):
    """Every floating tensor a kernel launcher allocates with torch.empty/empty_like starts
    as NaN, so an output element no program writes fails the comparison."""
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poisoned(_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poisoned(_empty_like(*a, **k)))

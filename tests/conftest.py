import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter; the switch must be set before
# any kernel module is imported, so it lives here, at the top of the test session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda"):  # the marker, not a parametrize id that says "cuda"
            item.add_marker(skip)

import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter; the switch must be set before
# any kernel module is imported, so it lives here, at the top of the test session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Triton reads the switch when a function is decorated (its own tl.cdiv & co. at
    # `import triton`): import it now, so a test that unsets the variable for a while
    # (tests/test_bench_suite.py) cannot leave later kernels half compiled, half interpreted.
    try:
        import triton  # noqa: F401
        import pidkern.kernels._common  # noqa: F401
    except ImportError:
        pass


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda"):  # the marker, not a parametrize id that says "cuda"
            item.add_marker(skip)

"""Test setup. Without a GPU, Triton kernels run in the interpreter: TRITON_INTERPRET must be set before the
@triton.jit functions are defined, i.e. before anything imports moekernels.ops.triton.*."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One torch thread for tests of tiny ops (no oversubscription on a shared machine); restored afterwards.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def backend_or_skip(spec, backend, tensors):
    """Skip (with the dispatcher's own reasons) when ``backend`` cannot run ``tensors``."""
    from moekernels.ops.dispatch import not_supported_reasons

    reasons = not_supported_reasons(spec, backend, tensors)
    if reasons:
        pytest.skip(f"{backend} backend unavailable: " + "; ".join(reasons))

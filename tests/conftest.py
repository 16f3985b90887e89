"""Test setup. TRITON_INTERPRET must be set before triton is first imported (by torch or by us):
without an NVIDIA device the Triton kernels run in the interpreter on CPU."""

import os

if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny nets run faster on one thread (two spinning threads crawl on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits():
    """The embedded digits dataset, loaded once per test session (tests must not modify it)."""
    from mim4dd_fast.data import load_dataset

    return load_dataset("digits")

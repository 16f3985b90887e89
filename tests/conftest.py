"""Test setup. TRITON_INTERPRET must be set before triton is first imported (by torch or by us):
without an NVIDIA device the Triton kernels run in the interpreter on CPU."""

import os

if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

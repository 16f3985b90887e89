"""Whether and how Triton runs here, decided once at import for every kernel in this package.

``triton.jit`` picks the interpreter or the compiler when a kernel is decorated, i.e. when this
package is imported, so ``TRITON_INTERPRET=1`` must be set before that (tests/conftest.py does it on
machines without an NVIDIA device). Reading the variable later would disagree with the kernels.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:  # triton is a dependency, but a broken install must not break the PyTorch paths
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is installed in CI
    triton = None
    tl = None
    HAVE_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Autotuning (GPU only; the interpreter always runs one fixed tile configuration). Read at call
# time, so a test run can pin the fixed GPU configuration to save compile time.
AUTOTUNE = os.environ.get("MIM4DD_TRITON_AUTOTUNE", "1") != "0"

__all__ = ["HAVE_TRITON", "INTERPRET", "AUTOTUNE", "triton", "tl", "triton_runs_on", "device_guard"]


def triton_runs_on(t: torch.Tensor) -> bool:
    """Triton can run on this tensor's device: compiled on CUDA, or in the interpreter on CPU."""
    return HAVE_TRITON and (t.is_cuda or INTERPRET)


def device_guard(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device, which may be another)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()

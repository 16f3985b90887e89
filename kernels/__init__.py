"""Fused kernels of mim4dd_fast, importable as ``mim4dd_fast.kernels`` (never as top-level ``kernels``).

Each kernel sits beside its plain PyTorch reference (``reference.py``, the readable spec and the test
oracle) and a pure-PyTorch path with the same memory behaviour (chosen automatically on CPU);
``checks.py`` holds the argument checks and the error class, ``backend.py`` whether Triton runs here,
``critics.py`` the list of contrastive critics.
"""

from .checks import KernelArgumentError
from .contrastive import PRECISIONS, contrastive_flops, contrastive_loss
from .critics import CRITICS
from .feature_reduce import feature_reduce

__all__ = ["contrastive_loss", "contrastive_flops", "feature_reduce", "CRITICS", "PRECISIONS", "KernelArgumentError"]

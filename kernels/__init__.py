"""Fused kernels of mim4dd_fast, importable as ``mim4dd_fast.kernels`` (never as top-level ``kernels``).

Each kernel has a pure-PyTorch path with the same memory behaviour (chosen automatically on CPU) and
a plain reference in ``reference.py`` that is the readable spec and the test oracle.
"""

from .contrastive import contrastive_flops, contrastive_loss
from .feature_reduce import feature_reduce

__all__ = ["contrastive_loss", "contrastive_flops", "feature_reduce"]

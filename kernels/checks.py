"""Argument checks of the public kernel entries, and the one error class they raise.

Static checks (shapes, dtypes, choices, hyperparameters) touch no tensor data, so they are safe
inside ``torch.compile``; the label check is the only one that reads data (one host sync, forward
only). Every message is one sentence, so the CLI can print it as is.
"""

from __future__ import annotations

import math

import torch

from mim4dd_fast.errors import ConfigError

from .backend import HAVE_TRITON, INTERPRET
from .critics import CRITICS

__all__ = [
    "KernelArgumentError",
    "check_contrastive_args",
    "check_contrastive_labels",
    "check_feature_reduce_args",
    "check_triton_device",
]

REDUCTIONS = ("mean", "none")


class KernelArgumentError(ConfigError, ValueError):
    """A bad argument to a kernel entry: a ConfigError (the CLI prints it) and a ValueError."""


def _number(name: str, value, *, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        bound = "> 0" if positive else ">= 0"
        raise KernelArgumentError(f"{name} must be a finite number {bound}, got {value!r}.")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise KernelArgumentError(f"{name} must be one of {tuple(choices)}, got {value!r}.")


def check_contrastive_args(a, b, ya, yb, tau, critic, noise_ratio, neg_weight, reduction, impl, precision,
                           impls, precisions) -> None:
    """Everything about the contrastive loss's arguments that needs no tensor data."""
    err = KernelArgumentError
    if not all(isinstance(t, torch.Tensor) for t in (a, b, ya, yb)):
        raise err("a, b, ya and yb must be tensors ([N, D], [M, D], [N] and [M]).")
    if a.dim() != 2 or b.dim() != 2:
        raise err(f"a and b must be 2-D [N, D] and [M, D], got shapes {tuple(a.shape)} and {tuple(b.shape)}.")
    if a.shape[1] != b.shape[1]:
        raise err(f"a and b must have the same feature size D, got {a.shape[1]} and {b.shape[1]}.")
    if a.shape[1] == 0 or a.shape[0] == 0 or b.shape[0] == 0:
        raise err(f"a and b need at least one row and one feature column, got {tuple(a.shape)} and {tuple(b.shape)}.")
    if a.dtype != b.dtype or not a.dtype.is_floating_point:
        raise err(f"a and b must share one floating dtype, got {a.dtype} and {b.dtype}.")
    if a.device != b.device or ya.device != a.device or yb.device != a.device:
        raise err("a, b, ya and yb must all be on the same device.")
    for name, y, n in (("ya", ya, a.shape[0]), ("yb", yb, b.shape[0])):
        if y.dim() != 1 or y.shape[0] != n:
            raise err(f"{name} must be a 1-D label vector of length {n}, got shape {tuple(y.shape)}.")
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise err(f"{name} must hold integer class labels, got dtype {y.dtype}.")
    _number("tau", tau, positive=True)
    _choice("critic", critic, CRITICS)
    _choice("reduction", reduction, REDUCTIONS)
    _number("noise_ratio", noise_ratio, positive=True)
    _number("neg_weight", neg_weight, positive=False)
    _choice("impl", impl, impls)
    _choice("precision", precision, precisions)
    if impl == "triton":
        check_triton_device(a, "contrastive_loss")


def check_contrastive_labels(lowest: int, any_positive: bool) -> None:
    """Data checks, given the smallest label and whether some anchor has a positive key."""
    if lowest < 0:
        raise KernelArgumentError(f"class labels must be >= 0, got {lowest}.")
    if not any_positive:
        raise KernelArgumentError(
            "no anchor has a positive key (no label of ya occurs in yb), so the loss is undefined."
        )


def check_triton_device(x: torch.Tensor, what: str) -> None:
    """impl='triton' needs triton and a CUDA tensor (or the interpreter, set before import)."""
    if not HAVE_TRITON:
        raise KernelArgumentError(f"{what} impl 'triton' needs the triton package, which failed to import.")
    if not x.is_cuda and not INTERPRET:
        raise KernelArgumentError(
            f"{what} impl 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import on CPU); "
            "use impl 'auto' or 'chunked'."
        )


def check_feature_reduce_args(x, p, out_dtype, impl, impls) -> None:
    """feature_reduce: a 4-D floating map with non-empty H, W, an integer p >= 1, a floating out_dtype."""
    err = KernelArgumentError
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise err(f"feature_reduce expects a 4-D feature map [B, C, H, W], got {shape}; tap a convolutional layer.")
    if not x.is_floating_point():
        raise err(f"feature_reduce expects a floating-point feature map, got {x.dtype}.")
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise err(f"feature_reduce pooling size p must be an integer >= 1, got {p!r}.")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise err(f"feature_reduce needs a non-empty spatial map, got shape {tuple(x.shape)}.")
    if out_dtype is not None and not out_dtype.is_floating_point:
        raise err(f"feature_reduce out_dtype must be a floating-point dtype, got {out_dtype}.")
    if impl not in impls:
        raise err(f"Unknown feature_reduce impl {impl!r}; choose one of {', '.join(impls)}.")
    if impl == "triton":
        check_triton_device(x, "feature_reduce")

"""Opt-in bfloat16 compute for the heavy passes of a method (``precision = "bf16"`` in its settings).

"fp32" (every method's default) changes nothing. "bf16" runs the passes a method names under
``torch.autocast(dtype=torch.bfloat16)`` on CPU or CUDA: convolutions and matrix products take bfloat16
inputs (oneDNN uses AVX-512-BF16 / AMX where the CPU has them, tensor cores on CUDA) while everything
the optimisation keeps stays float32: the synthetic images, the network / student parameters, the
gradients they receive, the losses and every reduction the method itself takes (means of embeddings,
gradient distances, the trajectory-matching loss). The backward pass of an autocast forward runs in the
dtypes the forward recorded, so it is bfloat16 too. Which passes: DC's and DM's real-side forwards (and
DC's real gradient), MTT's student unroll. Accuracy and speed effects are measured per method in
docs/benchmarks.md; it is never switched on silently.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import ConfigError

PRECISIONS = ("fp32", "bf16")


def check(precision: object, method: str) -> None:
    """ConfigError (one sentence) unless ``precision`` is one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise ConfigError(f"{method} precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")


def autocast(precision: str, device: torch.device | str):
    """The context a method's heavy forward runs in: nothing for fp32, bfloat16 autocast for bf16."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)

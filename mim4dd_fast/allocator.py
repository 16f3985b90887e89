"""The C heap setting our own processes run with (glibc), and why: big tensors reused, not page-faulted afresh.

A student step at CIFAR shapes makes and frees dozens of 1-32 MiB tensors (each layer's activations and
their gradients, every step). glibc serves a request above its mmap threshold with a fresh ``mmap``; that
threshold starts at 128 KiB and only rises to the size of a larger block once freed, so same-sized
tensors keep coming from fresh pages, which the kernel must fault in and zero: an elementwise op on a
5 MiB tensor then costs several times its arithmetic (docs/benchmarks.md, "Where an MTT iteration goes").
``tune()`` raises the mmap threshold to 32 MiB (glibc's largest) and the trim threshold to 512 MiB, so
those blocks come from the heap and are reused step after step. The cost: up to 512 MiB freed at the top
of the heap may stay mapped instead of being returned to the system between steps (the peak is measured
in the benchmarks).

Our entry points call it (the CLI, bench/compare.py, our side of bench/baselines.py, study and ablation
cells); the library never changes the allocator of a program that imports it (``tune()`` is public for
that). ``MIM4DD_MALLOC=system`` leaves glibc's defaults (then everything runs as before).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from .errors import ConfigError

ENV = "MIM4DD_MALLOC"
CHOICES = ("tuned", "system")
MMAP_THRESHOLD = 32 * 2**20  # glibc caps M_MMAP_THRESHOLD at 32 MiB on 64-bit systems
TRIM_THRESHOLD = 512 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)

_applied = False


def choice() -> str:
    """The allocator setting asked for by ``MIM4DD_MALLOC`` ("tuned" when unset)."""
    value = os.environ.get(ENV, "tuned").strip().lower() or "tuned"
    if value not in CHOICES:
        raise ConfigError(f"{ENV} must be 'tuned' or 'system', got {os.environ.get(ENV)!r}.")
    return value


def tune() -> bool:
    """Apply the setting to this process (once); True when glibc's thresholds are now the tuned ones.

    False on other C libraries and platforms, or when ``MIM4DD_MALLOC=system``.
    """
    global _applied
    if choice() == "system" or not sys.platform.startswith("linux"):
        return False
    if _applied:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied

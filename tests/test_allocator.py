"""The C heap setting: opt-out and bad values, and its effect (big blocks reused instead of page-faulted afresh)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mim4dd_fast import allocator
from mim4dd_fast.errors import ConfigError

# While a fresh 5 MiB tensor is alive, how many bytes glibc holds in mmapped blocks beyond the start
# (mallinfo2().hblkhd): a block served by a fresh mmap (faulted in and zeroed by the kernel when touched)
# shows up there; one served from the heap does not. Three rounds; the largest.
PROBE = """
import ctypes, sys
from mim4dd_fast import allocator
tuned = allocator.tune()
import torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
most = 0
for _ in range(3):
    before = libc.mallinfo2().hblkhd
    block = torch.empty(5 * 2**18)  # 5 MiB of float32: above glibc's default mmap threshold (128 KiB)
    block.fill_(1.0)
    most = max(most, libc.mallinfo2().hblkhd - before)
    del block
print(tuned, most)
"""


def _probe(env_value: str) -> tuple[bool, int]:
    import os

    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, allocator.ENV: env_value})
    tuned, mapped = out.stdout.split()
    return tuned == "True", int(mapped)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and mallinfo2")
def test_tuned_heap_serves_big_tensors_from_the_heap_not_fresh_mmaps():
    tuned, mapped_tuned = _probe("tuned")
    untuned, mapped_system = _probe("system")
    assert tuned and not untuned
    assert mapped_system >= 5 * 2**20  # glibc's default: a fresh mmap for the 5 MiB tensor
    assert mapped_tuned == 0  # tuned: from the heap, reused after the first round


def test_bad_setting_is_one_sentence(monkeypatch):
    monkeypatch.setenv(allocator.ENV, "fast")
    with pytest.raises(ConfigError, match="MIM4DD_MALLOC must be 'tuned' or 'system'"):
        allocator.tune()
    monkeypatch.setenv(allocator.ENV, "System")
    assert allocator.tune() is False


def test_cli_refuses_a_bad_setting_with_exit_2(monkeypatch, capsys):
    from mim4dd_fast.cli import main

    monkeypatch.setenv(allocator.ENV, "fast")
    assert main(["show", "presets"]) == 2
    err = capsys.readouterr().err
    assert "MIM4DD_MALLOC must be 'tuned' or 'system'" in err and "Traceback" not in err

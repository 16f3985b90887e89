"""Shared by the reliability tests: a tiny run, byte snapshots of folders, one-line error checks."""

from __future__ import annotations

import shutil
from pathlib import Path

# A tiny DM run on the embedded digits (about a second of CPU): the machinery matters here, not accuracy.
TINY = """method = "dm"
dataset = "digits"
ipc = 1
iterations = 3
checkpoint_every = 1
evals = 1
[method_config]
width = 4
batch_real = 4
[eval]
epochs = 1
n_nets = 1
"""


def write_config(folder: Path, text: str = TINY, name: str = "tiny.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder``: file bytes, None for a folder (a missing folder is empty)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def error_line(captured) -> str:
    """The single stderr line of a refused command (no traceback, nothing else), without 'error: '."""
    err = captured.err
    assert "Traceback" not in err and "Traceback" not in captured.out, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    return lines[0][len("error: "):]


def last_error_line(captured) -> str:
    """The closing error line of a command that printed progress or notes first."""
    err = captured.err
    assert "Traceback" not in err and "Traceback" not in captured.out, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error: ") for line in lines) == 1, err
    return lines[-1][len("error: "):]

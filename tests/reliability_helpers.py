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


def finished_run(tmp_path_factory, text: str = TINY) -> Path:
    """A run of ``text`` distilled to the end in a fresh temporary folder (for module-scoped fixtures)."""
    from mim4dd_fast.cli import main

    tmp = tmp_path_factory.mktemp("finished")
    out = tmp / "run"
    assert main(["distill", "--config", str(write_config(tmp, text)), "--out", str(out)]) == 0
    return out


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


def killed_child(argv: list[str], mode: str, k: int) -> None:
    """Run the CLI and SIGKILL this very process at a chosen point (for the crash-and-resume test):
    ``replace``: just before the k-th atomic rename (the temp file is written, the target not yet replaced);
    ``append``: in the k-th metrics append, after half the line reached the disk; ``none``: not at all."""
    import os
    import signal
    import sys

    import torch

    torch.set_num_threads(1)
    calls = [0]

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if mode == "replace":
        real_replace = os.replace

        def replace(src, dst):
            calls[0] += 1
            if calls[0] == k:
                die()
            return real_replace(src, dst)

        os.replace = replace
    elif mode == "append":
        import json

        from mim4dd_fast import production

        real_append = production._append_jsonl

        def append(path, record):
            calls[0] += 1
            if calls[0] == k:
                line = json.dumps(record, sort_keys=True)
                with open(path, "a") as f:
                    f.write(line[: len(line) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                die()
            real_append(path, record)

        production._append_jsonl = append
    from mim4dd_fast.cli import main

    sys.exit(main(argv))

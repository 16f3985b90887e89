"""The repository stands alone and keeps method knowledge inside methods/ (docs/architecture.md)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tracked(*patterns: str) -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / line for line in out.stdout.splitlines() if (ROOT / line).is_file()]


def test_no_file_points_outside_the_repository():
    """Docs and code say what they mean here: no design notes of the team, no absolute machine paths."""
    # the team's note names and machine roots, spelled in pieces so that this file does not match itself
    notes = "|".join(re.escape(name + ".md") for name in ("DESIGN", "ANCHORS"))
    roots = "|".join("/" + root + "/" for root in ("work", r"home/\w+", r"Users/\w+"))
    outside = re.compile(f"{notes}|{roots}")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in _tracked("*.py", "*.md", "*.sh", "*.toml")
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if outside.search(line)]
    assert not hits, hits


def test_no_method_name_tests_outside_the_registry():
    """What a method needs is asked of its spec, never guessed from its name."""
    guess = re.compile(r"""startswith\(["']mtt|hasattr\([^)]*learned_lr""")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in _tracked("mim4dd_fast/*.py", "mim4dd_fast/**/*.py", "bench/*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if guess.search(line)]
    assert not hits, hits

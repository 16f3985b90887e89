"""Ablation sweeps under torchrun (CPU, gloo): cells split over ranks, gathered and reported by rank 0."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ["--method", "dm+mim", "--grid", "tau=0.1,0.5", "--seeds", "0,1", "--iterations", "1", "--evals", "1",
         "--eval-epochs", "1"]
# cell order of make_cells: product over the grid, seeds innermost
CELLS = [("0.1", 0), ("0.1", 1), ("0.5", 0), ("0.5", 1)]


def _torchrun(script: str | Path, args: list[str], nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone`` (rendezvous on a free port of its own) from the repo root."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MIM4DD_DIST_TIMEOUT": "120"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(script), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _cells(out: Path) -> dict[tuple[str, int], dict]:
    results = {}
    for path in sorted((out / "cells").glob("*.json")):
        r = json.loads(path.read_text())
        results[(r["params"]["tau"], r["seed"])] = {**r, "_file": path}
    return results


def _bench_ablate():
    spec = importlib.util.spec_from_file_location("bench_ablate", ROOT / "bench" / "ablate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torchrun_sweep_splits_cells_gathers_on_rank0_and_resumes(tmp_path):
    out = tmp_path / "dist"
    proc = _torchrun("bench/ablate.py", [*SWEEP, "--out", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cells = _cells(out)
    assert sorted(cells) == sorted(CELLS)
    # round-robin over the pending cells in cell order: rank 0 runs cells 0 and 2, rank 1 cells 1 and 3
    assert [cells[c]["rank"] for c in CELLS] == [0, 1, 0, 1]
    # only rank 0 prints the header and the report line; the report lists every setting over both seeds
    assert proc.stdout.count("report:") == 1 and proc.stderr.count("4 cells (product over tau") == 1
    assert "2 ranks" in proc.stderr and "[rank" not in proc.stderr
    report = (out / "report.md").read_text()
    assert "torchrun --nproc-per-node 2 bench/ablate.py" in report
    for tau in ("0.1", "0.5"):
        row = next(line for line in report.splitlines() if line.startswith(f"| tau={tau} |"))
        assert row.split("|")[5].strip() == "2"  # n = 2 evaluation nets (one per seed)
    assert (out / "tau.png").read_bytes()[:4] == b"\x89PNG"

    # resume in ONE process: only rank 1's cells (deleted) are recomputed, to the same numbers (same seeds,
    # one thread per cell); rank 0's cached cells are not touched
    original = {c: dict(cells[c]) for c in CELLS}
    kept = {c: cells[c]["_file"].read_bytes() for c in CELLS[::2]}
    for c in CELLS[1::2]:
        cells[c]["_file"].unlink()
    assert _bench_ablate().main([*SWEEP, "--out", str(out)]) == 0
    cells = _cells(out)
    assert {c: cells[c]["_file"].read_bytes() for c in CELLS[::2]} == kept
    for c in CELLS[1::2]:
        assert cells[c]["rank"] == 0
        assert cells[c]["accuracies"] == original[c]["accuracies"], c
        assert cells[c]["mi_est"] == pytest.approx(original[c]["mi_est"], rel=1e-6, abs=1e-9), c
        assert cells[c]["final_loss"] == pytest.approx(original[c]["final_loss"], rel=1e-6), c

    # resume under torchrun: only the missing cell is recomputed, by rank 0 (the one pending cell is its share)
    kept = {c: cells[c]["_file"].read_bytes() for c in CELLS[:3]}
    cells[CELLS[3]]["_file"].unlink()
    proc = _torchrun("bench/ablate.py", [*SWEEP, "--out", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    again = _cells(out)
    assert sorted(again) == sorted(CELLS)
    assert {c: again[c]["_file"].read_bytes() for c in CELLS[:3]} == kept
    assert again[CELLS[3]]["rank"] == 0
    assert again[CELLS[3]]["accuracies"] == original[CELLS[3]]["accuracies"]
    assert proc.stdout.count("report:") == 1


FAILING_RANK = """
import os, sys
sys.path.insert(0, {bench!r})
import ablate
from mim4dd_fast import ablation
from mim4dd_fast.errors import UserError

def run_cell(cell, base, experts_dir, threads=1, archs=()):  # instant fake cells; rank 1's second one fails
    if os.environ["RANK"] == "1" and cell.seed == 1 and dict(cell.params)["tau"] == "0.5":
        raise UserError("boom on purpose.")
    return {{"params": dict(cell.params), "seed": cell.seed, "accuracy_mean": 0.5, "accuracy_std": 0.0,
            "accuracies": [0.5], "mi_est": {{}}, "final_loss": 1.0, "mim_loss": 0.5, "distill_seconds": 0.0}}

ablation.run_cell = run_cell
sys.exit(ablate.main())
"""


def test_a_failing_cell_on_rank1_stops_the_sweep_and_keeps_finished_cells(tmp_path):
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK.format(bench=str(ROOT / "bench")))
    out = tmp_path / "out"
    proc = _torchrun(script, [*SWEEP, "--out", str(out)])
    assert proc.returncode != 0
    text = " ".join((proc.stdout + proc.stderr).split())  # rich wraps long lines at 80 columns in a pipe
    assert "[rank 1] error: boom on purpose." in text  # the failing rank: its own sentence, rank prefix
    # rank 0's summary ("rank 1 failed on cell ...") is best effort here: torchrun stops rank 0 as soon as
    # rank 1 has exited; tests/test_ablate.py checks that sentence in-process
    assert "report:" not in proc.stdout and not (out / "report.md").exists()
    # the three cells that did finish (rank 0's two, rank 1's first) are cached for the rerun
    assert sorted(_cells(out)) == sorted(CELLS[:3])


def test_workers_with_torchrun_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = _bench_ablate().main([*SWEEP, "--workers", "2", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "[rank 0] error: --workers > 1 cannot be combined with torchrun" in err
    assert not (tmp_path / "cells").exists()


def test_help_documents_torchrun_and_workers(capsys):
    assert _bench_ablate().main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "torchrun --standalone --nproc-per-node N bench/ablate.py" in text
    assert "--workers > 1 cannot be combined with torchrun" in text and "--dist-timeout" in text

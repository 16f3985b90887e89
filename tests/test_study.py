"""The evidence study: its --quick plan runs end to end (tiny budget), resumes from its cache, and the report
states what the statistics say; the choice of a default follows the protocol's rule."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from mim4dd_fast.stats import mean_ci, sweep_effects
from mim4dd_fast.study import Part, choose_default, plan

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


def _study():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_study", ROOT / "bench" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_default_plan_covers_the_issue():
    parts = plan()
    methods = {(p.dataset, p.ipc, p.method) for p in parts if p.kind == "methods"}
    assert methods == {(d, i, m) for d in ("digits", "mnist5k") for i in (1, 10)
                       for m in ("dc", "dc+mim", "dm", "dm+mim", "mtt", "mtt+mim")}
    assert all(set(p.archs) == {"mlp", "lenet", "resnet18"} for p in parts if p.kind == "methods")
    swept = {(p.dataset, k) for p in parts if p.kind == "sweep" for k in p.grid}
    assert {("digits", k) for k in ("lambda", "tau", "head", "critic", "n_real")} <= swept
    assert {("mnist5k", "layers"), ("mnist5k", "beta")} <= swept
    lam = next(p for p in parts if p.kind == "sweep" and "lambda" in p.grid).grid["lambda"]
    assert lam == ["0", "0.03", "0.1", "0.3", "1", "3", "10"]
    assert any(p.kind == "lambda_x_lr" and set(p.grid) == {"lambda", "lr_img"} for p in parts)


def test_quick_study_smoke(tmp_path):
    """--quick with a tiny budget: every part runs, the report and the cells exist; a rerun is all cache."""
    study = _study()
    out, report = tmp_path / "study", tmp_path / "docs" / "results.md"
    argv = ["--quick", "--seeds", "2", "--iterations", "2", "--eval-epochs", "2", "--workers", "1",
            "--out", str(out), "--report", str(report)]
    assert study.main(argv) == 0
    text = report.read_text()
    assert "Each base method with and without the term" in text and "lambda (default" in text
    assert "python bench/study.py --quick" in text
    cells = json.loads((out / "study.json").read_text())
    assert len(cells["methods/digits/ipc1/mtt+mim"]) == 2 and len(cells["sweep/digits/ipc1/mtt+mim"]) == 6
    assert all(0 <= c["val_accuracy_mean"] <= 1 and "mlp" in c["archs"] for c in cells["methods/digits/ipc1/dm"])
    assert (report.parent / "img" / "results" / "methods.png").exists()
    before = sorted(p.stat().st_mtime_ns for p in (out / "cells").glob("*.json"))
    assert study.main(argv) == 0  # resumed: nothing recomputed
    assert sorted(p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")) == before


def _row(values: dict[str, list[float]], default: str) -> dict:
    return {"param": "lambda", "default": default, "values": list(values), "effects": sweep_effects(values, default),
            "val": {v: mean_ci(x) for v, x in values.items()}}


def test_a_default_changes_only_for_a_detectable_gain():
    noise = [0.01, -0.02, 0.015, -0.005, 0.0, 0.012]
    flat = {"0.1": [0.80 + e for e in noise], "1": [0.801 + e * 1.1 for e in noise[::-1]]}
    assert choose_default(_row(flat, "0.1"))[0] == "0.1"  # best by a hair, not detectable: kept
    better = {"0.1": [0.80 + e for e in noise], "1": [0.85 + e + 0.001 * i for i, e in enumerate(noise)]}
    value, why = choose_default(_row(better, "0.1"))
    assert value == "1" and "beats the default" in why


def test_parts_have_distinct_names():
    for quick in (False, True):
        parts = plan(quick)
        assert all(isinstance(p, Part) for p in parts) and len({p.name for p in parts}) == len(parts)

"""Ablation suite: grid parsing, resume without recomputation, report writer, one real tiny sweep."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mim4dd_fast import ablation
from mim4dd_fast.ablation import Cell, cell_key, make_cells, parse_grid_args, parse_grid_file, setting_for
from mim4dd_fast.distributed import Dist, DistributedError
from mim4dd_fast.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _bench_ablate():
    spec = importlib.util.spec_from_file_location("bench_ablate", ROOT / "bench" / "ablate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grid_parser_translates_values():
    grid = parse_grid_args(["tau=0.05,0.1,0.5", "beta=uniform,geometric:0.5,1/2/3", "critic=infonce,nce:4"])
    assert grid == {"tau": ["0.05", "0.1", "0.5"], "beta": ["uniform", "geometric:0.5", "1/2/3"],
                    "critic": ["infonce", "nce:4"]}
    assert setting_for("beta", "geometric:0.5") == {"mim": {"beta": "geometric", "beta_value": 0.5}}
    assert setting_for("beta", "1/2/3") == {"mim": {"beta_list": [1.0, 2.0, 3.0]}}
    assert setting_for("critic", "nce:4") == {"mim": {"critic": "nce", "noise_ratio": 4.0}}
    assert setting_for("head", "mlp:64") == {"mim": {"head": "mlp", "head_width": 64}}
    assert setting_for("lambda", "0") == {"mim": {"lam": 0.0}}
    assert setting_for("syn_steps", "20") == {"method_config": {"syn_steps": 20}}
    assert setting_for("layers", "blocks.0+blocks.1") == {"mim": {"layers": ["blocks.0", "blocks.1"]}}


@pytest.mark.parametrize("item, message", [
    ("temperature=0.1", "Unknown grid parameter"),
    ("tau=", "empty list"),
    ("tau=,,", "empty list"),
    ("tau=abc", "not a valid float"),
    ("tau=-1", "Grid value '-1' for 'tau': MIM tau must be greater than 0"),
    ("tau=nan", "finite"),
    ("n_real=2.5", "not a valid int"),
    ("head=transformer", "Grid value 'transformer' for 'head': Unknown MIM head 'transformer'; choose one of: "
                         "identity, linear, mlp"),
    ("tau", "name=value"),
])
def test_bad_grids_are_clear_errors(item, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid_args([item])


def test_grid_file(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('[grid]\ntau = [0.05, 0.1]\nbeta = ["uniform", "geometric:2"]\n')
    assert parse_grid_file(path) == {"tau": ["0.05", "0.1"], "beta": ["uniform", "geometric:2"]}
    path.write_text("tau = [1]\n")
    with pytest.raises(ConfigError, match=r"\[grid\]"):
        parse_grid_file(path)


def test_cells_product_and_one_at_a_time():
    grid = {"tau": ["0.1", "0.5"], "head": ["linear", "mlp", "identity"]}
    assert len(make_cells(grid, [0, 1])) == 2 * 3 * 2
    oat = make_cells(grid, [0], one_at_a_time=True)
    assert [c.params for c in oat] == [(("tau", "0.1"),), (("tau", "0.5"),), (("head", "linear"),),
                                       (("head", "mlp"),), (("head", "identity"),)]


def _fake_result(cell: Cell, acc: float) -> dict:
    return {"params": dict(cell.params), "seed": cell.seed, "accuracy_mean": acc, "accuracy_std": 0.01,
            "accuracies": [acc - 0.01, acc + 0.01], "mi_est": {"mi_est/blocks.0": 0.5, "mi_est/blocks.1": 0.8},
            "final_loss": 0.1, "mim_loss": 0.2, "distill_seconds": 1.0}


def test_resume_skips_finished_cells(tmp_path, monkeypatch):
    base = {"method": "dm+mim", "iterations": 1}
    cells = make_cells({"tau": ["0.1", "0.5"]}, [0])
    calls = []

    def fake_run_cell(cell, base_, experts_dir, threads=1, archs=()):
        calls.append(cell)
        if len(calls) == 2:
            raise KeyboardInterrupt  # interrupted during the second cell
        return _fake_result(cell, 0.5)

    monkeypatch.setattr(ablation, "run_cell", fake_run_cell)
    with pytest.raises(KeyboardInterrupt):
        ablation.run_sweep(cells, base, tmp_path)
    assert (tmp_path / "cells" / f"{cell_key(cells[0], base)}.json").exists()
    calls.clear()
    monkeypatch.setattr(ablation, "run_cell",
                        lambda c, b, e, threads=1, archs=(): (calls.append(c), _fake_result(c, 0.6))[1])
    results = ablation.run_sweep(cells, base, tmp_path)
    assert calls == [cells[1]]  # the finished cell was not recomputed
    assert [r["accuracy_mean"] for r in results] == [0.5, 0.6]


def test_report_on_a_fake_sweep_states_paired_effects(tmp_path):
    """Three seeds, tau=0.5 better than the default tau=0.1 by 2, 3 and 4 points on validation: the report
    gives the mean over seeds with its interval, the paired difference (mean 3 points) and a no-effect test."""
    grid = {"tau": ["0.1", "0.5"]}
    cells = make_cells(grid, [0, 1, 2], one_at_a_time=True)
    results = []
    for c in cells:
        r = _fake_result(c, 0.70 + 0.01 * c.seed)
        r["val_accuracy_mean"] = 0.60 + 0.01 * c.seed + (0.01 * (2 + c.seed) if c.params == (("tau", "0.5"),) else 0)
        results.append(r)
    base = {"method": "dm+mim"}  # tau's default, 0.1, is one of the values
    path = ablation.write_report(results, grid, tmp_path, title="t", command="python bench/ablate.py x",
                                 one_at_a_time=True, base=base)
    text = path.read_text()
    assert "| tau=0.1 | 61.00 ± 2.48 [58.52, 63.48] | 71.00 ± 2.48 [68.52, 73.48] | 3 |" in text
    assert "### tau (default 0.1)" in text and "| tau=0.5 | +3.00 ± 2.48 [0.52, 5.48]" in text
    assert "blocks.1: 0.800" in text and "python bench/ablate.py x" in text and "sensitivity" not in text
    assert (tmp_path / "tau.png").read_bytes()[:4] == b"\x89PNG"


def test_two_parameter_grid_writes_heatmap(tmp_path):
    grid = {"tau": ["0.1", "0.5"], "head": ["linear", "mlp"]}
    cells = make_cells(grid, [0])
    results = [_fake_result(c, 0.5 + 0.1 * i) for i, c in enumerate(cells)]
    ablation.write_report(results, grid, tmp_path, title="t", command="c", one_at_a_time=False)
    assert (tmp_path / "heatmap.png").exists()


def test_cli_bad_grid_exit_code(tmp_path, capsys):
    bench = _bench_ablate()
    assert bench.main(["--grid", "bogus=1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Unknown grid parameter" in err and "Traceback" not in err


def test_real_two_cell_sweep_tiny_budget(tmp_path):
    bench = _bench_ablate()
    out = tmp_path / "sweep"
    code = bench.main(["--method", "dm+mim", "--grid", "tau=0.1,0.5", "--seeds", "0", "--iterations", "2",
                       "--evals", "1", "--eval-epochs", "2", "--out", str(out)])
    assert code == 0
    cached = sorted((out / "cells").glob("*.json"))
    assert len(cached) == 2
    for path in cached:
        result = json.loads(path.read_text())
        assert 0.0 <= result["accuracy_mean"] <= 1.0
        assert result["mi_est"] and all(v == v for v in result["mi_est"].values())
    assert "tau=0.5" in (out / "report.md").read_text()


class _FakeRanks(Dist):
    """A Dist of two ranks whose collectives are scripted: rank 0's pending list and gather are given."""

    def broadcast_object(self, obj, what=""):
        return obj if self.is_main else self.__dict__["_pending"]

    def barrier(self, what=""):
        pass

    def gather_objects(self, obj, what=""):
        self.__dict__["_sent"] = obj
        return [obj, *self.__dict__["_others"]] if self.is_main else None


def _fake_ranks(rank: int, pending=None, others=()) -> _FakeRanks:
    d = _FakeRanks(rank=rank, world_size=2, backend="gloo")
    d.__dict__.update(_pending=pending, _others=list(others))
    return d


def test_sweep_as_rank1_runs_its_round_robin_share_and_returns_none(tmp_path, monkeypatch):
    base = {"method": "dm+mim", "iterations": 1}
    cells = make_cells({"tau": ["0.1", "0.5"]}, [0, 1])
    calls = []
    monkeypatch.setattr(ablation, "run_cell",
                        lambda c, b, e, threads=1, archs=(): (calls.append(c), _fake_result(c, 0.4))[1])
    # rank 0 saw cells 0, 1 and 3 pending; rank 1 looks later (cell 1 already cached) but splits rank 0's list
    (tmp_path / "cells").mkdir()
    (tmp_path / "cells" / f"{cell_key(cells[1], base)}.json").write_text("{}")
    dist = _fake_ranks(1, pending=[0, 1, 3])
    assert ablation.run_sweep(cells, base, tmp_path, dist=dist) is None
    assert calls == [cells[1]]  # share of rank 1 of 2 in [0, 1, 3]
    sent = dist.__dict__["_sent"]
    assert sent["rank"] == 1 and sent["failure"] is None and list(sent["results"]) == [1]
    assert json.loads((tmp_path / "cells" / f"{cell_key(cells[1], base)}.json").read_text())["rank"] == 1


def test_sweep_as_rank0_merges_gathered_cells_in_order(tmp_path, monkeypatch):
    base = {"method": "dm+mim", "iterations": 1}
    cells = make_cells({"tau": ["0.1", "0.5"]}, [0])
    monkeypatch.setattr(ablation, "run_cell", lambda c, b, e, threads=1, archs=(): _fake_result(c, 0.3))
    # rank 1 ran cell 1 on a filesystem rank 0 does not see: rank 0 caches what it gathered
    other = {"rank": 1, "results": {1: {**_fake_result(cells[1], 0.9), "rank": 1}}, "failure": None}
    results = ablation.run_sweep(cells, base, tmp_path, dist=_fake_ranks(0, others=[other]))
    assert [(r["accuracy_mean"], r["rank"]) for r in results] == [(0.3, 0), (0.9, 1)]
    assert json.loads((tmp_path / "cells" / f"{cell_key(cells[1], base)}.json").read_text())["rank"] == 1


def test_sweep_as_rank0_names_a_cell_that_failed_on_another_rank(tmp_path, monkeypatch):
    base = {"method": "dm+mim", "iterations": 1}
    cells = make_cells({"tau": ["0.1", "0.5"]}, [0])
    monkeypatch.setattr(ablation, "run_cell", lambda c, b, e, threads=1, archs=(): _fake_result(c, 0.3))
    other = {"rank": 1, "results": {}, "failure": (1, "NonFiniteError: loss is NaN.")}
    with pytest.raises(DistributedError, match=r"rank 1 failed on cell tau=0.5 seed 0 \(NonFiniteError: loss is "
                                               r"NaN\.\); the cells finished before it are cached"):
        ablation.run_sweep(cells, base, tmp_path, dist=_fake_ranks(0, others=[other]))
    assert (tmp_path / "cells" / f"{cell_key(cells[0], base)}.json").exists()  # rank 0's own cell is kept


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_sweep_workers_stop_when_the_sweep_is_killed(tmp_path):
    """SIGKILL the sweep's process: its spawn workers end too, instead of running their cells for nobody."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    sweep = subprocess.Popen([sys.executable, str(ROOT / "bench" / "ablate.py"), "--workers", "2", "--out",
                              str(tmp_path / "out"), "--seeds", "0,1", "--grid", "lambda=0,1", "--iterations", "400"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 90
        while len(workers) < 2:
            assert sweep.poll() is None and time.monotonic() < deadline, "the sweep never started its workers"
            workers = [c for c in psutil.Process(sweep.pid).children(recursive=True)
                       if "spawn_main" in " ".join(c.cmdline())]
            time.sleep(0.1)
        time.sleep(1)  # past the workers' initializer
        os.kill(sweep.pid, signal.SIGKILL)
        sweep.wait()
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, [w.pid for w in alive]
    finally:
        for proc in [sweep, *workers]:
            try:
                proc.kill()
            except (OSError, psutil.Error):  # already gone
                pass

"""A new method in ONE file: registered from this test, run through the CLI, bench/compare.py and bench/ablate.py.

"Mean matching" is a deliberately tiny method: each iteration it pulls the synthetic images of every
class towards the mean of a fresh real batch of that class (an SGD step on ||mean_real - mean_syn||^2
per class), and attaches the MIM term through the base class's one mechanism on a fresh ConvNet. If
adding it needed an edit anywhere else, these tests could not pass.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mim4dd_fast.cli import main as cli_main
from mim4dd_fast.config import require
from mim4dd_fast.methods import MethodSpec, register
from mim4dd_fast.methods.base import ConvNetSettings, DistillMethod
from mim4dd_fast.methods.registry import unregister
from mim4dd_fast.models import build_model

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class MeanMatchConfig(ConvNetSettings):
    lr_img: float = 0.5
    batch_real: int = 16
    width: int = 8
    depth: int | None = None

    def validate(self) -> None:
        require(self.lr_img > 0, f"meanmatch lr_img must be positive, got {self.lr_img}.")


class MeanMatch(DistillMethod):
    name = "meanmatch"

    def __init__(self, dataset, ipc, config=None, **kwargs):
        super().__init__(dataset, ipc, config or MeanMatchConfig(), **kwargs)
        self.optimizer = torch.optim.SGD([self.images], lr=self.config.lr_img)

    def step(self) -> dict[str, float]:
        x_real, y_real = self.sample_real(self.config.batch_real)
        loss = torch.zeros(())
        for c in range(self.dataset.num_classes):
            loss = loss + (x_real[y_real == c].mean(0) - self.images[self.labels == c].mean(0)).pow(2).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        d = self.dataset
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.draw_seed())
            net = build_model(d.channels, d.num_classes, d.image_size, **self.config.model_kwargs(d))
        logs = self.add_term_gradient(net)
        self.optimizer.step()
        self.iteration += 1
        return {"loss": float(loss.detach()) / d.num_classes, **logs}


SPEC = MethodSpec(name="meanmatch", config_class=MeanMatchConfig, build=MeanMatch,
                  summary="pull each class's synthetic images towards its real mean (a test's toy)")


@pytest.fixture
def toy():
    register(SPEC)
    yield SPEC
    unregister(SPEC.name)


def _bench(name: str):
    """Import a bench script by path, as `python bench/NAME.py` would run it."""
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMALL = ["--set", "mim.n_real=4", "--set", "mim.head_width=8", "--set", "eval.epochs=2"]


def test_toy_method_through_the_cli(toy, tmp_path):
    out = tmp_path / "run"
    assert cli_main(["distill", "--method", "meanmatch+mim", "--iterations", "3", "--evals", "1",
                     "--set", "method.lr_img=0.25", *SMALL, "--out", str(out)]) == 0
    config = (out / "config.toml").read_text()
    assert 'method = "meanmatch+mim"' in config and "lr_img = 0.25" in config
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [1, 2, 3]
    assert all("mim_loss" in m for m in metrics)  # the term attached through the base class
    assert metrics[-1]["loss"] < metrics[0]["loss"]  # the toy's own loss goes down
    assert json.loads((out / "eval.json").read_text())["method"] == "meanmatch+mim"


def test_toy_method_through_compare(toy, tmp_path):
    compare = _bench("compare")
    path = tmp_path / "compare.json"
    assert compare.main(["--methods", "meanmatch,meanmatch+mim", "--iterations", "3", "--evals", "1",
                         "--eval-epochs", "2", "--set", "meanmatch+mim:mim.n_real=4", "--json", str(path)]) == 0
    rows = {r["method"]: r for r in json.loads(path.read_text())["results"]}
    assert set(rows) == {"meanmatch", "meanmatch+mim"}
    assert rows["meanmatch"]["mi_estimate"] is None and rows["meanmatch+mim"]["mi_estimate"]
    # mean matching has no matmul or conv (what FlopCounterMode counts); the term's network and heads do
    assert rows["meanmatch"]["flops_per_iter"] == 0 and rows["meanmatch+mim"]["flops_per_iter"] > 0


def test_toy_method_through_ablate(toy, tmp_path):
    ablate = _bench("ablate")
    out = tmp_path / "ablation"
    assert ablate.main(["--method", "meanmatch+mim", "--grid", "tau=0.1,0.5", "--iterations", "2", "--seeds", "0",
                        "--evals", "1", "--eval-epochs", "2", "--set", "mim.n_real=4", "--out", str(out)]) == 0
    cells = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    assert sorted(c["params"]["tau"] for c in cells) == ["0.1", "0.5"]
    assert "meanmatch+mim" in (out / "report.md").read_text()


def test_a_taken_name_is_refused(toy):
    from mim4dd_fast.errors import ConfigError

    with pytest.raises(ConfigError, match="taken"):
        register(SPEC)

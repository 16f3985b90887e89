"""The ONE place that builds a run: data, experts, method (with the MIM term), evaluation.

The CLI, the production loop (production.py), the public API (api.py) and every bench script call
``build_run``; none of them knows which method needs what: they ask the method's spec.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .distributed import SINGLE, Dist
from .errors import ConfigError
from .settings import Settings


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("Device cuda was requested but no CUDA device is available.")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"Unknown device {name!r}; choose auto, cpu or cuda.")
    return name


def default_experts_cache() -> Path:
    """Where expert trajectories are cached between runs: $MIM4DD_CACHE/experts or ~/.cache/mim4dd_fast/experts."""
    base = os.environ.get("MIM4DD_CACHE")
    return Path(base) / "experts" if base else Path.home() / ".cache" / "mim4dd_fast" / "experts"


def load_run_dataset(run):
    from .data import load_dataset

    return load_dataset(run.dataset, run.data_dir or None, image_size=run.image_size or None, zca=run.zca,
                        seed=run.seed)


def resolve_experts(settings: Settings, dataset, store: str | Path, device: str, progress=None,
                    dist: Dist = SINGLE) -> list[Tensor] | None:
    """The expert trajectories the run's method needs (None if it needs none), built or finished in
    ``store/<dataset>-<settings key>`` and verified by checksum (collective under torchrun)."""
    from .experts import ensure_experts

    plan_for = settings.choice.spec.expert_plan
    if plan_for is None:
        return None
    plan = plan_for(settings.method_config, dataset)
    return ensure_experts(dataset, store, num_experts=settings.run.num_experts,
                          epochs=settings.run.expert_epochs or plan.epochs, seed=settings.run.seed,
                          model_kwargs=plan.model_kwargs, device=device, progress=progress, dist=dist)


@dataclass
class Run:
    """A built run: its settings, data, device and method, and the evaluation protocol for its result."""

    settings: Settings
    dataset: Any
    device: str
    method: Any
    dist: Dist = SINGLE

    def step(self) -> dict[str, float]:
        """One distillation iteration; the method's log scalars."""
        return self.method.step()

    def synthetic(self) -> dict[str, Tensor]:
        """The distilled set as saved: images, labels and, when the method learns one, its step size."""
        x, y = self.method.synthetic_set()
        tensors = {"images": x, "labels": y}
        lr = self.method.learned_lr()
        if lr is not None:
            tensors["syn_lr"] = torch.tensor([float(lr)])
        return tensors

    def evaluate(self, n_nets: int | None = None, *, progress=None, dist: Dist | None = None) -> dict[str, Any]:
        """Fresh nets trained on the distilled set with the evaluation protocol, tested on the test split
        (``n_nets`` overrides ``run.evals``); collective under torchrun (ranks split the nets) unless
        ``dist`` says otherwise."""
        return self.evaluate_splits(("test",), n_nets=n_nets, progress=progress, dist=dist)["test"]

    def evaluate_splits(self, splits: tuple[str, ...] = ("test",), *, model: str | None = None,
                        n_nets: int | None = None, progress=None, dist: Dist | None = None) -> dict[str, dict]:
        """{split: summary} of the same evaluation nets tested on each split (``model`` overrides the
        evaluation architecture). Net seeds come from ``stats.evaluation_seed``, so no two distillation
        seeds ever share an evaluation net."""
        from .evaluation import evaluate_splits
        from .stats import evaluation_seed

        extra = {"model": model} if model is not None else {}
        cfg = dataclasses.replace(self.settings.eval, n_nets=n_nets or self.settings.run.evals, **extra)
        x, y = self.method.synthetic_set()
        return evaluate_splits(x, y, self.dataset, cfg, splits=splits, seed=evaluation_seed(self.settings.run.seed, 0),
                               device=self.device, lr=self.method.learned_lr(), progress=progress,
                               dist=self.dist if dist is None else dist)


def build_run(settings: Settings, *, dataset=None, device: str | None = None, experts: list[Tensor] | None = None,
              experts_dir: str | Path | None = None, progress=None, dist: Dist = SINGLE) -> Run:
    """Build everything a run needs from typed ``settings``.

    ``dataset`` and ``experts`` may be given (bench scripts pass random data and trajectories);
    otherwise the dataset is loaded from the settings and the experts are resolved in ``experts_dir``
    (default: the shared cache, ``default_experts_cache()``). ``device`` defaults to the settings'
    (``auto``: CUDA when present; under torchrun each rank its own GPU).
    """
    from .distributed import rank_device
    from .methods.registry import build_method

    run = settings.run
    if device is None:
        device = rank_device(resolve_device(run.device), dist)
    if dataset is None:
        dataset = load_run_dataset(run)
    dataset.class_index.check_ipc(run.ipc)
    if experts is None:
        experts = resolve_experts(settings, dataset, experts_dir or default_experts_cache(), device, progress, dist)
    method = build_method(run.method, dataset, run.ipc, config=settings.method_config, mim=settings.mim,
                          experts=experts, device=device, seed=run.seed, init=run.init, dist=dist)
    return Run(settings=settings, dataset=dataset, device=device, method=method, dist=dist)

"""The Python API for notebooks and other people's code (docs/api.md shows both uses).

    from mim4dd_fast import load_dataset, distill, evaluate, MIMTerm

    data = load_dataset("digits")
    result = distill("mim4dd", data, ipc=1, iterations=80)        # settings as the CLI's: presets apply
    print(evaluate(result.images, result.labels, data, lr=result.lr)["mean"])

``distill`` runs in memory (or, with ``out=``, as a resumable run directory exactly like
``mim4dd-fast distill``); both go through the same run builder as the CLI and the bench scripts.
``MIMTerm`` is the MIM4DD term as a plug-in for your own loop (see its docstring).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from .data import Dataset, load_dataset
from .evaluation import EvalConfig, evaluate_synthetic
from .runner import Run, build_run, resolve_device
from .settings import Settings, merge_layers, parse_overrides, resolve_settings


@dataclass
class Distilled:
    """A distilled set: images and labels (CPU), the learned student step size (None unless the method
    learns one), one dict of log scalars per iteration, the typed settings, and the live run (step it more)."""

    images: Tensor
    labels: Tensor
    lr: float | None
    history: list[dict[str, float]]
    settings: Settings
    run: Run | None = field(default=None, repr=False)

    def evaluate(self, n_nets: int | None = None, **eval_settings: Any) -> dict[str, Any]:
        """The run's own evaluation (as ``mim4dd-fast distill`` reports it; ``eval_settings`` override
        ``settings.eval``)."""
        from .stats import evaluation_seed

        dataset = self.run.dataset if self.run is not None else self.settings.run.dataset
        cfg = dataclasses.replace(self.settings.eval, **eval_settings)
        return evaluate(self.images, self.labels, dataset, lr=self.lr, n_nets=n_nets or self.settings.run.evals,
                        seed=evaluation_seed(self.settings.run.seed, 0), device=self.settings.run.device,
                        config=cfg)


def distill(method: str = "mim4dd", dataset: str | Dataset = "digits", *, ipc: int = 1,
            iterations: int | None = None, seed: int = 0, device: str = "auto", preset: str | None = None,
            settings: dict[str, Any] | None = None, overrides: list[str] | None = None, out: str | Path | None = None,
            resume: bool = False, progress: bool = True) -> Distilled:
    """Distil ``dataset`` (a name or a loaded Dataset) with ``method``; settings resolve as in the CLI.

    ``settings`` is a layer in config.toml's shape (``{"mim": {"tau": 0.2}, "method_config": {...}}``) and
    ``overrides`` takes the CLI's ``--set`` items (``["mim.tau=0.2"]``); both override the method/dataset/IPC
    preset. With ``out`` the run is a checkpointed, resumable run directory (``resume=True`` continues one).
    """
    given = dataset if isinstance(dataset, Dataset) else None
    flags: dict[str, Any] = {"method": method, "dataset": given.name if given else dataset, "ipc": ipc, "seed": seed,
                             "device": device, **({"iterations": iterations} if iterations is not None else {})}
    _, resolved = resolve_settings(merge_layers(flags, settings or {}), parse_overrides(overrides or []), preset=preset)
    if out is not None:
        return _distill_to_directory(resolved, Path(out), resume, given, iterations)
    run = build_run(resolved, dataset=given)
    history = []
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"distill {resolved.run.method}", total=resolved.run.iterations)
        for _ in range(resolved.run.iterations):
            history.append({k: float(v) for k, v in run.step().items()})
            bar.advance(task)
    tensors = run.synthetic()
    lr = float(tensors["syn_lr"][0]) if "syn_lr" in tensors else None
    return Distilled(tensors["images"], tensors["labels"], lr, history, resolved, run)


def _distill_to_directory(settings: Settings, out: Path, resume: bool, given: Dataset | None,
                          iterations: int | None) -> Distilled:
    import json

    from .errors import ConfigError
    from .io import load_tensors
    from .production import distill as production_distill
    from .production import load_settings_from_run

    if given is not None:
        raise ConfigError("A run directory reloads its dataset by name; pass the dataset's name with out=.")
    if resume:  # the run's own settings; only the iteration budget may grow, as with the CLI
        saved = load_settings_from_run(out)
        run = saved.run if iterations is None else dataclasses.replace(saved.run, iterations=iterations)
        settings = dataclasses.replace(saved, run=run)
    production_distill(settings, out, resume=resume)
    tensors = load_tensors(out / "synthetic.safetensors")
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    lr = float(tensors["syn_lr"][0]) if "syn_lr" in tensors else None
    return Distilled(tensors["images"], tensors["labels"], lr, history, settings)


def evaluate(images: Tensor, labels: Tensor, dataset: str | Dataset, *, lr: float | None = None,
             n_nets: int = 5, seed: int = 0, device: str = "auto", config: EvalConfig | None = None,
             **eval_settings: Any) -> dict[str, Any]:
    """Train ``n_nets`` fresh nets on (images, labels) with the evaluation protocol and test them.

    ``dataset`` is the real data the set stands for (a name, or a loaded Dataset); ``lr`` the student
    step size a method learned (MTT), else the protocol's; ``eval_settings`` are EvalConfig fields
    (epochs, batch_size, ...). Returns {"mean", "std", "accuracies"} (fractions).
    """
    data = dataset if isinstance(dataset, Dataset) else load_dataset(dataset)
    cfg = dataclasses.replace(config or EvalConfig(), n_nets=n_nets, **eval_settings)
    return evaluate_synthetic(images, labels, data, cfg, seed=seed, device=resolve_device(device), lr=lr)

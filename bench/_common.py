"""Helpers shared by the bench scripts: argument errors as one sentence, random data, formatting."""

from __future__ import annotations

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing: `python bench/compare.py`
    sys.path.insert(0, str(ROOT))


# The library's one-sentence flag errors; mim4dd_fast.errors.run_command turns them into exit code 2.
from mim4dd_fast.errors import FlagError as ArgError  # noqa: E402, F401
from mim4dd_fast.errors import OneSentenceParser as Parser  # noqa: E402, F401


def random_dataset(name: str = "random-cifar10", *, n_per_class: int = 300, channels: int = 3, size: int = 32,
                   classes: int = 10, seed: int = 0):
    """A Dataset of Gaussian images shaped like CIFAR-10 (for cost measurements only: no accuracy)."""
    import torch

    from mim4dd_fast.data import Dataset

    g = torch.Generator().manual_seed(seed)
    n = n_per_class * classes
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = torch.randn(n, channels, size, size, generator=g)
    xt = torch.randn(classes * 10, channels, size, size, generator=g)
    yt = torch.arange(classes).repeat_interleave(10)
    xv = torch.randn(classes * 10, channels, size, size, generator=g)
    return Dataset(name=name, x_train=x, y_train=y, x_val=xv, y_val=yt.clone(), x_test=xt, y_test=yt,
                   class_names=[str(i) for i in range(classes)], mean=(0.0,) * channels, std=(1.0,) * channels)


def random_experts(dataset, plan, *, num: int = 1, seed: int = 0):
    """Random-walk 'trajectories' of the right shape for cost measurements (MTT's cost does not depend
    on the values); ``plan`` is the method's ExpertPlan. Real distillation uses ``mim4dd_fast.experts``."""
    import torch

    from mim4dd_fast.models import build_model, flatten_params

    out = []
    for k in range(num):
        torch.manual_seed(seed + k)
        net = build_model(dataset.channels, dataset.num_classes, dataset.image_size, **plan.model_kwargs)
        start = flatten_params(net)
        steps = torch.randn(plan.epochs, start.numel(), generator=torch.Generator().manual_seed(seed + k))
        out.append(torch.cat([start[None], start[None] + 0.01 * steps.cumsum(0)]))
    return out


def mib(n: float | None) -> str:
    return "-" if n is None or not math.isfinite(n) else f"{n / 2**20:,.1f}"


def si(n: float | None, unit: str = "") -> str:
    """1.23 G style."""
    if n is None or not math.isfinite(n):
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {prefix}{unit}"
    return f"{n:.3g} {unit}".strip()


def write_json_result(path: str | Path, result: dict) -> None:
    """Write a bench result as indented JSON (creating the folder; atomically, so an earlier result is never left
    half-overwritten) and say where."""
    import json

    from mim4dd_fast.io import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    print(f"written {path}")

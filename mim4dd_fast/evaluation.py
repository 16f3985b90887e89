"""The evaluation protocol: train fresh ConvNets on a (synthetic) training set, test on the real test split.

As the originals (DC/DSA/DM ``evaluate_synset``, MTT's evaluation): SGD with momentum 0.9 and weight
decay 5e-4, the learning rate divided by 10 once at the midpoint epoch, per-sample DSA on every
minibatch, cross-entropy; the score is the accuracy of each net on the full test split, reported as
mean and population standard deviation over ``n_nets`` nets with seeds ``seed, seed + 1, ...``.
Each net is deterministic given its seed, and the caller's RNG state is left untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import dsa as dsa_augment
from .config import Validated, require
from .data import Dataset
from .distributed import SINGLE, Dist
from .errors import DataError
from .models import build_model

TEST_BATCH = 1024  # images per no_grad forward at test time (memory only; results do not depend on it)


@dataclass
class EvalConfig(Validated):
    """How each evaluation net is trained (the originals' protocol; see docs/method.md).

    ``epochs`` defaults to 100, not the originals' 300 (DC) / 1000 (MTT, DM): on the embedded digits
    set (8x8, ConvNet-2) any set of up to ``batch_size`` images is one minibatch, so an epoch is one
    SGD step, and 100 steps already reach the accuracy plateau there (measured in the docs) while
    5 nets stay well under a minute on 2 CPU cores. For CIFAR-sized data pass
    the originals' value (``--epochs 300`` or ``1000``).
    """

    epochs: int = 100
    lr: float = 0.01
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dsa: bool = True
    n_nets: int = 5
    width: int = 128
    depth: int | None = None

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "n_nets", "width"):
            value = getattr(self, name)
            require(_is_int(value) and value >= 1, f"eval {name} must be an integer of at least 1, got {value!r}.")
        require(self.depth is None or (_is_int(self.depth) and self.depth >= 1),
                f"eval depth must be an integer of at least 1 (or unset for the default), got {self.depth!r}.")
        require(_positive(self.lr), f"eval lr must be a positive finite number, got {self.lr!r}.")
        require(_finite(self.momentum) and 0.0 <= self.momentum < 1.0,
                f"eval momentum must be in [0, 1), got {self.momentum!r}.")
        require(_finite(self.weight_decay) and self.weight_decay >= 0.0,
                f"eval weight_decay must be a finite number >= 0, got {self.weight_decay!r}.")
        require(isinstance(self.dsa, bool), f"eval dsa must be true or false, got {self.dsa!r}.")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v: object) -> bool:
    return _finite(v) and v > 0


def epoch_lr(epoch: int, epochs: int, lr: float) -> float:
    """Learning rate of epoch ``epoch`` (0-based): ``lr`` before the midpoint ``epochs // 2``, lr/10 from it."""
    return lr * 0.1 if epochs >= 2 and epoch >= epochs // 2 else lr


def _check_train_set(x: Tensor, y: Tensor, dataset: Dataset) -> None:
    shape = (dataset.channels, dataset.image_size, dataset.image_size)
    if x.dim() != 4 or tuple(x.shape[1:]) != shape:
        raise DataError(f"Training images have shape {tuple(x.shape)}, expected [N, {', '.join(map(str, shape))}] "
                        f"for dataset {dataset.name!r}.")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"Got {tuple(y.shape)} labels for {x.shape[0]} training images; expected one label per image.")
    if x.shape[0] == 0:
        raise DataError("The training set to evaluate is empty.")
    if y.dtype.is_floating_point or int(y.min()) < 0 or int(y.max()) >= dataset.num_classes:
        raise DataError(f"Training labels must be integers in [0, {dataset.num_classes - 1}].")
    if not bool(torch.isfinite(x).all()):
        raise DataError("Training images contain NaN or Inf values.")


def train_net(
    x: Tensor,
    y: Tensor,
    dataset: Dataset,
    cfg: EvalConfig,
    *,
    seed: int,
    device: str | torch.device = "cpu",
    lr: float | None = None,
    on_epoch: Callable[[int, torch.optim.Optimizer], None] | None = None,
) -> nn.Module:
    """A fresh ConvNet trained on (x, y) with the protocol; ``on_epoch(epoch, optimizer)`` runs before each epoch.

    The net's initialisation comes from the CPU generator seeded with ``seed`` inside ``fork_rng`` (built
    on CPU, so it does not depend on the device); shuffling and DSA draw from a local CPU generator.
    """
    device = torch.device(device)
    base_lr = cfg.lr if lr is None else float(lr)
    require(_positive(base_lr), f"eval lr must be a positive finite number, got {lr!r}.")
    x = x.detach().to(device=device, dtype=torch.float32)
    y = y.detach().to(device=device, dtype=torch.int64)
    # The net is built on CPU, so seeding (and restoring) only the CPU generator is enough.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        net = build_model(dataset.channels, dataset.num_classes, dataset.image_size, width=cfg.width, depth=cfg.depth)
    net = net.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    n = x.shape[0]
    for epoch in range(cfg.epochs):
        for group in opt.param_groups:
            group["lr"] = epoch_lr(epoch, cfg.epochs, base_lr)
        if on_epoch is not None:
            on_epoch(epoch, opt)
        order = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            xb = x[idx]
            if cfg.dsa:
                xb = dsa_augment(xb, generator=gen)
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def split_accuracy(net: nn.Module, dataset: Dataset, device: str | torch.device = "cpu") -> float:
    """Fraction of ``dataset.x_test`` classified correctly, in batches of TEST_BATCH."""
    correct = 0
    for start in range(0, dataset.x_test.shape[0], TEST_BATCH):
        xb = dataset.x_test[start : start + TEST_BATCH].to(device)
        yb = dataset.y_test[start : start + TEST_BATCH].to(device)
        correct += int((net(xb).argmax(1) == yb).sum())
    return correct / max(1, dataset.x_test.shape[0])


def train_and_test(
    x_syn: Tensor,
    y_syn: Tensor,
    dataset: Dataset,
    cfg: EvalConfig,
    *,
    seed: int,
    device: str | torch.device = "cpu",
    lr: float | None = None,
) -> float:
    """Test accuracy (fraction) of one fresh net trained on (x_syn, y_syn); ``lr`` overrides ``cfg.lr``."""
    _check_train_set(x_syn, y_syn, dataset)
    net = train_net(x_syn, y_syn, dataset, cfg, seed=seed, device=device, lr=lr)
    return split_accuracy(net, dataset, device)


def _summary(accs: list[float]) -> dict:
    # Population std (numpy's default ddof=0), as the originals report it.
    return {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "accuracies": [float(a) for a in accs]}


def evaluate_synthetic(
    x_syn: Tensor,
    y_syn: Tensor,
    dataset: Dataset,
    cfg: EvalConfig | None = None,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    lr: float | None = None,
    progress: Callable[[int, float], None] | None = None,
    dist: Dist = SINGLE,
) -> dict:
    """Train ``cfg.n_nets`` fresh nets (seeds seed, seed+1, ...) on the set; mean/std/list of accuracies.

    ``progress(i, acc)`` is called after net ``i`` (0-based) with its accuracy. Under torchrun (a
    collective call) rank r trains nets r, r + N, ...; net i depends only on its seed, so the gathered
    list is the one-process list.
    """
    cfg = cfg or EvalConfig()
    _check_train_set(x_syn, y_syn, dataset)
    mine = []
    for i in dist.owned(range(cfg.n_nets)):
        acc = train_and_test(x_syn, y_syn, dataset, cfg, seed=seed + i, device=device, lr=lr)
        mine.append((i, acc))
        if progress is not None:
            progress(i, acc)
    gathered = dist.all_gather_objects(mine, "gathering the evaluation accuracies")
    return _summary([acc for _, acc in sorted(pair for part in gathered for pair in part)])


def random_subset(dataset: Dataset, ipc: int, seed: int) -> tuple[Tensor, Tensor]:
    """``ipc`` random real training images per class (class-major) from a generator seeded with ``seed``."""
    dataset.class_index.check_ipc(ipc)
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat([dataset.class_index.sample(c, ipc, gen) for c in range(dataset.num_classes)])
    y = torch.arange(dataset.num_classes).repeat_interleave(ipc)
    return x, y


def random_baseline(
    dataset: Dataset,
    ipc: int,
    cfg: EvalConfig | None = None,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[int, float], None] | None = None,
) -> dict:
    """The "random real subset" baseline: net ``i`` trains on its own fresh subset drawn with seed ``seed + i``.

    A fresh subset per net makes the std cover the choice of subset as well as the net's initialisation.
    """
    cfg = cfg or EvalConfig()
    dataset.class_index.check_ipc(ipc)
    accs = []
    for i in range(cfg.n_nets):
        x, y = random_subset(dataset, ipc, seed + i)
        acc = train_and_test(x, y, dataset, cfg, seed=seed + i, device=device)
        accs.append(acc)
        if progress is not None:
            progress(i, acc)
    return _summary(accs)

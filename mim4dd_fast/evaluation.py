"""The evaluation protocol: train fresh nets on a (synthetic) training set, test them on a real split.

As the originals (DC/DSA/DM ``evaluate_synset``, MTT's evaluation): SGD with momentum 0.9 and weight
decay 5e-4, the learning rate divided by 10 once at the midpoint epoch, per-sample DSA on every
minibatch, cross-entropy; the score is the accuracy of each net on the full test split (or the
validation split), reported as mean and population standard deviation over ``n_nets`` nets with seeds
``seed, seed + 1, ...``. Each net is deterministic given its seed, and the caller's RNG state is left
untouched.

The nets are trained together (``models.StackedNets``: one grouped net, one forward/backward per step
for all of them), each with its own initialisation, shuffling and DSA draws from its own seed, so the
result is the one-by-one result up to float summation order (``nets_per_pass = 1`` runs the
one-by-one reference, ``train_net``). By default (``nets_per_pass = 0``) CPU stacks only small minibatches
(``auto_nets_per_pass``), where it is faster.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import dsa as dsa_augment
from .config import Validated, require
from .data import Dataset
from .distributed import SINGLE, Dist
from .errors import ConfigError, DataError, NonFiniteError
from .models import MODELS, NotStackable, StackedNets, build_model, has_batchnorm

TEST_BATCH = 1024  # images per no_grad forward at test time (memory only; results do not depend on it)


SPLITS = ("test", "val")


@dataclass
class EvalConfig(Validated):
    """How each evaluation net is trained (the originals' protocol; see docs/method.md).

    ``epochs`` defaults to 100, not the originals' 300 (DC) / 1000 (MTT, DM): on the embedded digits
    set (8x8, ConvNet-2) any set of up to ``batch_size`` images is one minibatch, so an epoch is one
    SGD step, and 100 steps already reach the accuracy plateau there (measured in the docs) while
    5 nets stay well under a minute on 2 CPU cores. For CIFAR-sized data pass
    the originals' value (``--epochs 300`` or ``1000``).

    ``model`` is the evaluation architecture (cross-architecture evaluation): ``convnet`` (default),
    ``mlp``, ``lenet`` or ``resnet18`` (BatchNorm); ``width`` is the ConvNet's width and the MLP's
    hidden units, ``depth`` the ConvNet's depth. ``nets_per_pass`` is how many nets train together
    in one grouped net (0 = auto: all nets of this process at once, except one by one on CPU for
    minibatches above ``STACK_MAX_IMAGES_CPU`` images; 1 = one by one); it changes speed and
    memory, not results (beyond float summation order).
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
    model: str = "convnet"
    resnet_width: int = 64  # ResNet-18's base width when model = "resnet18" (64: the originals'; 16: small)
    nets_per_pass: int = 0

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
        require(self.model in MODELS, f"eval model must be one of {', '.join(MODELS)}, got {self.model!r}.")
        require(self.depth is None or self.model == "convnet",
                f"eval depth applies to the ConvNet only; unset it for model {self.model!r}.")
        require(_is_int(self.resnet_width) and self.resnet_width >= 1,
                f"eval resnet_width must be an integer of at least 1, got {self.resnet_width!r}.")
        require(_is_int(self.nets_per_pass) and self.nets_per_pass >= 0,
                f"eval nets_per_pass must be an integer >= 0 (0 = auto), got {self.nets_per_pass!r}.")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v: object) -> bool:
    return _finite(v) and v > 0


def epoch_lr(epoch: int, epochs: int, lr: float) -> float:
    """Learning rate of epoch ``epoch`` (0-based): ``lr`` before the midpoint ``epochs // 2``, lr/10 from it."""
    return lr * 0.1 if epochs >= 2 and epoch >= epochs // 2 else lr


def split_tensors(dataset: Dataset, split: str) -> tuple[Tensor, Tensor]:
    """(images, labels) of ``dataset``'s ``split`` ("test" or "val"); DataError if the dataset has none."""
    if split not in SPLITS:
        raise ConfigError(f"Evaluation split must be one of {', '.join(SPLITS)}, got {split!r}.")
    x, y = getattr(dataset, f"x_{split}", None), getattr(dataset, f"y_{split}", None)
    what = "validation" if split == "val" else "test"
    if x is None or y is None:
        raise DataError(f"Dataset {dataset.name!r} has no {what} split; evaluate on split='test' or load a dataset "
                        f"with a {what} split.")
    if x.shape[0] == 0:
        raise DataError(f"The {what} split of dataset {dataset.name!r} is empty.")
    return x, y


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


def fresh_net(dataset: Dataset, cfg: EvalConfig, seed: int) -> nn.Module:
    """The untrained evaluation net of seed ``seed``: built on CPU from the CPU generator seeded with it.

    Built inside ``fork_rng`` (only the CPU generator: the net is built on CPU), so the caller's RNG
    state is untouched and the initialisation does not depend on the device.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return build_model(dataset.channels, dataset.num_classes, dataset.image_size, width=cfg.width,
                           depth=cfg.depth, kind=cfg.model, resnet_width=cfg.resnet_width)


def sgd(params, *, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """torch's SGD for training evaluation nets and experts, fused where torch has the kernel (CPU, CUDA).

    The fused kernel updates each parameter in one pass instead of three (weight decay, momentum,
    step), the same update up to float rounding; the optimizer step is a visible share of a step of
    small evaluation nets. Every path uses it, so one-by-one and batched nets still differ only in
    summation order.
    """
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in params)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused or None)


def _check_batchnorm_batches(net: nn.Module, n: int, cfg: EvalConfig) -> None:
    if has_batchnorm(net) and (n == 1 or n % cfg.batch_size == 1):
        raise DataError(f"Model {cfg.model!r} uses BatchNorm, which needs at least 2 images per minibatch; "
                        f"{n} training images in batches of {cfg.batch_size} leave one alone.")


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
    """One fresh net trained alone on (x, y) with the protocol: the reference for the batched path.

    ``on_epoch(epoch, optimizer)`` runs before each epoch. Initialisation: ``fresh_net``; shuffling
    and DSA draw from a local CPU generator seeded with ``seed`` (randperm each epoch, then one DSA
    call per minibatch).
    """
    device = torch.device(device)
    base_lr = cfg.lr if lr is None else float(lr)
    require(_positive(base_lr), f"eval lr must be a positive finite number, got {lr!r}.")
    x = x.detach().to(device=device, dtype=torch.float32)
    y = y.detach().to(device=device, dtype=torch.int64)
    net = fresh_net(dataset, cfg, seed)
    _check_batchnorm_batches(net, x.shape[0], cfg)
    net = net.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    opt = sgd(net.parameters(), lr=base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
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
    _check_converged(net, base_lr, lr)
    return net.eval()


def _check_converged(net: nn.Module, base_lr: float, lr: float | None) -> None:
    """A diverged net (NaN/Inf weights) is an error: it would otherwise "score" chance level."""
    if not all(bool(torch.isfinite(p).all()) for p in net.parameters()):
        source = "[eval] lr" if lr is None else "the learning rate the method learned (syn_lr)"
        raise NonFiniteError(f"An evaluation net diverged: its weights became NaN/Inf training with {source} = "
                             f"{base_lr:g}; lower it (the protocol's default is {EvalConfig.lr:g}).")


def train_stacked(
    sets: Sequence[tuple[Tensor, Tensor]],
    dataset: Dataset,
    cfg: EvalConfig,
    *,
    seeds: Sequence[int],
    device: str | torch.device = "cpu",
    lr: float | None = None,
    on_epoch: Callable[[int, torch.optim.Optimizer], None] | None = None,
) -> StackedNets:
    """Net i (seed ``seeds[i]``) trained on ``sets[i]``, all at once: ``train_net`` for each, in one grouped net.

    Every net draws from its own generator exactly as ``train_net`` does (its randperm each epoch,
    then its DSA call per minibatch), so each net sees the batches it would see alone. The loss is
    the sum of the nets' mean cross-entropies, whose gradient in net i's slice is net i's own.
    The sets must have one size (their minibatches are stacked). NotStackable if the architecture
    cannot be grouped (then train the nets one by one with ``train_net``).
    """
    device = torch.device(device)
    base_lr = cfg.lr if lr is None else float(lr)
    require(_positive(base_lr), f"eval lr must be a positive finite number, got {lr!r}.")
    if len(sets) != len(seeds) or not sets or len({x.shape[0] for x, _ in sets}) != 1:
        raise ValueError("train_stacked needs one seed per set and sets of one size")
    xs = [x.detach().to(device=device, dtype=torch.float32) for x, _ in sets]
    ys = [y.detach().to(device=device, dtype=torch.int64) for _, y in sets]
    nets = [fresh_net(dataset, cfg, s) for s in seeds]
    n = xs[0].shape[0]
    _check_batchnorm_batches(nets[0], n, cfg)
    stacked = StackedNets(nets).to(device).train()
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    opt = sgd(stacked.parameters(), lr=base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    for epoch in range(cfg.epochs):
        for group in opt.param_groups:
            group["lr"] = epoch_lr(epoch, cfg.epochs, base_lr)
        if on_epoch is not None:
            on_epoch(epoch, opt)
        orders = [torch.randperm(n, generator=g).to(device) for g in gens]
        for start in range(0, n, cfg.batch_size):
            idx = [order[start : start + cfg.batch_size] for order in orders]
            xb = [x[i] for x, i in zip(xs, idx, strict=True)]
            if cfg.dsa:
                xb = [dsa_augment(b, generator=g) for b, g in zip(xb, gens, strict=True)]
            yb = torch.stack([y[i] for y, i in zip(ys, idx, strict=True)])
            logits = stacked(torch.stack(xb))
            loss = F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none").view(len(xs), -1)
            opt.zero_grad(set_to_none=True)
            loss.mean(1).sum().backward()
            opt.step()
    _check_converged(stacked, base_lr, lr)
    return stacked.eval()


@torch.no_grad()
def split_accuracy(net: nn.Module, dataset: Dataset, device: str | torch.device = "cpu",
                   split: str = "test") -> float:
    """Fraction of the ``split`` images ("test" or "val") classified correctly, in batches of TEST_BATCH."""
    x, y = split_tensors(dataset, split)
    correct = 0
    for start in range(0, x.shape[0], TEST_BATCH):
        xb, yb = x[start : start + TEST_BATCH].to(device), y[start : start + TEST_BATCH].to(device)
        correct += int((net(xb).argmax(1) == yb).sum())
    return correct / x.shape[0]


@torch.no_grad()
def stacked_accuracies(stacked: StackedNets, dataset: Dataset, device: str | torch.device = "cpu",
                       split: str = "test") -> list[float]:
    """``split_accuracy`` of every net of the stack, in one pass over the split."""
    x, y = split_tensors(dataset, split)
    correct = torch.zeros(stacked.n, dtype=torch.int64)
    step = max(1, TEST_BATCH // stacked.n)  # the stack is n nets wide: keep the activations of one TEST_BATCH
    for start in range(0, x.shape[0], step):
        xb, yb = x[start : start + step].to(device), y[start : start + step].to(device)
        correct += (stacked.forward_shared(xb).argmax(2) == yb).sum(1).cpu()
    return [int(c) / x.shape[0] for c in correct]


def train_and_test(
    x_syn: Tensor,
    y_syn: Tensor,
    dataset: Dataset,
    cfg: EvalConfig,
    *,
    seed: int,
    device: str | torch.device = "cpu",
    lr: float | None = None,
    split: str = "test",
) -> float:
    """Accuracy (fraction) on ``split`` of one fresh net trained alone on (x_syn, y_syn); ``lr`` overrides cfg.lr."""
    _check_train_set(x_syn, y_syn, dataset)
    split_tensors(dataset, split)  # fail before training, not after
    net = train_net(x_syn, y_syn, dataset, cfg, seed=seed, device=device, lr=lr)
    return split_accuracy(net, dataset, device, split)


def _summary(accs: list[float]) -> dict:
    # Population std (numpy's default ddof=0), as the originals report it.
    return {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "accuracies": [float(a) for a in accs]}


def _accuracies(
    indices: list[int],
    make_set: Callable[[int], tuple[Tensor, Tensor]],
    dataset: Dataset,
    cfg: EvalConfig,
    *,
    seed: int,
    device: str | torch.device,
    lr: float | None,
    splits: tuple[str, ...],
    progress: Callable[[int, float], None] | None,
) -> list[tuple[int, dict[str, float]]]:
    """(i, {split: accuracy}) of net i (seed ``seed + i``, trained on ``make_set(i)``) for each i, every net
    trained once and tested on each of ``splits``; nets_per_pass at a time. ``progress(i, acc)`` gets the
    first split's accuracy."""
    for split in splits:
        split_tensors(dataset, split)  # fail before training, not after
    if not indices:
        return []
    first_set = make_set(indices[0])  # every net's set has this size: it decides the auto stacking
    per_pass = cfg.nets_per_pass or auto_nets_per_pass(len(indices), len(first_set[0]), cfg.batch_size, device)
    out: list[tuple[int, dict[str, float]]] = []
    for first in range(0, len(indices), per_pass):
        chunk = indices[first : first + per_pass]
        sets = [first_set if i == indices[0] else make_set(i) for i in chunk]
        accs: list[dict[str, float]] | None = None
        if per_pass > 1:
            try:
                stacked = train_stacked(sets, dataset, cfg, seeds=[seed + i for i in chunk], device=device, lr=lr)
                per_split = {s: stacked_accuracies(stacked, dataset, device, s) for s in splits}
                accs = [{s: per_split[s][k] for s in splits} for k in range(len(chunk))]
            except NotStackable:
                accs = None  # an architecture the stack cannot group: the one-by-one reference below
        if accs is None:
            nets = [train_net(x, y, dataset, cfg, seed=seed + i, device=device, lr=lr)
                    for i, (x, y) in zip(chunk, sets, strict=True)]
            accs = [{s: split_accuracy(net, dataset, device, s) for s in splits} for net in nets]
        for i, acc in zip(chunk, accs, strict=True):
            out.append((i, acc))
            if progress is not None:
                progress(i, acc[splits[0]])
    return out


# On CPU a stack of nets trains as grouped convolutions, which oneDNN runs well only for small minibatches:
# 5 ConvNets on digits, stacked vs one by one, 1.43-1.55x at 10 images per net, 1.11-1.18x at 20, 1.06-1.15x
# at 30, 1.10-1.14x at 50, 0.80-1.05x at 100 (bench/evaluation.py over two releases, docs/benchmarks.md
# "Batched evaluation"). Above this many images per minibatch the default (nets_per_pass = 0) trains the nets
# one by one on CPU, where stacking stops paying reliably; accelerators always stack.
STACK_MAX_IMAGES_CPU = 50


def auto_nets_per_pass(n_nets: int, n_images: int, batch_size: int, device: str | torch.device) -> int:
    """How many nets train together when ``nets_per_pass`` is 0 (auto): all of them, except on CPU when each
    net's minibatch (``min(n_images, batch_size)``) is above ``STACK_MAX_IMAGES_CPU``: then one by one."""
    if torch.device(device).type == "cpu" and min(n_images, batch_size) > STACK_MAX_IMAGES_CPU:
        return 1
    return max(1, n_nets)


def _gathered_summaries(mine: list[tuple[int, dict[str, float]]], splits: tuple[str, ...], dist: Dist,
                        what: str) -> dict[str, dict]:
    pairs = sorted(pair for part in dist.all_gather_objects(mine, what) for pair in part)
    return {s: _summary([acc[s] for _, acc in pairs]) for s in splits}


def evaluate_splits(
    x_syn: Tensor,
    y_syn: Tensor,
    dataset: Dataset,
    cfg: EvalConfig | None = None,
    *,
    splits: tuple[str, ...] = ("test",),
    seed: int = 0,
    device: str | torch.device = "cpu",
    lr: float | None = None,
    progress: Callable[[int, float], None] | None = None,
    dist: Dist = SINGLE,
) -> dict[str, dict]:
    """``evaluate_synthetic`` on several splits at once: the same trained nets tested on each (validation
    to choose settings, test for the final tables, without training the nets twice); {split: summary}."""
    cfg = cfg or EvalConfig()
    _check_train_set(x_syn, y_syn, dataset)
    mine = _accuracies(dist.owned(range(cfg.n_nets)), lambda i: (x_syn, y_syn), dataset, cfg, seed=seed,
                       device=device, lr=lr, splits=tuple(splits), progress=progress)
    return _gathered_summaries(mine, tuple(splits), dist, "gathering the evaluation accuracies")


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
    split: str = "test",
) -> dict:
    """Train ``cfg.n_nets`` fresh nets (seeds seed, seed+1, ...) on the set; mean/std/list of ``split`` accuracies.

    ``progress(i, acc)`` is called after net ``i`` (0-based) with its accuracy. Under torchrun (a
    collective call) rank r trains nets r, r + N, ... (together, as one stack); net i depends only on
    its seed, so the gathered list is the one-process list.
    """
    return evaluate_splits(x_syn, y_syn, dataset, cfg, splits=(split,), seed=seed, device=device, lr=lr,
                           progress=progress, dist=dist)[split]


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
    split: str = "test",
    dist: Dist = SINGLE,
) -> dict:
    """The "random real subset" baseline: net ``i`` trains on its own fresh subset drawn with seed ``seed + i``.

    A fresh subset per net makes the std cover the choice of subset as well as the net's initialisation.
    The nets train together like ``evaluate_synthetic``'s (each on its own subset); collective under torchrun.
    """
    cfg = cfg or EvalConfig()
    dataset.class_index.check_ipc(ipc)
    mine = _accuracies(dist.owned(range(cfg.n_nets)), lambda i: random_subset(dataset, ipc, seed + i), dataset, cfg,
                       seed=seed, device=device, lr=None, splits=(split,), progress=progress)
    return _gathered_summaries(mine, (split,), dist, "gathering the random-baseline accuracies")[split]

"""The ``Dataset`` container, the per-class index and the ``load_dataset`` dispatcher."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from .zca import ZCA


@dataclass
class Dataset:
    """Train / validation / test tensors plus everything needed to undo the preprocessing for display.

    The splits are fixed (``splits``): choose hyperparameters on ``x_val``, touch ``x_test`` only for
    final tables. Normalisation and ZCA statistics come from the training split alone.
    """

    name: str
    x_train: Tensor  # float32 [N, C, H, W], normalised (and whitened when zca is set)
    y_train: Tensor  # int64 [N]
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    zca: ZCA | None = None
    skipped_files: int = 0  # undecodable images skipped by imagefolder
    _index: ClassIndex | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[-1])

    @property
    def class_index(self) -> ClassIndex:
        if self._index is None:
            self._index = ClassIndex(self.x_train, self.y_train, self.num_classes)
        return self._index

    def denormalize(self, x: Tensor) -> Tensor:
        """Back to [0, 1] pixel space: invert ZCA (if used), then the mean/std normalisation."""
        if self.zca is not None:
            x = self.zca.inverse(x)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x * std + mean).clamp(0, 1)


class ClassIndex:
    """Indices of each class's training images, so a method draws n real images of class c fast."""

    def __init__(self, x: Tensor, y: Tensor, num_classes: int) -> None:
        self.x = x
        self.indices = [torch.nonzero(y == c, as_tuple=False).flatten() for c in range(num_classes)]
        self.counts = [int(i.numel()) for i in self.indices]

    def smallest_class(self) -> int:
        return min(self.counts)

    def draw(self, c: int, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Indices of ``n`` random images of class ``c`` without replacement (all of them if n >= count)."""
        idx = self.indices[c]
        if n < idx.numel():
            idx = idx[torch.randperm(idx.numel(), generator=generator)[:n]]
        return idx

    def sample(self, c: int, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` random images of class ``c`` without replacement (all of them if n >= count)."""
        return self.x[self.draw(c, n, generator)]

    def check_ipc(self, ipc: int) -> None:
        if ipc < 1:
            raise DataError(f"IPC must be at least 1, got {ipc}.")
        smallest = self.smallest_class()
        if ipc > smallest:
            raise DataError(
                f"IPC {ipc} is larger than the smallest class, which has {smallest} training images."
            )


def _to_unit_float(x: np.ndarray) -> Tensor:
    """uint8 0..255 or float in [0, 1] -> a fresh float32 tensor in [0, 1] (safe to modify in place)."""
    if x.dtype == np.uint8:
        return torch.from_numpy(np.array(x, copy=True)).float().div_(255.0)
    return torch.tensor(np.asarray(x, dtype=np.float32))


def _finish(
    name: str,
    arrays: tuple[np.ndarray, ...],
    class_names: list[str],
    *,
    zca: bool,
    normalize: bool,
    image_size: int | None = None,
    skipped: int = 0,
    where: str = "",
) -> Dataset:
    """Turn (x_train, y_train, x_val, y_val, x_test, y_test) arrays into a normalised Dataset.

    Images are uint8 (0..255) or float ([0, 1]) [N, C, H, W]. Order: to [0, 1], resize, per-channel
    mean/std of the training split, then ZCA fitted on the normalised training split (as MTT:
    Normalize, then kornia ZCAWhitening); validation and test get the training split's transform.
    """
    xs = [_resize(_to_unit_float(x), image_size) for x in arrays[0::2]]
    ys = [torch.as_tensor(np.asarray(y), dtype=torch.int64) for y in arrays[1::2]]
    for split, x in zip(("training", "validation", "test"), xs, strict=True):
        if x.shape[0] == 0:
            raise DataError(f"Dataset {name!r}{where} has an empty {split} split; it needs images in every "
                            "split (see docs/method.md, Splits).")
    c = xs[0].shape[1]
    if normalize:
        mean = xs[0].mean(dim=(0, 2, 3))
        std = xs[0].std(dim=(0, 2, 3)).clamp_min(1e-6)
    else:
        mean, std = torch.zeros(c), torch.ones(c)
    for x in xs:
        x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
    whitening = None
    if zca:
        if xs[0].shape[0] < 2:
            raise DataError(f"ZCA whitening needs at least two training images; {name!r} has one.")
        whitening = ZCA.fit(xs[0])
        xs = [whitening(x) for x in xs]
    return Dataset(
        name=name,
        x_train=xs[0], y_train=ys[0], x_val=xs[1], y_val=ys[1], x_test=xs[2], y_test=ys[2],
        class_names=list(class_names),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        zca=whitening,
        skipped_files=skipped,
    )


def _resize(x: Tensor, size: int | None) -> Tensor:
    """Bilinear (antialiased) resize to size x size; a no-op when the images already have that size."""
    if size is None or (x.shape[-1] == size and x.shape[-2] == size) or x.shape[0] == 0:
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True).clamp_(0, 1)


def load_dataset(
    name: str = "digits",
    root: str | None = None,
    *,
    image_size: int | None = None,
    zca: bool = False,
    normalize: bool = True,
    seed: int = 0,
) -> Dataset:
    """Load a dataset by name with its fixed train / validation / test splits; ``DataError`` on bad input.

    ``image_size`` resizes square images (digits default 8, imagefolder default 32). ``zca`` fits
    ZCA whitening (eps 0.1, as MTT) on the training split and applies it to every split. ``seed`` is
    accepted for compatibility only: the splits are fixed (``splits.SPLIT_SEED``) and never depend on
    the run seed, so every run is validated and tested on the same images.
    """
    from . import sources
    from .splits import carve_validation, split_three

    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1
    ):
        raise DataError(f"image size must be a positive integer, got {image_size!r}.")
    key = name.strip().lower()
    skipped, where = 0, f" in {root}" if root else ""
    if key == "digits":
        arrays, classes = sources.load_digits(), [str(i) for i in range(10)]
    elif key == "mnist5k":
        arrays, classes = sources.load_mnist5k(), [str(i) for i in range(10)]
    elif key in ("cifar10", "cifar100"):
        arrays, classes = sources.load_cifar(key, root)
    elif key in ("mnist", "fashion-mnist", "fashionmnist"):
        key = "fashion-mnist" if key == "fashionmnist" else key
        arrays, classes = sources.load_mnist(key, root)
    elif key.startswith("imagefolder:") or key == "imagefolder":
        path = name.strip().split(":", 1)[1] if ":" in name else None
        path = path or root
        arrays, classes, skipped = sources.load_imagefolder(path, image_size or 32)
        key, where = "imagefolder", f" in {path}"
    else:
        raise DataError(
            f"Unknown dataset {name!r}; choose digits, mnist5k, cifar10, cifar100, mnist, fashion-mnist "
            "or imagefolder:PATH."
        )
    splits = split_three(*arrays) if len(arrays) == 2 else carve_validation(*arrays)
    return _finish(key, splits, classes, zca=zca, normalize=normalize, image_size=image_size,
                   skipped=skipped, where=where)

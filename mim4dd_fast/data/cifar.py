"""CIFAR-10 / CIFAR-100 from the official "python version" batch files, read without running code.

Layout (as unpacked from the official archives):
  cifar-10-batches-py/  data_batch_1 .. data_batch_5, test_batch, batches.meta
  cifar-100-python/     train, test, meta
Each batch is a pickled dict (Python 2, so keys are bytes under ``encoding="bytes"``) with
``data``: uint8 [N, 3072] (1024 red, 1024 green, 1024 blue values, row-major 32x32) and
``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100): N ints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .unpickle import safe_load

_LAYOUT = {
    # name: (folder in the archive, train files, test file, meta file, label key, names key, classes)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        "batches.meta",
        "labels",
        "label_names",
        10,
    ),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names", 100),
}


def _text(value: Any) -> Any:
    return value.decode("latin1") if isinstance(value, bytes) else value


def _as_str_dict(obj: Any, path: Path) -> dict[str, Any]:
    """Keys as str whether the pickle came from Python 2 (bytes keys) or Python 3 (str keys)."""
    if not isinstance(obj, dict):
        raise DataError(
            f"{path} does not hold a CIFAR dict (found {type(obj).__name__}); is it the python version?"
        )
    return {_text(k): v for k, v in obj.items() if isinstance(k, (bytes, str))}


def find_dir(name: str, root: str | Path | None) -> Path:
    """``root`` itself when it holds the batch files, else ``root/<archive folder>``."""
    folder, train_files, *_ = _LAYOUT[name]
    if root is None:
        raise DataError(f"{name} needs a data directory (--data-dir) holding {folder} or its files.")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"Data directory {root} does not exist or is not a directory.")
    for candidate in (root, root / folder):
        if (candidate / train_files[0]).exists():
            return candidate
    raise DataError(
        f"No {name} files in {root}: expected {train_files[0]} there or in {root / folder} "
        "(the python version of the dataset, unpacked)."
    )


def read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 [N, 3, 32, 32], int64 [N]), with every key, shape and range checked."""
    if not path.is_file():
        raise DataError(f"CIFAR batch file {path} is missing; the dataset directory is incomplete.")
    batch = _as_str_dict(safe_load(path), path)
    if "data" not in batch or label_key not in batch:
        raise DataError(
            f"{path} lacks the 'data' or '{label_key}' entry; it is not a CIFAR batch of this dataset."
        )
    data, labels = batch["data"], batch[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path} has data of {desc}; a CIFAR batch holds uint8 [N, 3072].")
    if data.shape[0] == 0:
        raise DataError(f"no images in {path}; a CIFAR batch holds at least one.")
    return data.reshape(-1, 3, 32, 32), _labels(labels, data.shape[0], num_classes, path)


def _labels(labels: Any, n: int, num_classes: int, path: Path) -> np.ndarray:
    """A flat list (or 1-D integer array) of ``n`` ints in range, checked before numpy copies anything:
    a list of nested shared lists would otherwise be expanded element by element."""
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise DataError(f"{path} has labels of {labels.dtype} {labels.shape}; expected {n} integers.")
    elif not isinstance(labels, (list, tuple)) or not all(type(v) is int for v in labels):
        raise DataError(f"{path} has labels that are not a flat list of integers.")
    if len(labels) != n:
        raise DataError(f"{path} has {n} images but {len(labels)} labels.")
    try:
        out = np.asarray(labels, dtype=np.int64)
    except OverflowError:  # a Python int beyond int64
        out = np.array([-1])
    if out.min() < 0 or out.max() >= num_classes:
        raise DataError(f"{path} has labels outside 0..{num_classes - 1}.")
    return out


def read_class_names(path: Path, names_key: str, num_classes: int) -> list[str]:
    if not path.is_file():
        raise DataError(f"CIFAR meta file {path} is missing; the dataset directory is incomplete.")
    meta = _as_str_dict(safe_load(path), path)
    names = meta.get(names_key)
    if (not isinstance(names, (list, tuple)) or len(names) != num_classes
            or not all(isinstance(n, (bytes, str)) and len(n) <= 1000 for n in names)):
        raise DataError(f"{path} does not list {num_classes} class names under '{names_key}'.")
    return [_text(n) for n in names]


def load_cifar(name: str, root: str | Path | None):
    """((x_train, y_train, x_test, y_test), class_names); images uint8 [N, 3, 32, 32]."""
    _, train_files, test_file, meta_file, label_key, names_key, k = _LAYOUT[name]
    directory = find_dir(name, root)
    names = read_class_names(directory / meta_file, names_key, k)
    train = [read_batch(directory / f, label_key, k) for f in train_files]
    x_test, y_test = read_batch(directory / test_file, label_key, k)
    x_train = np.concatenate([x for x, _ in train]) if len(train) > 1 else train[0][0]
    y_train = np.concatenate([y for _, y in train])
    return (x_train, y_train, x_test, y_test), names

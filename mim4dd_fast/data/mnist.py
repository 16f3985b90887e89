"""MNIST and Fashion-MNIST from the standard IDX files (plain or gzipped).

IDX format: a big-endian int32 magic (2051 = 0x803 for 3-d ubyte images, 2049 = 0x801 for 1-d ubyte
labels), one big-endian int32 per dimension, then the raw uint8 values. The header's sizes are checked
before anything is allocated: their exact product against the file's length (a plain file must hold
that many bytes, a gzipped one cannot expand more than deflate's ~1032:1) and against the memory
available. Then exactly the announced number of bytes is read, so a truncated file, a file with extra
bytes, or a gzip bomb is caught without reading more than the header promises.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import DataError

MAX_DEFLATE_RATIO = 1032  # deflate never expands a byte of input to more than about 1032 bytes
IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ],
}
_TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def find_dir(name: str, root: str | Path | None) -> Path:
    """``root`` when it holds the files, else the torchvision layout ``root/MNIST/raw``."""
    first = FILES["train"][0]
    if root is None:
        raise DataError(f"{name} needs a data directory (--data-dir) holding {first} (or {first}.gz).")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"Data directory {root} does not exist or is not a directory.")
    for candidate in (root, root / _TORCHVISION_FOLDER[name] / "raw"):
        if (candidate / first).exists() or (candidate / f"{first}.gz").exists():
            return candidate
    raise DataError(f"No {name} files in {root}: expected {first} (or {first}.gz) there or in "
                    f"{root / _TORCHVISION_FOLDER[name] / 'raw'}.")


def _open(directory: Path, stem: str) -> tuple[BinaryIO, Path]:
    """The plain file if present, else the ``.gz`` one."""
    plain, gz = directory / stem, directory / f"{stem}.gz"
    if plain.is_file():
        return plain.open("rb"), plain
    if gz.is_file():
        return gzip.open(gz, "rb"), gz
    raise DataError(f"IDX file {plain} (or {gz.name}) is missing; the dataset directory is incomplete.")


def _read_exact(f: BinaryIO, n: int, path: Path, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise DataError(
            f"IDX file {path} is truncated: its {what} needs {n} bytes but only {len(data)} are there."
        )
    return data


def _check_memory(path: Path, count: int) -> None:
    """Refuse up front a file whose values (read as uint8, then copied to float32) would not fit in memory."""
    import psutil

    need, available = 5 * count, psutil.virtual_memory().available
    if need > available:
        raise DataError(f"IDX file {path} announces {count} values, which need about {need / 2**30:.1f} GiB of "
                        f"memory as images; only {available / 2**30:.1f} GiB is available.")


def read_idx(directory: Path, stem: str, magic: int, ndim: int) -> np.ndarray:
    """One IDX file -> uint8 array of the header's shape; DataError for wrong magic/size/truncation."""
    f, path = _open(directory, stem)
    try:
        with f:
            head = _read_exact(f, 4 + 4 * ndim, path, "header")
            found, *dims = struct.unpack(f">{1 + ndim}i", head)
            if found != magic:
                raise DataError(f"IDX file {path} has magic number {found}, expected {magic}; "
                                "it is not the right MNIST file.")
            if any(d < 0 for d in dims):
                raise DataError(f"IDX file {path} has a negative size in its header.")
            count = math.prod(dims)  # exact: the product of int32 sizes can overflow int64
            stored = path.stat().st_size - len(head)
            if path.suffix != ".gz" and stored < count:
                raise DataError(f"IDX file {path} is truncated: its header announces {count} values "
                                f"({'x'.join(map(str, dims))}) but the file has only {stored}.")
            if path.suffix == ".gz" and count > MAX_DEFLATE_RATIO * path.stat().st_size:
                raise DataError(f"IDX file {path} announces {count} values ({'x'.join(map(str, dims))}) in its "
                                f"header, more than its {path.stat().st_size} compressed bytes can hold.")
            _check_memory(path, count)
            body = _read_exact(f, count, path, f"{'x'.join(map(str, dims))} values")
            if f.read(1):
                raise DataError(f"IDX file {path} is longer than its header {dims} says; it is corrupt.")
    except (OSError, EOFError, zlib.error, MemoryError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"IDX file {path} could not be read ({type(e).__name__}: {e}).") from None
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def load_mnist(name: str, root: str | Path | None):
    """((x_train, y_train, x_test, y_test), class_names); images uint8 [N, 1, 28, 28]."""
    name = "fashion-mnist" if name in ("fashionmnist", "fashion-mnist") else name
    directory = find_dir(name, root)
    out = []
    for split in ("train", "test"):
        image_stem, label_stem = FILES[split]
        images = read_idx(directory, image_stem, IMAGES_MAGIC, 3)
        labels = read_idx(directory, label_stem, LABELS_MAGIC, 1)
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"{name} {split} split has {len(images)} images but {len(labels)} labels.")
        if labels.size and labels.max() >= 10:
            raise DataError(f"{name} {split} labels contain {int(labels.max())}; MNIST labels are 0..9.")
        out += [images[:, None], labels.astype(np.int64)]
    return tuple(out), list(CLASS_NAMES[name])

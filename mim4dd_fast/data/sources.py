"""One reader per source; each returns (x_train, y_train, x_test, y_test) as numpy arrays.

Images are [N, C, H, W], either uint8 (0..255: CIFAR, MNIST, image folders) or float32 in [0, 1]
(digits); ``dataset._finish`` turns both into float32 in [0, 1]. Every failure raises DataError with
one clear sentence. The file formats live in their own modules (cifar, mnist, imagefolder).
"""

from __future__ import annotations

import numpy as np

from .cifar import load_cifar
from .imagefolder import load_imagefolder
from .mnist import load_mnist

__all__ = ["load_cifar", "load_digits", "load_imagefolder", "load_mnist"]


def load_digits(seed: int = 0, test_fraction: float = 0.2):
    """The 1,797 8x8 digits shipped inside scikit-learn, split per class with a fixed seed."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]  # pixel values are 0..16
    y = bunch.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test_mask = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        test_mask[idx[: int(round(len(idx) * test_fraction))]] = True
    return x[~test_mask], y[~test_mask], x[test_mask], y[test_mask]

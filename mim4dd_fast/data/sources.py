"""One reader per source, as numpy arrays [N, C, H, W] (uint8 0..255, or float32 in [0, 1] for digits).

Sources with an official test set (CIFAR, MNIST, an image folder with train/test folders) return
``(x_train, y_train, x_test, y_test)``; the embedded sets (digits, mnist5k) return all their images
``(x, y)``; ``splits`` turns either into fixed train / validation / test splits. Every failure raises
DataError with one clear sentence. The file formats live in their own modules.
"""

from __future__ import annotations

import numpy as np

from .cifar import load_cifar
from .imagefolder import load_imagefolder
from .mnist import load_mnist
from .mnist5k import load_mnist5k

__all__ = ["load_cifar", "load_digits", "load_imagefolder", "load_mnist", "load_mnist5k"]


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 8x8 digits shipped inside scikit-learn: (float32 [N, 1, 8, 8] in [0, 1], int64 [N])."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]  # pixel values are 0..16
    return x, bunch.target.astype(np.int64)

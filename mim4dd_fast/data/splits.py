"""Fixed, stratified train / validation / test splits that never depend on the run seed.

Why: hyperparameters are chosen on validation accuracy and the test split is touched only for the
final tables, so both must hold the same images in every run, every process and every seed. Each
class is permuted by its own generator seeded with ``(SPLIT_SEED, class)`` (numpy's PCG64, which
is stable across platforms and processes), so the split of one class does not move when another
class gains images.

Sizes (docs/method.md, "Splits"):
- a dataset with an official test set keeps it as test; validation is ``VAL_OF_TRAIN`` (10 %) of
  each training class;
- a dataset without one (digits, mnist5k, an image folder without train/test folders) gives
  ``HELD_OUT`` (20 %) of each class to validation and 20 % to test, the rest (60 %) to train.
Counts are rounded half up; a class large enough to keep one training image gives every held-out
part at least one image, a smaller class stays whole in train.
"""

from __future__ import annotations

import math

import numpy as np

SPLIT_SEED = 2023
HELD_OUT = 0.2
VAL_OF_TRAIN = 0.1


def held_out_counts(n: int, fractions: tuple[float, ...]) -> list[int]:
    """How many of a class's ``n`` images go to each held-out part (the rest is train)."""
    counts = [math.floor(f * n + 0.5) for f in fractions]
    if n > len(fractions):  # enough images to keep one for training and give each part one
        counts = [max(1, k) for k in counts]
    else:
        counts = [0] * len(fractions)
    return counts


def stratified_indices(y: np.ndarray, fractions: tuple[float, ...],
                       seed: int = SPLIT_SEED) -> list[np.ndarray]:
    """Sorted index arrays ``[train, part_1, part_2, ...]`` of ``y``, one part per fraction, per class."""
    y = np.asarray(y)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        order = idx[np.random.default_rng((seed, int(c))).permutation(len(idx))]
        start = 0
        for p, k in enumerate(held_out_counts(len(idx), fractions), start=1):
            parts[p].append(order[start : start + k])
            start += k
        parts[0].append(order[start:])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def split_three(x: np.ndarray, y: np.ndarray):
    """A dataset without an official test set -> (x_train, y_train, x_val, y_val, x_test, y_test)."""
    train, val, test = stratified_indices(y, (HELD_OUT, HELD_OUT))
    return x[train], y[train], x[val], y[val], x[test], y[test]


def carve_validation(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray):
    """Official train/test -> (x_train, y_train, x_val, y_val, x_test, y_test), validation from train."""
    train, val = stratified_indices(y_train, (VAL_OF_TRAIN,))
    return x_train[train], y_train[train], x_train[val], y_train[val], x_test, y_test

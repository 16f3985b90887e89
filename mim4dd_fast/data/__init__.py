"""Datasets as in-memory tensors: one ``load_dataset`` entry for every supported source.

Sources: ``digits`` (embedded in scikit-learn, the default: no files needed), ``cifar10``/``cifar100``
(python-version batches through a restricted unpickler), ``mnist``/``fashion-mnist`` (IDX files,
optionally gzipped) and ``imagefolder:PATH`` (one sub-folder per class). Images come back as
float32 [N, C, H, W] in [0, 1], then mean/std normalised (and optionally ZCA-whitened) with the
statistics of the training split only.
"""

from __future__ import annotations

from .dataset import ClassIndex, Dataset, load_dataset

__all__ = ["ClassIndex", "Dataset", "load_dataset"]

"""ZCA whitening fitted on the training split (eps 0.1 as in MTT), applied alike to every split."""

from __future__ import annotations

import torch
from torch import Tensor


class ZCA:
    """x -> (x - mean) W with W = U diag(1/sqrt(s + eps)) U^T, on flattened images; invertible."""

    def __init__(self, mean: Tensor, transform: Tensor, inverse_transform: Tensor, shape: tuple[int, ...]):
        self.mean, self.transform, self.inverse_transform, self.shape = mean, transform, inverse_transform, shape

    @classmethod
    def fit(cls, x: Tensor, eps: float = 0.1) -> ZCA:
        flat = x.reshape(x.shape[0], -1).double()
        mean = flat.mean(0)
        centred = flat - mean
        cov = centred.T @ centred / max(flat.shape[0], 1)
        s, u = torch.linalg.eigh(cov)
        s = s.clamp_min(0)
        w = u @ torch.diag(1.0 / torch.sqrt(s + eps)) @ u.T
        w_inv = u @ torch.diag(torch.sqrt(s + eps)) @ u.T
        return cls(mean.float(), w.float(), w_inv.float(), tuple(x.shape[1:]))

    def __call__(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1) - self.mean.to(x)
        return (flat @ self.transform.to(x)).reshape(x.shape)

    def inverse(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1) @ self.inverse_transform.to(x)
        return (flat + self.mean.to(x)).reshape(x.shape)

    def state_dict(self) -> dict[str, Tensor]:
        return {"mean": self.mean, "transform": self.transform, "inverse_transform": self.inverse_transform}

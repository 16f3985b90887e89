"""ZCA whitening fitted on the training split (eps 0.1 as in MTT), applied alike to every split."""

from __future__ import annotations

import torch
from torch import Tensor


class ZCA:
    """x -> (x - mean) W with W = U diag(1/sqrt(s + eps)) U^T, on flattened images; invertible."""

    def __init__(self, mean: Tensor, transform: Tensor, inverse_transform: Tensor, shape: tuple[int, ...]):
        self.mean, self.transform, self.inverse_transform = mean, transform, inverse_transform
        self.shape = shape

    @classmethod
    def fit(cls, x: Tensor, eps: float = 0.1, chunk: int = 4096) -> ZCA:
        """Fit on ``x`` [N, ...]: unbiased covariance (N - 1, as kornia's ZCAWhitening used by MTT).

        The covariance is accumulated in float64 from float32 chunk products, so CIFAR-sized input
        (50,000 x 3,072) needs no float64 copy of the data; eigh of the D x D matrix is float64.
        """
        if x.shape[0] < 2:
            raise ValueError("ZCA needs at least two samples to estimate a covariance.")
        flat = x.reshape(x.shape[0], -1)
        n, d = flat.shape
        mean = sum(flat[i : i + chunk].double().sum(0) for i in range(0, n, chunk)) / n
        cov = torch.zeros(d, d, dtype=torch.float64)
        mean32 = mean.to(flat.dtype)
        for i in range(0, n, chunk):
            block = flat[i : i + chunk] - mean32
            cov += (block.T @ block).double()
        cov /= n - 1
        s, u = torch.linalg.eigh(cov)
        s = s.clamp_min(0)
        w = (u * (1.0 / torch.sqrt(s + eps))) @ u.T
        w_inv = (u * torch.sqrt(s + eps)) @ u.T
        return cls(mean.float(), w.float(), w_inv.float(), tuple(x.shape[1:]))

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], shape: tuple[int, ...]) -> ZCA:
        """Rebuild from ``state_dict()`` (e.g. loaded from a safetensors file) and the image shape."""
        return cls(state["mean"], state["transform"], state["inverse_transform"], tuple(shape))

    def __call__(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1) - self.mean.to(x)
        return (flat @ self.transform.to(x)).reshape(x.shape)

    def inverse(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1) @ self.inverse_transform.to(x)
        return (flat + self.mean.to(x)).reshape(x.shape)

    def state_dict(self) -> dict[str, Tensor]:
        return {"mean": self.mean, "transform": self.transform, "inverse_transform": self.inverse_transform}

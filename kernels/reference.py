"""Plain-PyTorch references of the fused kernels: the readable spec and the test oracles.

Each reference materialises everything (the full similarity matrix, float masks) on purpose: it is
meant to be obviously equal to the math in docs/method.md, not fast. No argument checks here: the
public entries (``contrastive_loss``, ``feature_reduce``) check, then dispatch; the fused paths are
tested against these functions.
"""

from __future__ import annotations

import math

import torch

from .critics import CRITICS

__all__ = ["compute_dtype", "contrastive_loss_reference", "feature_reduce_reference", "NORM_EPS"]

NORM_EPS = 1e-12


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed (and the loss returned) in float32; others keep theirs."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def contrastive_loss_reference(a, b, ya, yb, tau=0.1, critic="infonce", noise_ratio=1.0, neg_weight=1.0,
                               reduction="mean", matmul_dtype=None) -> torch.Tensor:
    """The normalized-similarity contrastive loss, written out with the full N x M matrix.

    a [N, D] anchors, b [M, D] keys, integer labels ya [N], yb [M]; x_ij = <a_i/|a_i|, b_j/|b_j|> / tau;
    positives of anchor i are the keys with its label. Returns the mean over anchors with at least one
    positive ("mean") or the per-anchor vector ("none": 0 where an anchor has no positive), in float32
    for half inputs, else in the input dtype. ``matmul_dtype`` (e.g. torch.bfloat16) casts the two
    normalised operands of the similarity matmul, as the bf16 precision mode does.
    """
    dt = compute_dtype(a.dtype)
    a_hat = a.to(dt) / a.to(dt).norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    b_hat = b.to(dt) / b.to(dt).norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    if matmul_dtype is None:
        x = a_hat @ b_hat.T / tau  # [N, M]
    else:
        x = (a_hat.to(matmul_dtype) @ b_hat.to(matmul_dtype).T).to(dt) / tau

    pos = (ya[:, None] == yb[None, :]).to(dt)  # P_i as a float mask
    neg = 1.0 - pos  # N_i
    npos = pos.sum(dim=1)
    nneg = neg.sum(dim=1)
    loss = CRITICS[critic].reference(x, pos, neg, npos, nneg, math.log(noise_ratio), neg_weight)

    valid = npos > 0
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "mean":
        return loss.sum() / valid.sum()
    return loss


def feature_reduce_reference(x: torch.Tensor, p: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``adaptive_avg_pool2d(x, p).flatten(1)`` written as its definition, differentiable.

    Cell (i, j) is the mean of rows [floor(i*H/p), ceil((i+1)*H/p)) and the same columns (windows
    overlap when p does not divide H or W, and when H < p). Accumulates in float32 (float64 for
    float64 input); the result is channel-major [B, C*p*p] in ``out_dtype`` (default x's dtype).
    """
    _, _, H, W = x.shape
    xf = x if x.dtype == torch.float64 else x.float()
    cells = []
    for i in range(p):
        h0, h1 = (i * H) // p, ((i + 1) * H + p - 1) // p
        for j in range(p):
            w0, w1 = (j * W) // p, ((j + 1) * W + p - 1) // p
            cells.append(xf[:, :, h0:h1, w0:w1].mean(dim=(2, 3)))
    out = torch.stack(cells, dim=2).flatten(1)  # [B, C, p*p] -> channel-major
    return out.to(x.dtype if out_dtype is None else out_dtype)

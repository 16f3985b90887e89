"""Plain-PyTorch references of the fused kernels: the readable spec and the test oracles.

Each reference materialises everything (full similarity matrix, float masks) on purpose: it is
meant to be obviously equal to the math in DESIGN.md, not fast. The fused paths in
``contrastive.py`` / ``feature_reduce.py`` are tested against these functions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mim4dd_fast.errors import ConfigError

__all__ = [
    "ContrastiveArgumentError",
    "check_contrastive_args",
    "check_contrastive_labels",
    "contrastive_loss_reference",
    "contrastive_loss_reference_unchecked",
]

CRITICS = ("infonce", "nce")
REDUCTIONS = ("mean", "none")
NORM_EPS = 1e-12


class ContrastiveArgumentError(ConfigError, ValueError):
    """A bad argument to the contrastive loss: a ConfigError (CLI prints it) and a ValueError."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed (and the loss returned) in float32; others keep theirs."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_contrastive_args(a, b, ya, yb, tau, critic, noise_ratio, neg_weight, reduction) -> None:
    """Static checks (shapes, dtypes, hyperparameters): no data-dependent work, safe under torch.compile."""
    err = ContrastiveArgumentError
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise err("a and b must be tensors of shape [N, D] and [M, D].")
    if a.dim() != 2 or b.dim() != 2:
        raise err(f"a and b must be 2-D [N, D] and [M, D], got shapes {tuple(a.shape)} and {tuple(b.shape)}.")
    if a.shape[1] != b.shape[1]:
        raise err(f"a and b must have the same feature size D, got {a.shape[1]} and {b.shape[1]}.")
    if a.shape[1] == 0:
        raise err("a and b must have at least one feature column (D >= 1).")
    if a.dtype != b.dtype or not a.dtype.is_floating_point:
        raise err(f"a and b must share one floating dtype, got {a.dtype} and {b.dtype}.")
    if a.device != b.device or ya.device != a.device or yb.device != a.device:
        raise err("a, b, ya and yb must all be on the same device.")
    for name, y, n in (("ya", ya, a.shape[0]), ("yb", yb, b.shape[0])):
        if y.dim() != 1 or y.shape[0] != n:
            raise err(f"{name} must be a 1-D label vector of length {n}, got shape {tuple(y.shape)}.")
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise err(f"{name} must hold integer class labels, got dtype {y.dtype}.")
    if not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise err(f"tau must be a finite number > 0, got {tau!r}.")
    if critic not in CRITICS:
        raise err(f"critic must be one of {CRITICS}, got {critic!r}.")
    if reduction not in REDUCTIONS:
        raise err(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    if not isinstance(noise_ratio, (int, float)) or not math.isfinite(noise_ratio) or noise_ratio <= 0:
        raise err(f"noise_ratio must be a finite number > 0, got {noise_ratio!r}.")
    if not isinstance(neg_weight, (int, float)) or not math.isfinite(neg_weight) or neg_weight < 0:
        raise err(f"neg_weight must be a finite number >= 0, got {neg_weight!r}.")


def check_contrastive_labels(ya: torch.Tensor, yb: torch.Tensor, npos: torch.Tensor) -> None:
    """Data-dependent checks (one host sync): labels >= 0 and at least one anchor with a positive."""
    lowest = min(int(ya.min()) if ya.numel() else 0, int(yb.min()) if yb.numel() else 0)
    if lowest < 0:
        raise ContrastiveArgumentError(f"class labels must be >= 0, got {lowest}.")
    if not bool((npos > 0).any()):
        raise ContrastiveArgumentError(
            "no anchor has a positive key (no label of ya occurs in yb), so the loss is undefined."
        )


def contrastive_loss_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    ya: torch.Tensor,
    yb: torch.Tensor,
    *,
    tau: float = 0.1,
    critic: str = "infonce",
    noise_ratio: float = 1.0,
    neg_weight: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """The normalized-similarity contrastive loss of DESIGN.md, written out with the full N x M matrix.

    Returns a scalar ("mean": over anchors with at least one positive) or the per-anchor vector
    ("none": 0 where an anchor has no positive), in float32 for half inputs, else in the input dtype.
    """
    check_contrastive_args(a, b, ya, yb, tau, critic, noise_ratio, neg_weight, reduction)
    check_contrastive_labels(ya, yb, (ya[:, None] == yb[None, :]).sum(dim=1))
    return contrastive_loss_reference_unchecked(a, b, ya, yb, tau, critic, noise_ratio, neg_weight, reduction)


def contrastive_loss_reference_unchecked(a, b, ya, yb, tau=0.1, critic="infonce", noise_ratio=1.0,
                                         neg_weight=1.0, reduction="mean") -> torch.Tensor:
    """The math alone, without argument checks (no host syncs): what bench/kernels.py compiles."""
    dt = compute_dtype(a.dtype)
    a_hat = a.to(dt) / a.to(dt).norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    b_hat = b.to(dt) / b.to(dt).norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    x = a_hat @ b_hat.T / tau  # [N, M]

    pos = (ya[:, None] == yb[None, :]).to(dt)  # P_i as a float mask
    neg = 1.0 - pos  # N_i
    npos = pos.sum(dim=1)
    nneg = neg.sum(dim=1)

    if critic == "infonce":
        loss = torch.logsumexp(x, dim=1) - (x * pos).sum(dim=1) / npos.clamp_min(1)
    else:
        log_k = math.log(noise_ratio)
        pos_term = (F.softplus(log_k - x) * pos).sum(dim=1) / npos.clamp_min(1)
        neg_term = (F.softplus(x - log_k) * neg).sum(dim=1) / nneg.clamp_min(1)
        loss = pos_term + neg_weight * neg_term

    valid = npos > 0
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "mean":
        return loss.sum() / valid.sum()
    return loss


# ----------------------------------------------------------------------------------------------
# feature_reduce (hook features): adaptive average pooling to p x p, flattened, cast
# ----------------------------------------------------------------------------------------------
__all__ += ["feature_reduce_reference"]


def feature_reduce_reference(
    x: torch.Tensor, p: int, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
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

"""Binary NCE critic (sigmoid critic h = sigmoid(x - log k)):

    l_i = mean_{j in P_i} softplus(log k - x_ij) + neg_weight * mean_{j in N_i} softplus(x_ij - log k)

The critic's three forms (registered in ``critics.py``): the plain reference, the chunked PyTorch
pieces and the Triton tile functions. Softplus is not linear in x, so every piece compares labels
inside its chunk or tile. With s = -(x - log k) on positives and (x - log k) on negatives,
d l_i / d x_ij = sigmoid(s) * (-1/|P_i| on positives, neg_weight/|N_i| on negatives).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import HAVE_TRITON, tl, triton

NAME = "nce"


def reference(x, pos, neg, npos, nneg, log_k, neg_weight):
    """Per-anchor loss from the full [N, M] logits and float masks (the readable spec)."""
    pos_term = (F.softplus(log_k - x) * pos).sum(dim=1) / npos.clamp_min(1)
    neg_term = (F.softplus(x - log_k) * neg).sum(dim=1) / nneg.clamp_min(1)
    return pos_term + neg_weight * neg_term


def positive_coef(inv_npos):
    """No part of the loss is linear in x."""
    return None


def _signed(x, eq, log_k):
    x.sub_(log_k)
    return torch.where(eq, -x, x)


def _grad_into(x, s, eq, inv_npos, w_neg):
    coef = torch.where(eq, -inv_npos[:, None], w_neg[:, None])
    torch.mul(torch.sigmoid(s), coef, out=x)


def chunk_forward(x, eq, inv_npos, w_neg, log_k, need_h):
    """Row loss of a [rows, M] logits chunk (overwritten); with need_h, x becomes dl/dx (scale None)."""
    eq = eq()
    s = _signed(x, eq, log_k)
    sp = F.softplus(s)
    sp_pos = torch.where(eq, sp, 0.0).sum(dim=1)
    loss = sp_pos * inv_npos + w_neg * (sp.sum(dim=1) - sp_pos)
    if need_h:
        _grad_into(x, s, eq, inv_npos, w_neg)
    return loss, torch.zeros_like(loss), None


def chunk_grad(x, eq, stat, inv_npos, w_neg, log_k):
    eq = eq()
    _grad_into(x, _signed(x, eq, log_k), eq, inv_npos, w_neg)


if HAVE_TRITON:

    @triton.jit
    def tile_init(BLOCK_N: tl.constexpr):
        """Sums of softplus over positives and over negatives, per anchor."""
        return tl.zeros([BLOCK_N], tl.float32), tl.zeros([BLOCK_N], tl.float32)

    @triton.jit
    def _signed_tile(x, eq, log_k):
        z = x - log_k
        return tl.where(eq, -z, z)

    @triton.jit
    def tile_grad(x, eq, stat, inv_npos, w_neg, log_k):
        s = _signed_tile(x, eq, log_k)
        return tl.where(eq, -inv_npos, w_neg) / (1.0 + tl.exp(-s))

    @triton.jit
    def tile_update(x, eq, valid, pos_i, neg_i, inv_npos, w_neg, log_k):
        """Softplus sums; h = dl/dx needs no rescaling (alpha = 1)."""
        s = _signed_tile(x, eq, log_k)
        sp = tl.maximum(s, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(s)))
        pos_i += tl.sum(tl.where(eq, sp, 0.0), axis=1)
        neg_i += tl.sum(tl.where(valid & (eq == 0), sp, 0.0), axis=1)
        h = tl.where(eq, -inv_npos, w_neg) / (1.0 + tl.exp(-s))
        return pos_i, neg_i, tl.full(pos_i.shape, 1.0, tl.float32), h

    @triton.jit
    def tile_final(pos_i, neg_i, inv_npos, w_neg):
        loss = pos_i * inv_npos + w_neg * neg_i
        return loss, tl.zeros_like(loss), tl.full(loss.shape, 1.0, tl.float32)

"""InfoNCE critic: l_i = logsumexp_j x_ij - mean_{j in P_i} x_ij.

The critic's three forms (registered in ``critics.py``): the plain reference, the chunked PyTorch
pieces and the Triton tile functions. The positive part is linear in x (coefficient -1/|P_i|), so
the shared driver handles it through per-class sums of the normalised vectors; the pieces here are
the logsumexp alone, whose gradient is the row softmax.
"""

from __future__ import annotations

import torch

from .backend import HAVE_TRITON, tl, triton

NAME = "infonce"


def reference(x, pos, neg, npos, nneg, log_k, neg_weight):
    """Per-anchor loss from the full [N, M] logits and float masks (the readable spec)."""
    return torch.logsumexp(x, dim=1) - (x * pos).sum(dim=1) / npos.clamp_min(1)


def positive_coef(inv_npos):
    """l_i contains coef_i * sum_{j in P_i} x_ij: the driver adds it with class sums."""
    return -inv_npos


def chunk_forward(x, eq, inv_npos, w_neg, log_k, need_h):
    """Logsumexp of a [rows, M] logits chunk; x becomes exp(x - rowmax), the softmax times the row sum
    (so the returned scale 1/sum turns h @ b into softmax @ b without another pass over the chunk)."""
    m = x.amax(dim=1)
    x.sub_(m[:, None]).exp_()
    s = x.sum(dim=1)
    lse = m + s.log()
    return lse, lse, 1.0 / s


def chunk_grad(x, eq, stat, inv_npos, w_neg, log_k):
    """d logsumexp / dx = exp(x - lse), in place."""
    x.sub_(stat[:, None]).exp_()


if HAVE_TRITON:

    @triton.jit
    def tile_init(BLOCK_N: tl.constexpr):
        """Running max and running sum of exp(x - max), per anchor."""
        return tl.full([BLOCK_N], float("-inf"), tl.float32), tl.zeros([BLOCK_N], tl.float32)

    @triton.jit
    def tile_update(x, eq, valid, m_i, s_i, inv_npos, w_neg, log_k):
        """Online logsumexp; h = exp(x - new max) and alpha rescales what was accumulated before."""
        xm = tl.where(valid, x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(xm, axis=1))
        alpha = tl.exp(m_i - m_new)
        h = tl.exp(xm - m_new[:, None])
        return m_new, s_i * alpha + tl.sum(h, axis=1), alpha, h

    @triton.jit
    def tile_final(m_i, s_i, inv_npos, w_neg):
        """(row loss, saved statistic = logsumexp, scale turning the accumulated h @ b into softmax @ b)."""
        lse = m_i + tl.log(s_i)
        return lse, lse, 1.0 / s_i

    @triton.jit
    def tile_grad(x, eq, stat, inv_npos, w_neg, log_k):
        return tl.exp(x - stat)

"""Chunked PyTorch path of the fused contrastive loss: any device, never the N x M matrix.

Walks anchor-row chunks whose logits buffer is at most ``chunk_bytes(device)``; one buffer is reused
for all chunks and 1/tau is folded into the left matmul operand. The forward keeps one statistic per
anchor and, when the anchors need a gradient, turns each chunk in place into h = dl/dx and
accumulates U = h @ b_hat (the anchors' gradient up to the upstream row weights, which only the
backward knows). The backward recomputes each chunk of logits once for the keys' gradient:
8NMD matmul FLOPs in all against the 6NMD that are useful. Precision: "bf16" rounds the GEMM operands
to bfloat16; the other modes are set on cuBLAS by the caller (TF32 only for "tf32"); CPU GEMMs are fp32.
"""

from __future__ import annotations

import torch

from .critics import CRITICS

# Logits buffer per chunk (one buffer per pass, reused by every chunk). CPU: 64 MiB, i.e. few chunks
# and so few parallel ops: on a busy machine every parallel op waits for a second core, and with
# 8 MiB chunks (2000 ops per step at 16384 x 16384) that waiting made the path slower than eager
# (docs/benchmarks.md). CUDA: large enough that each chunk is one big GEMM, not thousands of launches.
CHUNK_BYTES = 64 << 20
CUDA_CHUNK_BYTES = 256 << 20

__all__ = ["CHUNK_BYTES", "CUDA_CHUNK_BYTES", "chunk_rows", "forward", "grad_b"]


def chunk_rows(N: int, M: int, itemsize: int, device: torch.device) -> int:
    budget = CUDA_CHUNK_BYTES if device.type == "cuda" else CHUNK_BYTES
    return max(1, min(N, budget // max(1, M * itemsize)))


def _mm(x, y, out, bf16: bool):
    """out = x @ y; with bf16 the operands are rounded to bfloat16 (torch accumulates in float32)."""
    if bf16:
        return out.copy_(torch.mm(x.to(torch.bfloat16), y.to(torch.bfloat16)))
    return torch.mm(x, y, out=out)


def forward(a_hat, b_hat, ya, yb, inv_npos, w_neg, log_k, tau, critic, precision, need_u):
    """(row loss without the linear positive part, per-anchor statistic, U [N, D] or [0])."""
    N, M = a_hat.shape[0], b_hat.shape[0]
    crit, bf16 = CRITICS[critic], precision == "bf16"
    rows = chunk_rows(N, M, a_hat.element_size(), a_hat.device)
    buf = a_hat.new_empty(rows, M)
    loss, stat = a_hat.new_empty(N), a_hat.new_empty(N)
    u = a_hat.new_empty(a_hat.shape) if need_u else a_hat.new_empty(0)
    a_scaled, b_t = a_hat * (1.0 / tau), b_hat.T
    for s in range(0, N, rows):
        e = min(N, s + rows)
        x = _mm(a_scaled[s:e], b_t, buf[: e - s], bf16)
        eq = lambda s=s, e=e: ya[s:e, None] == yb[None, :]  # built only by critics that need the mask
        loss[s:e], stat[s:e], scale = crit.chunk_forward(x, eq, inv_npos[s:e], w_neg[s:e], log_k, need_u)
        if need_u:
            _mm(x, b_hat, u[s:e], bf16)
            if scale is not None:  # a per-row factor: cheaper on [rows, D] than on the [rows, M] chunk
                u[s:e].mul_(scale[:, None])
    return loss, stat, u


def grad_b(a_hat, b_hat, ya, yb, inv_npos, w_neg, log_k, stat, row_scale, tau, critic, precision):
    """sum_i row_scale_i * (dl_i/dx_ij without the linear positive part) * a_hat_i, for every key j."""
    N, M = a_hat.shape[0], b_hat.shape[0]
    crit, bf16 = CRITICS[critic], precision == "bf16"
    rows = chunk_rows(N, M, a_hat.element_size(), a_hat.device)
    buf = a_hat.new_empty(rows, M)
    gb = torch.zeros_like(b_hat)
    a_scaled, b_t = a_hat * (1.0 / tau), b_hat.T
    for s in range(0, N, rows):
        e = min(N, s + rows)
        x = _mm(a_scaled[s:e], b_t, buf[: e - s], bf16)
        eq = lambda s=s, e=e: ya[s:e, None] == yb[None, :]
        crit.chunk_grad(x, eq, stat[s:e], inv_npos[s:e], w_neg[s:e], log_k)
        a_weighted = a_hat[s:e] * row_scale[s:e, None]  # the row weights on [rows, D], not on the chunk
        if bf16:
            gb.add_(torch.mm(x.T.to(torch.bfloat16), a_weighted.to(torch.bfloat16)))
        else:
            gb.addmm_(x.T, a_weighted)
    return gb

"""Fused normalized-similarity contrastive loss (InfoNCE / binary NCE), forward and backward.

The math is DESIGN.md's "Math of the fused loss"; ``reference.contrastive_loss_reference`` is its
readable form. Two fused implementations never hold the N x M similarity matrix:

* ``chunked`` (PyTorch, any device): walks anchor-row chunks of at most ``CHUNK_BYTES``; the forward
  keeps only per-row statistics, the backward recomputes each chunk of logits and accumulates
  grad_a_hat = G_c @ b_hat and grad_b_hat += G_c.T @ a_hat_c. For InfoNCE the positive part is linear
  in x, so it goes through per-class sums of the normalised vectors (O((N+M)D), no mask at all);
  the NCE critic compares labels inside the chunk (a bool chunk, never a float N x M mask).
* ``triton``: tiled kernels (BLOCK_N anchors x BLOCK_M keys x BLOCK_D features) with an online
  logsumexp; the backward is one row-parallel kernel for grad_a and one column-parallel kernel for
  grad_b, both recomputing the logits tile by tile (deterministic, no atomics).

Both normalise in PyTorch (float32 for half inputs) before the kernels and chain the gradient of
the normalisation afterwards. Autograd saves only the inputs a, b (alive in the caller anyway), the
labels and one float per anchor (the logsumexp).

The public entry ``contrastive_loss`` goes through the custom op ``mim4dd_fast::contrastive_loss``
(fake impl + ``register_autograd``), so it works inside ``torch.compile(fullgraph=True)`` and has a
FLOP formula that counts the useful matmul FLOPs (2NMD forward, 4NMD backward); the 2NMD recomputed in
the backward are reported separately by ``contrastive_flops``.
"""

from __future__ import annotations

import math
import os

import torch

from .reference import (
    NORM_EPS,
    ContrastiveArgumentError,
    check_contrastive_args,
    check_contrastive_labels,
    compute_dtype,
    contrastive_loss_reference,
)

try:  # triton is a dependency, but a broken install must not break the CPU path
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    HAS_TRITON = False

__all__ = ["contrastive_loss", "contrastive_flops", "CHUNK_BYTES", "IMPLS"]

IMPLS = ("auto", "chunked", "triton", "reference")
# Per-chunk logits buffer budget: far below glibc's adaptive mmap threshold (32 MiB, ANCHORS.md), so
# chunk buffers come from the heap instead of fresh page-faulting mappings.
CHUNK_BYTES = 8 << 20
CRITIC_CODE = {"infonce": 0, "nce": 1}
# tl.dot precision on GPU: "ieee" is exact fp32, the same arithmetic as torch.mm's default fp32 GEMM.
DOT_PRECISION = "ieee"


def contrastive_flops(N: int, M: int, D: int) -> dict[str, int]:
    """Matmul FLOPs: useful forward/backward counts (what FlopCounterMode reports) and the recompute."""
    return {"forward": 2 * N * M * D, "backward": 4 * N * M * D, "recompute": 2 * N * M * D}


# --------------------------------------------------------------------------------------------------
# shared per-call statistics (O(N + M), no N x M work)
# --------------------------------------------------------------------------------------------------
def _label_stats(ya: torch.Tensor, yb: torch.Tensor, dt: torch.dtype):
    """Compact class ids and per-anchor counts |P_i|, |N_i| via one unique over both label vectors."""
    N = ya.shape[0]
    _, ids = torch.unique(torch.cat([ya, yb]), return_inverse=True)
    ya_id, yb_id = ids[:N], ids[N:]
    num_classes = int(ids.max()) + 1
    counts_b = torch.bincount(yb_id, minlength=num_classes)
    npos = counts_b[ya_id].to(dt)
    nneg = yb.shape[0] - npos
    return ya_id, yb_id, num_classes, npos, nneg


def _normalize(x: torch.Tensor, dt: torch.dtype):
    x = x.to(dt)
    r = x.norm(dim=1)
    return x / r.clamp_min(NORM_EPS)[:, None], r


def _normalize_backward(g_hat: torch.Tensor, x_hat: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Gradient of x_hat = x / max(||x||, eps): (g - x_hat <x_hat, g>) / ||x|| (just g / eps when clamped)."""
    proj = torch.where(r >= NORM_EPS, (x_hat * g_hat).sum(dim=1), torch.zeros_like(r))
    return (g_hat - x_hat * proj[:, None]) / r.clamp_min(NORM_EPS)[:, None]


def _chunk_rows(N: int, M: int, itemsize: int) -> int:
    return max(1, min(N, CHUNK_BYTES // max(1, M * itemsize)))


def _row_weights(gout, valid, reduction, dt):
    """dL/dl_i: gout / #valid for "mean", gout_i for "none"; 0 for anchors without positives."""
    validf = valid.to(dt)
    if reduction == "mean":
        return gout.to(dt) * validf / validf.sum()
    return gout.to(dt) * validf


# --------------------------------------------------------------------------------------------------
# chunked PyTorch path
# --------------------------------------------------------------------------------------------------
def _chunked_forward(a_hat, b_hat, ya, yb, ya_id, yb_id, num_classes, npos, nneg, tau, critic, log_k,
                     neg_weight):
    N, M = a_hat.shape[0], b_hat.shape[0]
    dt = a_hat.dtype
    rows = _chunk_rows(N, M, a_hat.element_size())
    buf = torch.empty(rows, M, dtype=dt, device=a_hat.device)
    loss = torch.empty(N, dtype=dt, device=a_hat.device)
    lse = torch.zeros(N, dtype=dt, device=a_hat.device)
    inv_npos = 1.0 / npos.clamp_min(1)
    if critic == "infonce":
        # positive mean through class sums: mean_{j in P_i} x_ij = <a_hat_i, S_{y_i}> / (tau |P_i|)
        class_sum = torch.zeros(num_classes, b_hat.shape[1], dtype=dt, device=a_hat.device)
        class_sum.index_add_(0, yb_id, b_hat)
        pos_mean = (a_hat * class_sum[ya_id]).sum(dim=1) * (inv_npos / tau)
    else:
        w_neg = neg_weight / nneg.clamp_min(1)
    a_scaled = a_hat * (1.0 / tau)  # folds 1/tau into the matmul
    for s in range(0, N, rows):
        e = min(N, s + rows)
        x = buf[: e - s]
        torch.mm(a_scaled[s:e], b_hat.T, out=x)
        if critic == "infonce":
            m = x.amax(dim=1)
            x.sub_(m[:, None]).exp_()
            lse[s:e] = m + x.sum(dim=1).log()
        else:
            eq = ya[s:e, None] == yb[None, :]  # labels compared inside the chunk
            x.sub_(log_k)
            sp = torch.nn.functional.softplus(torch.where(eq, -x, x))
            sp_pos = torch.where(eq, sp, 0.0).sum(dim=1)
            loss[s:e] = sp_pos * inv_npos[s:e] + w_neg[s:e] * (sp.sum(dim=1) - sp_pos)
    if critic == "infonce":
        loss = lse - pos_mean
    return loss, lse


def _chunked_backward(g_row, a_hat, b_hat, ya, yb, ya_id, yb_id, num_classes, npos, nneg, lse, tau,
                      critic, log_k, neg_weight, need_b):
    N, M = a_hat.shape[0], b_hat.shape[0]
    dt = a_hat.dtype
    rows = _chunk_rows(N, M, a_hat.element_size())
    buf = torch.empty(rows, M, dtype=dt, device=a_hat.device)
    grad_a = torch.empty_like(a_hat)
    grad_b = torch.zeros_like(b_hat) if need_b else None
    inv_npos = 1.0 / npos.clamp_min(1)
    row_scale = g_row / tau  # dL/dx_ij = row_scale_i * dl_i/dx_ij * tau
    if critic == "nce":
        w_neg = neg_weight / nneg.clamp_min(1)
    a_scaled = a_hat * (1.0 / tau)
    for s in range(0, N, rows):
        e = min(N, s + rows)
        x = buf[: e - s]
        torch.mm(a_scaled[s:e], b_hat.T, out=x)
        if critic == "infonce":  # G = softmax row-scaled; the positive part is added below
            x.sub_(lse[s:e, None]).exp_().mul_(row_scale[s:e, None])
        else:
            eq = ya[s:e, None] == yb[None, :]
            x.sub_(log_k)
            sig = torch.sigmoid(torch.where(eq, -x, x))
            coef = torch.where(eq, -inv_npos[s:e, None], w_neg[s:e, None]) * row_scale[s:e, None]
            torch.mul(sig, coef, out=x)
        torch.mm(x, b_hat, out=grad_a[s:e])
        if need_b:
            grad_b.addmm_(x.T, a_hat[s:e])
    if critic == "infonce":  # - row_scale_i / |P_i| * sum_{j in P_i} (b_hat_j for grad_a, a_hat_i for grad_b)
        coef = row_scale * inv_npos
        class_sum_b = torch.zeros(num_classes, b_hat.shape[1], dtype=dt, device=a_hat.device)
        class_sum_b.index_add_(0, yb_id, b_hat)
        grad_a.sub_(class_sum_b[ya_id] * coef[:, None])
        if need_b:
            class_sum_a = torch.zeros_like(class_sum_b).index_add_(0, ya_id, a_hat * coef[:, None])
            grad_b.sub_(class_sum_a[yb_id])
    return grad_a, grad_b


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _logits_tile(A, B, rows, cols, rmask, cmask, D, stride_a, stride_b, inv_tau,
                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr):
        """x[BLOCK_N, BLOCK_M] = a_hat[rows] @ b_hat[cols].T / tau, accumulated over D in BLOCK_D steps."""
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dk = d0 + tl.arange(0, BLOCK_D)
            dmask = dk < D
            at = tl.load(A + rows[:, None] * stride_a + dk[None, :], mask=rmask[:, None] & dmask[None, :],
                         other=0.0).to(tl.float32)
            bt = tl.load(B + cols[:, None] * stride_b + dk[None, :], mask=cmask[:, None] & dmask[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.dot(at, tl.trans(bt), input_precision=PRECISION)
        return acc * inv_tau

    @triton.jit
    def _grad_tile(x, eq, cmask, lse, row_scale, inv_npos, w_neg, log_k, CRITIC: tl.constexpr):
        """G = dL/dx for one tile (row_scale already holds dL/dl_i / tau); 0 outside the valid columns."""
        if CRITIC == 0:
            g = tl.exp(x - lse[:, None]) - tl.where(eq, inv_npos[:, None], 0.0)
        else:
            z = x - log_k
            s = tl.where(eq, -z, z)
            sig = 1.0 / (1.0 + tl.exp(-s))
            g = sig * tl.where(eq, -inv_npos[:, None], w_neg[:, None])
        return tl.where(cmask[None, :], g * row_scale[:, None], 0.0)

    @triton.jit
    def _contrastive_fwd_kernel(A, B, YA, YB, LOSS, LSE, INV_NPOS, W_NEG, N, M, D, stride_a, stride_b,
                                inv_tau, log_k, CRITIC: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        ya = tl.load(YA + rows, mask=rmask, other=-1)
        m_i = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        s_i = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_pos = tl.zeros([BLOCK_N], dtype=tl.float32)  # infonce: sum_P x; nce: sum_P softplus
        acc_neg = tl.zeros([BLOCK_N], dtype=tl.float32)  # nce: sum_N softplus
        for m0 in range(0, M, BLOCK_M):
            cols = m0 + tl.arange(0, BLOCK_M)
            cmask = cols < M
            x = _logits_tile(A, B, rows, cols, rmask, cmask, D, stride_a, stride_b, inv_tau,
                             BLOCK_N, BLOCK_M, BLOCK_D, PRECISION)
            yb = tl.load(YB + cols, mask=cmask, other=-2)
            eq = (ya[:, None] == yb[None, :]) & cmask[None, :]
            if CRITIC == 0:  # online logsumexp
                xm = tl.where(cmask[None, :], x, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(xm, axis=1))
                s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(xm - m_new[:, None]), axis=1)
                m_i = m_new
                acc_pos += tl.sum(tl.where(eq, x, 0.0), axis=1)
            else:
                z = x - log_k
                s = tl.where(eq, -z, z)
                sp = tl.maximum(s, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(s)))
                acc_pos += tl.sum(tl.where(eq, sp, 0.0), axis=1)
                acc_neg += tl.sum(tl.where(cmask[None, :] & (ya[:, None] != yb[None, :]), sp, 0.0), axis=1)
        inv_npos = tl.load(INV_NPOS + rows, mask=rmask, other=0.0)
        if CRITIC == 0:
            lse = m_i + tl.log(s_i)
            tl.store(LSE + rows, lse, mask=rmask)
            tl.store(LOSS + rows, lse - acc_pos * inv_npos, mask=rmask)
        else:
            w_neg = tl.load(W_NEG + rows, mask=rmask, other=0.0)
            tl.store(LOSS + rows, acc_pos * inv_npos + w_neg * acc_neg, mask=rmask)

    @triton.jit
    def _contrastive_bwd_a_kernel(A, B, YA, YB, GA, LSE, ROW_SCALE, INV_NPOS, W_NEG, N, M, D,
                                  stride_a, stride_b, stride_g, inv_tau, log_k, CRITIC: tl.constexpr,
                                  BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                                  BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr):
        """Row-parallel: grad_a_hat[rows, dout] = sum over key tiles of G @ b_hat[:, dout]."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        dout = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
        omask = dout < D
        ya = tl.load(YA + rows, mask=rmask, other=-1)
        lse = tl.load(LSE + rows, mask=rmask, other=0.0)
        row_scale = tl.load(ROW_SCALE + rows, mask=rmask, other=0.0)
        inv_npos = tl.load(INV_NPOS + rows, mask=rmask, other=0.0)
        w_neg = tl.load(W_NEG + rows, mask=rmask, other=0.0)
        acc = tl.zeros([BLOCK_N, BLOCK_DO], dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            cols = m0 + tl.arange(0, BLOCK_M)
            cmask = cols < M
            x = _logits_tile(A, B, rows, cols, rmask, cmask, D, stride_a, stride_b, inv_tau,
                             BLOCK_N, BLOCK_M, BLOCK_D, PRECISION)
            yb = tl.load(YB + cols, mask=cmask, other=-2)
            eq = (ya[:, None] == yb[None, :]) & cmask[None, :]
            g = _grad_tile(x, eq, cmask, lse, row_scale, inv_npos, w_neg, log_k, CRITIC)
            bo = tl.load(B + cols[:, None] * stride_b + dout[None, :], mask=cmask[:, None] & omask[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.dot(g, bo, input_precision=PRECISION)
        tl.store(GA + rows[:, None] * stride_g + dout[None, :], acc, mask=rmask[:, None] & omask[None, :])

    @triton.jit
    def _contrastive_bwd_b_kernel(A, B, YA, YB, GB, LSE, ROW_SCALE, INV_NPOS, W_NEG, N, M, D,
                                  stride_a, stride_b, stride_g, inv_tau, log_k, CRITIC: tl.constexpr,
                                  BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                                  BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr):
        """Column-parallel: grad_b_hat[cols, dout] = sum over anchor tiles of G.T @ a_hat[:, dout]."""
        cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cmask = cols < M
        dout = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
        omask = dout < D
        yb = tl.load(YB + cols, mask=cmask, other=-2)
        acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            rmask = rows < N
            ya = tl.load(YA + rows, mask=rmask, other=-1)
            lse = tl.load(LSE + rows, mask=rmask, other=0.0)
            row_scale = tl.load(ROW_SCALE + rows, mask=rmask, other=0.0)
            inv_npos = tl.load(INV_NPOS + rows, mask=rmask, other=0.0)
            w_neg = tl.load(W_NEG + rows, mask=rmask, other=0.0)
            x = _logits_tile(A, B, rows, cols, rmask, cmask, D, stride_a, stride_b, inv_tau,
                             BLOCK_N, BLOCK_M, BLOCK_D, PRECISION)
            eq = (ya[:, None] == yb[None, :]) & cmask[None, :]
            g = _grad_tile(x, eq, cmask, lse, row_scale, inv_npos, w_neg, log_k, CRITIC)
            ao = tl.load(A + rows[:, None] * stride_a + dout[None, :], mask=rmask[:, None] & omask[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.dot(tl.trans(g), ao, input_precision=PRECISION)
        tl.store(GB + cols[:, None] * stride_g + dout[None, :], acc, mask=cmask[:, None] & omask[None, :])


def _triton_blocks(D: int, on_gpu: bool):
    dp = max(16, triton.next_power_of_2(D))
    if on_gpu:
        return dict(BLOCK_N=64, BLOCK_M=64, BLOCK_D=min(dp, 64)), min(dp, 128)
    # interpreter: few, large programs (each tile op is a numpy call)
    return dict(BLOCK_N=32, BLOCK_M=32, BLOCK_D=min(dp, 64)), min(dp, 64)


def _triton_forward(a_hat, b_hat, ya, yb, npos, nneg, tau, critic, log_k, neg_weight):
    N, M, D = a_hat.shape[0], b_hat.shape[0], a_hat.shape[1]
    blocks, _ = _triton_blocks(D, a_hat.is_cuda)
    loss = torch.empty(N, dtype=torch.float32, device=a_hat.device)
    lse = torch.zeros(N, dtype=torch.float32, device=a_hat.device)
    inv_npos = (1.0 / npos.clamp_min(1)).float().contiguous()
    w_neg = (neg_weight / nneg.clamp_min(1)).float().contiguous()
    grid = (triton.cdiv(N, blocks["BLOCK_N"]),)
    _contrastive_fwd_kernel[grid](a_hat, b_hat, ya, yb, loss, lse, inv_npos, w_neg, N, M, D,
                                  a_hat.stride(0), b_hat.stride(0), 1.0 / tau, log_k,
                                  CRITIC=CRITIC_CODE[critic], PRECISION=DOT_PRECISION, **blocks)
    return loss, lse


def _triton_backward(g_row, a_hat, b_hat, ya, yb, npos, nneg, lse, tau, critic, log_k, neg_weight, need_b):
    N, M, D = a_hat.shape[0], b_hat.shape[0], a_hat.shape[1]
    blocks, block_do = _triton_blocks(D, a_hat.is_cuda)
    row_scale = (g_row / tau).float().contiguous()
    inv_npos = (1.0 / npos.clamp_min(1)).float().contiguous()
    w_neg = (neg_weight / nneg.clamp_min(1)).float().contiguous()
    lse = lse.float().contiguous()
    args = (row_scale, inv_npos, w_neg, N, M, D, a_hat.stride(0), b_hat.stride(0))
    kw = dict(CRITIC=CRITIC_CODE[critic], BLOCK_DO=block_do, PRECISION=DOT_PRECISION, **blocks)
    grad_a = torch.empty_like(a_hat)
    grid_a = (triton.cdiv(N, blocks["BLOCK_N"]), triton.cdiv(D, block_do))
    _contrastive_bwd_a_kernel[grid_a](a_hat, b_hat, ya, yb, grad_a, lse, *args, grad_a.stride(0),
                                      1.0 / tau, log_k, **kw)
    grad_b = None
    if need_b:
        grad_b = torch.empty_like(b_hat)
        grid_b = (triton.cdiv(M, blocks["BLOCK_M"]), triton.cdiv(D, block_do))
        _contrastive_bwd_b_kernel[grid_b](a_hat, b_hat, ya, yb, grad_b, lse, *args, grad_b.stride(0),
                                          1.0 / tau, log_k, **kw)
    return grad_a, grad_b


# --------------------------------------------------------------------------------------------------
# custom ops: forward and backward, each opaque to torch.compile
# --------------------------------------------------------------------------------------------------
def _prepare(a, b, ya, yb, impl):
    """Normalised inputs (float32 on the Triton path), contiguous labels and per-anchor counts."""
    dt = torch.float32 if impl == "triton" else compute_dtype(a.dtype)
    a_hat, ra = _normalize(a, dt)
    b_hat, rb = _normalize(b, dt)
    ya, yb = ya.contiguous(), yb.contiguous()
    ya_id, yb_id, num_classes, npos, nneg = _label_stats(ya, yb, dt)
    return a_hat.contiguous(), ra, b_hat.contiguous(), rb, ya, yb, ya_id, yb_id, num_classes, npos, nneg


@torch.library.custom_op("mim4dd_fast::contrastive_loss", mutates_args=())
def _contrastive_op(a: torch.Tensor, b: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor, tau: float,
                    critic: str, noise_ratio: float, neg_weight: float, reduction: str,
                    impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss, lse): lse [N] is the per-anchor logsumexp (zeros for nce), kept for the backward."""
    a_hat, _, b_hat, _, ya, yb, ya_id, yb_id, num_classes, npos, nneg = _prepare(a, b, ya, yb, impl)
    check_contrastive_labels(ya, yb, npos)
    log_k = math.log(noise_ratio)
    if impl == "triton":
        loss, lse = _triton_forward(a_hat, b_hat, ya, yb, npos, nneg, tau, critic, log_k, neg_weight)
    else:
        loss, lse = _chunked_forward(a_hat, b_hat, ya, yb, ya_id, yb_id, num_classes, npos, nneg, tau,
                                     critic, log_k, neg_weight)
    out_dt = compute_dtype(a.dtype)
    valid = npos > 0
    loss = torch.where(valid, loss, torch.zeros_like(loss)).to(out_dt)
    if reduction == "mean":
        loss = loss.sum() / valid.sum()
    return loss, lse.to(out_dt)


@_contrastive_op.register_fake
def _(a, b, ya, yb, tau, critic, noise_ratio, neg_weight, reduction, impl):
    dt = compute_dtype(a.dtype)
    shape = () if reduction == "mean" else (a.shape[0],)
    return a.new_empty(shape, dtype=dt), a.new_empty((a.shape[0],), dtype=dt)


@torch.library.custom_op("mim4dd_fast::contrastive_loss_backward", mutates_args=())
def _contrastive_backward_op(gout: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ya: torch.Tensor,
                             yb: torch.Tensor, lse: torch.Tensor, tau: float, critic: str,
                             noise_ratio: float, neg_weight: float, reduction: str, impl: str,
                             need_a: bool, need_b: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. a and b (empty [0] tensors for the ones not needed)."""
    a_hat, ra, b_hat, rb, ya, yb, ya_id, yb_id, num_classes, npos, nneg = _prepare(a, b, ya, yb, impl)
    g_row = _row_weights(gout, npos > 0, reduction, a_hat.dtype)
    log_k = math.log(noise_ratio)
    lse = lse.to(a_hat.dtype)
    if impl == "triton":
        ga_hat, gb_hat = _triton_backward(g_row, a_hat, b_hat, ya, yb, npos, nneg, lse, tau, critic,
                                          log_k, neg_weight, need_b)
    else:
        ga_hat, gb_hat = _chunked_backward(g_row, a_hat, b_hat, ya, yb, ya_id, yb_id, num_classes, npos,
                                           nneg, lse, tau, critic, log_k, neg_weight, need_b)
    grad_a = _normalize_backward(ga_hat, a_hat, ra).to(a.dtype) if need_a else a.new_empty(0)
    grad_b = _normalize_backward(gb_hat, b_hat, rb).to(b.dtype) if need_b else b.new_empty(0)
    return grad_a, grad_b


@_contrastive_backward_op.register_fake
def _(gout, a, b, ya, yb, lse, tau, critic, noise_ratio, neg_weight, reduction, impl, need_a, need_b):
    ga = a.new_empty(a.shape) if need_a else a.new_empty(0)
    gb = b.new_empty(b.shape) if need_b else b.new_empty(0)
    return ga, gb


def _setup_context(ctx, inputs, output):
    a, b, ya, yb, tau, critic, noise_ratio, neg_weight, reduction, impl = inputs
    ctx.save_for_backward(a, b, ya, yb, output[1])
    ctx.hyper = (tau, critic, noise_ratio, neg_weight, reduction, impl)


def _backward(ctx, grad_loss, grad_lse):
    a, b, ya, yb, lse = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_a or need_b):
        return (None,) * 10
    grad_a, grad_b = _contrastive_backward_op(grad_loss, a, b, ya, yb, lse, *ctx.hyper, need_a, need_b)
    return (grad_a if need_a else None, grad_b if need_b else None) + (None,) * 8


torch.library.register_autograd("mim4dd_fast::contrastive_loss", _backward, setup_context=_setup_context)


def _flop_counter_formulas():
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.mim4dd_fast.contrastive_loss)
    def _fwd_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        return contrastive_flops(a_shape[0], b_shape[0], a_shape[1])["forward"]

    @register_flop_formula(torch.ops.mim4dd_fast.contrastive_loss_backward)
    def _bwd_flops(gout_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        # useful backward FLOPs only (2NMD per requested gradient); the 2NMD recompute is not counted
        need_a, need_b = args[-2], args[-1]
        per_grad = contrastive_flops(a_shape[0], b_shape[0], a_shape[1])["backward"] // 2
        return per_grad * (int(bool(need_a)) + int(bool(need_b)))


_flop_counter_formulas()


# --------------------------------------------------------------------------------------------------
# public entry
# --------------------------------------------------------------------------------------------------
def _resolve_impl(impl: str, a: torch.Tensor) -> str:
    if impl not in IMPLS:
        raise ContrastiveArgumentError(f"impl must be one of {IMPLS}, got {impl!r}.")
    if impl == "auto":
        return "triton" if (a.is_cuda and HAS_TRITON) else "chunked"
    if impl == "triton" and not HAS_TRITON:
        raise ContrastiveArgumentError("impl='triton' needs the triton package, which failed to import.")
    if impl == "triton" and not a.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ContrastiveArgumentError(
            "impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests); use impl='chunked' on CPU."
        )
    return impl


def contrastive_loss(
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
    impl: str = "auto",
) -> torch.Tensor:
    """Normalized-similarity contrastive loss between anchors a [N, D] and keys b [M, D] (DESIGN.md).

    critic "infonce" or "nce"; reduction "mean" (over anchors with a positive) or "none" ([N], 0 where
    an anchor has no positive). impl "auto" uses Triton on CUDA and the chunked PyTorch path
    elsewhere; "triton" on CPU needs TRITON_INTERPRET=1; "reference" is the plain N x M version.
    Raises ContrastiveArgumentError (a ValueError and ConfigError) on bad arguments. Differentiable
    once (no double backward through the fused paths).
    """
    impl = _resolve_impl(impl, a)
    if impl == "reference":
        return contrastive_loss_reference(a, b, ya, yb, tau=tau, critic=critic, noise_ratio=noise_ratio,
                                          neg_weight=neg_weight, reduction=reduction)
    check_contrastive_args(a, b, ya, yb, tau, critic, noise_ratio, neg_weight, reduction)
    loss, _ = _contrastive_op(a, b, ya, yb, float(tau), critic, float(noise_ratio), float(neg_weight),
                              reduction, impl)
    return loss

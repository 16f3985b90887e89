"""Triton path of the fused contrastive loss: two kernels, 8NMD matmul FLOPs in all.

* forward, row-parallel: a program loads its BLOCK_N anchor rows once (all of D, padded to a power
  of two <= ``MAX_D``), walks the key tiles, computes each logits tile with one ``tl.dot``, updates the
  critic's running statistics and, when the anchors need a gradient, accumulates h @ b_hat with
  online rescaling (flash-attention style) into U, the anchors' gradient up to the upstream row
  weights: 4NMD.
* grad_b, column-parallel: a program loads its BLOCK_M key rows once, walks the anchor tiles,
  recomputes the logits and accumulates (row_scale * h).T @ a_hat: 4NMD; not launched when the keys
  need no gradient.

Deterministic (no atomics), int64 pointer offsets, launched on the tensors' own GPU. ``tl.dot``
precision is one of ``PRECISIONS``: "ieee" (fp32 FMA units), "tf32x3" (fp32-level accuracy on tensor
cores), "tf32", or "bf16" (operands rounded to bfloat16, float32 accumulation). Tile sizes, warps and
stages are autotuned on GPU; the interpreter runs one fixed configuration and, because bf16
``tl.dot`` is silently wrong there, emulates bf16 by rounding and multiplying in float32.
"""

from __future__ import annotations

import torch

from . import backend
from .backend import HAVE_TRITON, INTERPRET, device_guard, tl, triton
from .critics import CRITICS

MAX_D = 256  # one output block covers D up to this; larger D goes to the chunked path
PRECISIONS = ("ieee", "tf32x3", "tf32", "bf16")

__all__ = ["MAX_D", "PRECISIONS", "forward", "grad_b"]

if HAVE_TRITON:

    @triton.jit
    def _dot(x, y, acc, PRECISION: tl.constexpr, BF16: tl.constexpr, EMULATE: tl.constexpr):
        """x @ y (+ acc) in float32 at the requested precision. (One return at the end: the compiler
        generates the code after a constexpr-if's early return as well, and would type-check it.)"""
        if BF16:
            if EMULATE:
                out = tl.dot(x.to(tl.bfloat16).to(tl.float32), y.to(tl.bfloat16).to(tl.float32), acc,
                             input_precision="ieee")
            else:
                out = tl.dot(x.to(tl.bfloat16), y.to(tl.bfloat16), acc)
        else:
            out = tl.dot(x, y, acc, input_precision=PRECISION)
        return out

    @triton.jit
    def _load_rows(PTR, rows, stride, dk, rmask, dmask, BF16: tl.constexpr, EMULATE: tl.constexpr):
        """[rows, D_PAD] tile of a row-major matrix (int64 offsets, zeros outside); float32 unless bf16
        operands go to a real (not interpreted) tl.dot."""
        t = tl.load(PTR + rows.to(tl.int64)[:, None] * stride + dk[None, :], mask=rmask[:, None] & dmask[None, :],
                    other=0.0)
        if EMULATE or not BF16:
            t = t.to(tl.float32)
        return t

    @triton.jit
    def _store_rows(PTR, rows, stride, dk, rmask, dmask, value):
        tl.store(PTR + rows.to(tl.int64)[:, None] * stride + dk[None, :], value, mask=rmask[:, None] & dmask[None, :])

    @triton.jit
    def _program_block(BLOCK: tl.constexpr, n, D_PAD: tl.constexpr, D):
        """This program's BLOCK indices of n (and their mask), and the padded feature columns (and theirs)."""
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        dk = tl.arange(0, D_PAD)
        return idx, idx < n, dk, dk < D

    @triton.jit
    def _forward_kernel(A, B, YA, YB, INV_NPOS, W_NEG, LOSS, STAT, U,
                        N, M, D, stride_a, stride_b, stride_u, inv_tau, log_k, N_BUCKET, M_BUCKET, CRITIC_KEY,
                        INIT: tl.constexpr, UPDATE: tl.constexpr, FINAL: tl.constexpr, NEED_U: tl.constexpr,
                        D_PAD: tl.constexpr, PRECISION: tl.constexpr, BF16: tl.constexpr,
                        EMULATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
        rows, rmask, dk, dmask = _program_block(BLOCK_N, N, D_PAD, D)
        a = _load_rows(A, rows, stride_a, dk, rmask, dmask, BF16, EMULATE)  # once for the whole key loop
        ya = tl.load(YA + rows, mask=rmask, other=-1)
        inv_npos = tl.load(INV_NPOS + rows, mask=rmask, other=0.0)
        w_neg = tl.load(W_NEG + rows, mask=rmask, other=0.0)
        s1, s2 = INIT(BLOCK_N)
        acc = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            cols = m0 + tl.arange(0, BLOCK_M)
            cmask = cols < M
            b = _load_rows(B, cols, stride_b, dk, cmask, dmask, BF16, EMULATE)  # for the logits and for U
            x = _dot(a, tl.trans(b), None, PRECISION, BF16, EMULATE) * inv_tau
            yb = tl.load(YB + cols, mask=cmask, other=-2)
            valid = cmask[None, :]
            eq = (ya[:, None] == yb[None, :]) & valid
            s1, s2, alpha, h = UPDATE(x, eq, valid, s1, s2, inv_npos[:, None], w_neg[:, None], log_k)
            if NEED_U:
                acc = _dot(tl.where(valid, h, 0.0), b, acc * alpha[:, None], PRECISION, BF16, EMULATE)
        loss, stat, scale = FINAL(s1, s2, inv_npos, w_neg)
        tl.store(LOSS + rows, loss, mask=rmask)
        tl.store(STAT + rows, stat, mask=rmask)
        if NEED_U:
            _store_rows(U, rows, stride_u, dk, rmask, dmask, acc * scale[:, None])

    @triton.jit
    def _grad_b_kernel(A, B, YA, YB, INV_NPOS, W_NEG, STAT, ROW_SCALE, GB,
                       N, M, D, stride_a, stride_b, stride_g, inv_tau, log_k, N_BUCKET, M_BUCKET, CRITIC_KEY,
                       GRAD: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr, BF16: tl.constexpr,
                       EMULATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
        cols, cmask, dk, dmask = _program_block(BLOCK_M, M, D_PAD, D)
        b = _load_rows(B, cols, stride_b, dk, cmask, dmask, BF16, EMULATE)  # once for the whole anchor loop
        yb = tl.load(YB + cols, mask=cmask, other=-2)
        acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            rmask = rows < N
            a = _load_rows(A, rows, stride_a, dk, rmask, dmask, BF16, EMULATE)
            xt = _dot(b, tl.trans(a), None, PRECISION, BF16, EMULATE) * inv_tau  # [BLOCK_M, BLOCK_N]
            ya = tl.load(YA + rows, mask=rmask, other=-1)
            stat = tl.load(STAT + rows, mask=rmask, other=0.0)
            inv_npos = tl.load(INV_NPOS + rows, mask=rmask, other=0.0)
            w_neg = tl.load(W_NEG + rows, mask=rmask, other=0.0)
            row_scale = tl.load(ROW_SCALE + rows, mask=rmask, other=0.0)
            valid = rmask[None, :]
            eq = (yb[:, None] == ya[None, :]) & valid
            h = GRAD(xt, eq, stat[None, :], inv_npos[None, :], w_neg[None, :], log_k)
            acc = _dot(tl.where(valid, h * row_scale[None, :], 0.0), a, acc, PRECISION, BF16, EMULATE)
        _store_rows(GB, cols, stride_g, dk, cmask, dmask, acc)

    # (BLOCK_N, BLOCK_M, warps, stages) the autotuner times, per precision. Chosen by compiling both
    # kernels for sm_90 (triton 3.9's ptxas, no GPU needed) and reading registers and spills: bf16
    # and tf32 have spill-free configurations; tf32x3 (each operand split in two) and the fp32 FMA
    # path spill in every one, least with a narrow key tile.
    _CONFIGS = {
        "tf32x3": [(32, 32, 4, 3), (64, 32, 8, 3), (128, 32, 8, 2), (64, 64, 8, 3)],
        "tf32": [(64, 32, 8, 3), (128, 32, 8, 2), (64, 64, 8, 3), (128, 64, 8, 2)],
        "bf16": [(64, 64, 8, 3), (128, 64, 8, 2), (64, 32, 8, 3), (128, 32, 8, 2)],
        "ieee": [(32, 32, 4, 3), (64, 32, 8, 3)],
    }
    _GPU_FIXED = dict(BLOCK_N=64, BLOCK_M=32, num_warps=8, num_stages=3)  # in every list above
    _INTERPRETER_FIXED = dict(BLOCK_N=32, BLOCK_M=32)

    def _fits(block_n: int, block_m: int, d_pad: int) -> bool:
        """Keep each [block, D] fp32 tile (resident rows, accumulator) within 64 KiB of registers."""
        return max(block_n, block_m) * d_pad <= 128 * 128

    def _prune(configs, nargs, **kwargs):
        arg = lambda name: kwargs.get(name, nargs.get(name))
        wanted = _CONFIGS["bf16" if arg("BF16") else arg("PRECISION")]
        kept = [c for c in configs if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) in wanted
                and _fits(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"], arg("D_PAD"))]
        return kept or [c for c in configs if c.kwargs["BLOCK_N"] == 32 and c.kwargs["BLOCK_M"] == 32][:1]

    def _autotuned(kernel, key):
        union = sorted({cfg for cfgs in _CONFIGS.values() for cfg in cfgs})
        configs = [triton.Config({"BLOCK_N": bn, "BLOCK_M": bm}, num_warps=w, num_stages=s) for bn, bm, w, s in union]
        return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": _prune})(kernel)

    # (N_BUCKET, M_BUCKET, CRITIC_KEY: plain ints the kernels ignore, there for the tuning key)
    _forward_tuned = None if INTERPRET else _autotuned(
        _forward_kernel, ["N_BUCKET", "M_BUCKET", "CRITIC_KEY", "D_PAD", "PRECISION", "BF16", "NEED_U"])
    _grad_b_tuned = None if INTERPRET else _autotuned(
        _grad_b_kernel, ["N_BUCKET", "M_BUCKET", "CRITIC_KEY", "D_PAD", "PRECISION", "BF16"])


def _launch(kernel, tuned, grid_of, args, meta) -> None:
    """Fixed tiles in the interpreter (and on GPU with autotuning switched off), else autotuned."""
    if INTERPRET:
        kernel[grid_of(_INTERPRETER_FIXED)](*args, **meta, **_INTERPRETER_FIXED)
    elif backend.AUTOTUNE:
        tuned[grid_of](*args, **meta)
    else:
        kernel[grid_of(_GPU_FIXED)](*args, **meta, **_GPU_FIXED)


def _operands(a_hat, b_hat, precision):
    """Kernel operands (float32 normalised rows, or bf16 copies) and the constexprs of the precision."""
    bf16 = precision == "bf16"
    if bf16:
        a_hat, b_hat = a_hat.to(torch.bfloat16), b_hat.to(torch.bfloat16)
    dot_precision = "ieee" if bf16 else precision
    d_pad = max(16, triton.next_power_of_2(a_hat.shape[1]))
    return a_hat, b_hat, dict(D_PAD=d_pad, PRECISION=dot_precision, BF16=bf16, EMULATE=INTERPRET)


def _tuning_key(N: int, M: int, critic: str):
    """Autotune keys: sizes rounded to powers of two (nearby shapes share one tuning), the critic."""
    return max(1, N).bit_length(), max(1, M).bit_length(), list(CRITICS).index(critic)


def forward(a_hat, b_hat, ya, yb, inv_npos, w_neg, log_k, tau, critic, precision, need_u):
    """(row loss without the linear positive part, per-anchor statistic, U [N, D] or [0]), float32."""
    N, M, D = a_hat.shape[0], b_hat.shape[0], a_hat.shape[1]
    crit = CRITICS[critic]
    loss = a_hat.new_empty(N, dtype=torch.float32)
    stat = a_hat.new_empty(N, dtype=torch.float32)
    u = a_hat.new_empty((N, D) if need_u else (0,), dtype=torch.float32)
    a_op, b_op, meta = _operands(a_hat, b_hat, precision)
    u_arg, u_stride = (u, u.stride(0)) if need_u else (loss, 0)
    args = (a_op, b_op, ya, yb, inv_npos, w_neg, loss, stat, u_arg, N, M, D, a_op.stride(0), b_op.stride(0),
            u_stride, 1.0 / tau, log_k, *_tuning_key(N, M, critic))
    meta.update(INIT=crit.tile_init, UPDATE=crit.tile_update, FINAL=crit.tile_final, NEED_U=need_u)
    with device_guard(a_hat):
        _launch(_forward_kernel, _forward_tuned, lambda m: (triton.cdiv(N, m["BLOCK_N"]),), args, meta)
    return loss, stat, u


def grad_b(a_hat, b_hat, ya, yb, inv_npos, w_neg, log_k, stat, row_scale, tau, critic, precision):
    """sum_i row_scale_i * (dl_i/dx_ij without the linear positive part) * a_hat_i, float32 [M, D]."""
    N, M, D = a_hat.shape[0], b_hat.shape[0], a_hat.shape[1]
    gb = b_hat.new_empty((M, D), dtype=torch.float32)
    a_op, b_op, meta = _operands(a_hat, b_hat, precision)
    args = (a_op, b_op, ya, yb, inv_npos, w_neg, stat, row_scale, gb, N, M, D, a_op.stride(0), b_op.stride(0),
            gb.stride(0), 1.0 / tau, log_k, *_tuning_key(N, M, critic))
    meta.update(GRAD=CRITICS[critic].tile_grad)
    with device_guard(a_hat):
        _launch(_grad_b_kernel, _grad_b_tuned, lambda m: (triton.cdiv(M, m["BLOCK_M"]),), args, meta)
    return gb

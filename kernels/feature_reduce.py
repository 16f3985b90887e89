"""Feature-hook reduction: adaptive average pooling to p x p, flattened, optionally cast.

MIM4DD taps layer-wise feature maps. Keeping them whole (and the graph behind them) is what makes
naive hooks expensive, so a tap keeps only ``adaptive_avg_pool2d(x, p).flatten(1)`` in a storage
dtype. The backward of average pooling needs only the output gradient and the input *shape*:

    grad_x[b, c, h, w] = sum over windows (i, j) containing (h, w) of grad_out[b, c, i, j] / |window(i, j)|

so this op saves no tensor for backward: ``feature_reduce`` keeps neither the input nor anything of
its size alive. Window (i, j) spans rows [floor(i*H/p), ceil((i+1)*H/p)) and the same for columns,
exactly as ``F.adaptive_avg_pool2d`` (windows overlap when p does not divide H, and when H < p).

Two implementations, chosen by ``impl``:
- "triton": one program per block of (b, c) maps reads each map once and writes its p*p means
  (float32 accumulation; float64 inputs accumulate in float64); the backward scatters
  grad_out / window size into the input-shaped gradient. On CPU it runs only under
  TRITON_INTERPRET=1 (the tests).
- "chunked": plain PyTorch with the same memory behaviour (forward ``adaptive_avg_pool2d``, backward
  a loop over the p*p windows adding grad_out / window size into the window's slice). The name
  matches the other kernels' CPU twins; pooling needs no chunking, since no temporary is larger than
  the output.
"auto" picks triton for CUDA tensors when triton imports, else chunked.

The kernels sit behind the custom ops ``mim4dd_fast::feature_reduce`` and ``::feature_reduce_backward``
(fake impls and vmap rules, so torch.compile traces through hooks); autograd is an autograd.Function
around them whose setup_context stores only shape, dtype, p and impl, so torch.func works too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import HAVE_TRITON, device_guard, tl, triton
from .checks import check_feature_reduce_args

IMPLS = ("auto", "triton", "chunked")

__all__ = ["feature_reduce", "window", "IMPLS"]


def window(i: int, size: int, p: int) -> tuple[int, int]:
    """[start, end) of output cell i along an axis of length ``size`` (adaptive pooling's rule)."""
    return (i * size) // p, ((i + 1) * size + p - 1) // p


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAVE_TRITON:

    @triton.jit
    def _pool_fwd_kernel(
        x_ptr, out_ptr, R, C, H, W, s_b, s_c, s_h, s_w,
        P: tl.constexpr, PP_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HW: tl.constexpr,
        ACC: tl.constexpr,
    ):
        """out[r, i*P + j] = mean of map r over window (i, j); map r = (b, c) = (r // C, r % C)."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        rows64 = rows.to(tl.int64)
        base = (rows64 // C) * s_b + (rows64 % C) * s_c
        cols = tl.arange(0, PP_PAD)
        acc = tl.zeros([BLOCK_R, PP_PAD], dtype=ACC)
        hw = H * W
        for start in range(0, hw, BLOCK_HW):
            offs = start + tl.arange(0, BLOCK_HW)
            h = offs // W
            w = offs % W
            ptrs = x_ptr + base[:, None] + (h.to(tl.int64) * s_h + w.to(tl.int64) * s_w)[None, :]
            tile = tl.load(ptrs, mask=row_ok[:, None] & (offs < hw)[None, :], other=0.0).to(ACC)
            for i in tl.static_range(P):
                in_h = (h >= (i * H) // P) & (h < ((i + 1) * H + P - 1) // P)
                for j in tl.static_range(P):
                    in_w = (w >= (j * W) // P) & (w < ((j + 1) * W + P - 1) // P)
                    s = tl.sum(tl.where((in_h & in_w)[None, :], tile, 0.0), axis=1)
                    acc += tl.where(cols[None, :] == i * P + j, s[:, None], 0.0)
        ci = cols // P
        cj = cols % P
        h_len = ((ci + 1) * H + P - 1) // P - (ci * H) // P
        w_len = ((cj + 1) * W + P - 1) // P - (cj * W) // P
        count = tl.where(cols < P * P, h_len * w_len, 1).to(ACC)
        mean = acc / count[None, :]
        out_ptrs = out_ptr + rows64[:, None] * (P * P) + cols[None, :]
        out_mask = row_ok[:, None] & (cols < P * P)[None, :]
        tl.store(out_ptrs, mean.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _pool_bwd_kernel(
        g_ptr, gx_ptr, R, H, W,
        P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HW: tl.constexpr, ACC: tl.constexpr,
    ):
        """gx[r, h, w] = sum over windows (i, j) containing (h, w) of g[r, i*P + j] / |window|."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        rows64 = rows.to(tl.int64)
        hw = H * W
        offs = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
        h = offs // W
        w = offs % W
        acc = tl.zeros([BLOCK_R, BLOCK_HW], dtype=ACC)
        for i in tl.static_range(P):
            h0 = (i * H) // P
            h1 = ((i + 1) * H + P - 1) // P
            in_h = (h >= h0) & (h < h1)
            for j in tl.static_range(P):
                w0 = (j * W) // P
                w1 = ((j + 1) * W + P - 1) // P
                in_w = (w >= w0) & (w < w1)
                g = tl.load(g_ptr + rows64 * (P * P) + (i * P + j), mask=row_ok, other=0.0).to(ACC)
                # no .to() here: with H or W == 1 triton specialises them and these are constexpr
                g = g / ((h1 - h0) * (w1 - w0))
                acc += tl.where((in_h & in_w)[None, :], g[:, None], 0.0)
        ptrs = gx_ptr + rows64[:, None] * hw + offs[None, :]
        tl.store(ptrs, acc.to(gx_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs < hw)[None, :])


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(rows: int, hw: int) -> tuple[int, int]:
    """Tile of about 4096 elements: a whole small map per row, many maps per program."""
    block_hw = min(triton.next_power_of_2(hw), 1024)
    block_r = max(1, min(triton.next_power_of_2(rows), 4096 // block_hw))
    return block_r, block_hw


def _triton_forward(x: Tensor, p: int, out_dtype: torch.dtype) -> Tensor:
    B, C, H, W = x.shape
    rows = B * C
    out = torch.empty(B, C * p * p, dtype=out_dtype, device=x.device)
    if rows == 0:
        return out
    block_r, block_hw = _blocks(rows, H * W)
    with device_guard(x):
        _pool_fwd_kernel[(triton.cdiv(rows, block_r),)](
            x, out, rows, C, H, W, *x.stride(),
            P=p, PP_PAD=triton.next_power_of_2(p * p), BLOCK_R=block_r, BLOCK_HW=block_hw,
            ACC=_acc_dtype(x.dtype),
        )
    return out


def _triton_backward(grad: Tensor, shape: list[int], p: int, dtype: torch.dtype) -> Tensor:
    B, C, H, W = shape
    rows = B * C
    grad_x = torch.empty(shape, dtype=dtype, device=grad.device)
    if rows == 0:
        return grad_x
    grad = grad.contiguous()
    block_r, block_hw = _blocks(rows, H * W)
    with device_guard(grad):
        _pool_bwd_kernel[(triton.cdiv(rows, block_r), triton.cdiv(H * W, block_hw))](
            grad, grad_x, rows, H, W,
            P=p, BLOCK_R=block_r, BLOCK_HW=block_hw, ACC=_acc_dtype(dtype),
        )
    return grad_x


# ----------------------------------------------------------------------------------------------
# Pure-PyTorch twin
# ----------------------------------------------------------------------------------------------
def _chunked_forward(x: Tensor, p: int, out_dtype: torch.dtype) -> Tensor:
    return F.adaptive_avg_pool2d(x, p).flatten(1).to(out_dtype)


def _chunked_backward(grad: Tensor, shape: list[int], p: int, dtype: torch.dtype) -> Tensor:
    """Add grad_out / window size into each window's slice: the definition, overlaps included."""
    B, C, H, W = shape
    g = grad.reshape(B, C, p, p).to(dtype)
    grad_x = g.new_zeros(shape)
    for i in range(p):
        h0, h1 = window(i, H, p)
        for j in range(p):
            w0, w1 = window(j, W, p)
            grad_x[:, :, h0:h1, w0:w1] += (g[:, :, i, j] / ((h1 - h0) * (w1 - w0)))[:, :, None, None]
    return grad_x


# ----------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile, with fake impls and vmap rules) and their autograd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("mim4dd_fast::feature_reduce", mutates_args=())
def _feature_reduce_op(x: Tensor, p: int, out_dtype: torch.dtype, impl: str) -> Tensor:
    if impl == "triton":
        return _triton_forward(x, p, out_dtype)
    return _chunked_forward(x, p, out_dtype)


@_feature_reduce_op.register_fake
def _(x: Tensor, p: int, out_dtype: torch.dtype, impl: str) -> Tensor:
    return x.new_empty((x.shape[0], x.shape[1] * p * p), dtype=out_dtype)


@torch.library.custom_op("mim4dd_fast::feature_reduce_backward", mutates_args=())
def _feature_reduce_backward_op(
    grad: Tensor, shape: list[int], p: int, dtype: torch.dtype, impl: str
) -> Tensor:
    if impl == "triton":
        return _triton_backward(grad, shape, p, dtype)
    return _chunked_backward(grad, shape, p, dtype)


@_feature_reduce_backward_op.register_fake
def _(grad: Tensor, shape: list[int], p: int, dtype: torch.dtype, impl: str) -> Tensor:
    return grad.new_empty(shape, dtype=dtype)


@_feature_reduce_op.register_vmap
def _(info, in_dims, x, p, out_dtype, impl):
    if in_dims[0] is None:
        return _feature_reduce_op(x, p, out_dtype, impl), None
    x = x.movedim(in_dims[0], 0)
    out = _feature_reduce_op(x.flatten(0, 1), p, out_dtype, impl)
    return out.unflatten(0, x.shape[:2]), 0


@_feature_reduce_backward_op.register_vmap
def _(info, in_dims, grad, shape, p, dtype, impl):
    if in_dims[0] is None:
        return _feature_reduce_backward_op(grad, shape, p, dtype, impl), None
    grad = grad.movedim(in_dims[0], 0)
    n = grad.shape[0]
    out = _feature_reduce_backward_op(grad.flatten(0, 1), [n * shape[0], *shape[1:]], p, dtype, impl)
    return out.unflatten(0, (n, shape[0])), 0


# Autograd lives in two autograd.Functions around the ops (not op.register_autograd) because
# torch.func transforms (grad, vmap, jacrev) need a Function with setup_context; the generated one
# of register_autograd is rejected by them. setup_context keeps only Python values: no tensor.
class _FeatureReduce(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, p: int, out_dtype: torch.dtype, impl: str) -> Tensor:
        return _feature_reduce_op(x, p, out_dtype, impl)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, p, _, impl = inputs
        ctx.shape, ctx.dtype, ctx.p, ctx.impl = list(x.shape), x.dtype, p, impl

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _FeatureReduceBackward.apply(grad, ctx.shape, ctx.p, ctx.dtype, ctx.impl), None, None, None


class _FeatureReduceBackward(torch.autograd.Function):
    """The backward is linear in grad_out and its adjoint is the forward pooling: double backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad: Tensor, shape: list[int], p: int, dtype: torch.dtype, impl: str) -> Tensor:
        return _feature_reduce_backward_op(grad, shape, p, dtype, impl)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        grad, _, p, _, impl = inputs
        ctx.grad_dtype, ctx.p, ctx.impl = grad.dtype, p, impl

    @staticmethod
    def backward(ctx, grad_grad_x: Tensor):
        grad_grad = _FeatureReduce.apply(grad_grad_x, ctx.p, ctx.grad_dtype, ctx.impl)
        return grad_grad, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Public entry
# ----------------------------------------------------------------------------------------------
def _resolve_impl(x: Tensor, impl: str) -> str:
    if impl == "auto":
        return "triton" if (x.is_cuda and HAVE_TRITON) else "chunked"
    return impl


def feature_reduce(
    x: Tensor, p: int = 2, out_dtype: torch.dtype | None = None, impl: str = "auto"
) -> Tensor:
    """``adaptive_avg_pool2d(x, p).flatten(1)`` as [B, C*p*p] in ``out_dtype`` (default x's dtype).

    Differentiable; saves no tensor for backward (the input gradient comes back in x's dtype).
    ``impl``: "auto" (triton on CUDA, else chunked), "triton" or "chunked". Raises
    KernelArgumentError (a ConfigError) on bad arguments.
    """
    check_feature_reduce_args(x, p, out_dtype, impl, IMPLS)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    return _FeatureReduce.apply(x, p, out_dtype, _resolve_impl(x, impl))

"""The ConvNet's instance norm and 2x2 average pool, made fast on CPU where distillation differentiates twice.

MTT differentiates through the student's gradient (``create_graph=True``) and DC through its
gradient-matching loss, so both take the second derivative of every layer. On CPU two of torch's
layers are slow there (measured, docs/benchmarks.md "Where an MTT iteration goes"):

* ``InstanceNorm`` (GroupNorm(C, C, affine), the originals' instance norm). Under ``create_graph`` torch
  computes the first-order backward of ``native_group_norm`` with a composite formula of dozens of
  elementwise ops instead of its fused kernel, and the second derivative walks that composite again.
  Here the first-order backward is always the fused kernel (``native_group_norm_backward``), and its
  own backward is written out by hand. Per instance (one image's one channel, M = H*W values), with
  x̂ = (x - mean) * r, r = 1/sqrt(var + eps), P(v) = v - mean(v) - x̂ * mean(v * x̂) and a = dy * w:

      first order:   dx = r * P(a),   dw = sum(dy * x̂),   db = sum(dy)
      second order, given the incoming gradients gx, gw, gb of (dx, dw, db):
          d dy = gb + gw * x̂ + w * r * P(gx)
          d w  = sum(dy * r * P(gx))
          d x  = r * P(u) - r^2 * x̂ * (mean(gx * a) - mean(a) * mean(gx) - mean(gx * x̂) * mean(a * x̂))
                 with u = gw * dy - r * (gx * mean(a * x̂) + a * mean(gx * x̂))

  (P is symmetric, so d<gx, r P(a)>/da = r P(gx); the x-terms follow x̂ and r through the mean and
  variance.) A third derivative is not supported (nothing here needs one).
* ``AvgPool2`` (2x2, stride 2). torch's CPU ``avg_pool2d`` and its backward run 4-5x slower than four
  strided adds / copies on the small batches of a student step; the pool and its backward here are
  each other's adjoint, so every order of derivative stays exact.

Both are the same modules, parameters and results as torch's (tested against them to float64
rounding, first and second order: tests/test_layers.py); off CPU, for channels-last inputs and odd sizes
they run torch's own ops. Under CPU bfloat16 autocast the norm takes bfloat16 activations as torch's does
(its second derivative in float32) and the pool runs torch's.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


def _stats_shape(x: Tensor) -> tuple[int, int, int]:
    n, c = x.shape[:2]
    return n, c, x[0, 0].numel()


class _InstanceNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        n, c, m = _stats_shape(x)
        y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, m, c, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = _InstanceNormBackwardFn.apply(dy, x, weight, mean, rstd)
        return dx, dw, db, None


class _InstanceNormBackwardFn(torch.autograd.Function):
    """(dy, x, w) -> (dx, dw, db) by the fused kernel; its backward is the hand-written second derivative."""

    @staticmethod
    def forward(ctx, dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor):
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zero-filled tensors
        n, c, m = _stats_shape(x)
        dy = dy.contiguous()
        dx, dw, db = torch.ops.aten.native_group_norm_backward(dy, x, mean, rstd, weight, n, c, m, c,
                                                               [True, True, True])
        ctx.save_for_backward(dy, x, weight, mean, rstd)
        return dx, dw, db

    @staticmethod
    @once_differentiable
    def backward(ctx, gx: Tensor | None, gw: Tensor | None, gb: Tensor | None):
        # The formulas of the module docstring, regrouped so that each output is a per-instance linear
        # combination of dy, gx and x: five reductions and seven passes over the full-size tensors.
        dy, x, weight, mean, rstd = ctx.saved_tensors
        n, c, m = _stats_shape(x)
        shape, dy_dtype, x_dtype = x.shape, dy.dtype, x.dtype
        # bfloat16 activations (under autocast) are differentiated in float32, as torch's kernels accumulate
        work = torch.promote_types(x.dtype, torch.float32)
        x, dy = x.reshape(n, c, m).to(work), dy.reshape(n, c, m).to(work)
        r, mu = rstd.view(n, c, 1).to(work), mean.view(n, c, 1).to(work)
        w = weight.view(1, c, 1).to(work)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        s_dy = dy.mean(2, keepdim=True)
        m_dy_xhat = r * (_mean_product(dy, x) - mu * s_dy)  # mean(dy * x̂)
        if gx is not None:
            gx = gx.reshape(n, c, m).to(work)
            m_g = gx.mean(2, keepdim=True)
            m_gx_xhat = r * (_mean_product(gx, x) - mu * m_g)  # mean(gx * x̂)
            m_g_dy = _mean_product(gx, dy)
        else:
            m_g = m_gx_xhat = m_g_dy = zero
        gw = zero if gw is None else gw.view(1, c, 1).to(work)
        gb = zero if gb is None else gb.view(1, c, 1).to(work)
        wr = w * r
        m_a, m_a_xhat = w * s_dy, w * m_dy_xhat  # mean(a), mean(a * x̂)
        s = w * m_g_dy - m_a * m_g - m_gx_xhat * m_a_xhat
        alpha, beta = gw - wr * m_gx_xhat, -r * m_a_xhat  # u = alpha * dy + beta * gx
        m_u, m_u_xhat = alpha * s_dy + beta * m_g, alpha * m_dy_xhat + beta * m_gx_xhat
        k = r * m_u_xhat + r * r * s  # d x = r * (u - mean(u)) - k * x̂
        g_x = _combine(dy, r * alpha, gx, r * beta, x, -r * k, r * (mu * k - m_u))
        g_dy = _combine(gx, wr, None, None, x, alpha * r, gb - wr * m_g - alpha * r * mu)
        g_w = (r * (m_g_dy - m_g * s_dy - m_gx_xhat * m_dy_xhat)).sum((0, 2)) * m
        return g_dy.view(shape).to(dy_dtype), g_x.view(shape).to(x_dtype), g_w.to(weight.dtype), None, None


def _mean_product(a: Tensor, b: Tensor) -> Tensor:
    """mean(a * b) over the last dim of [N, C, M] tensors (vecdot: no [N, C, M] temporary)."""
    return torch.linalg.vecdot(a, b, dim=2).unsqueeze(2) / a.shape[2]


def _combine(a: Tensor | None, ca: Tensor, b: Tensor | None, cb: Tensor | None, x: Tensor, cx: Tensor,
             const: Tensor) -> Tensor:
    """ca * a + cb * b + cx * x + const with per-instance coefficients, in place into one new tensor."""
    out = x * cx
    if a is not None:
        out.addcmul_(a, ca)
    if b is not None:
        out.addcmul_(b, cb)
    return out.add_(const)


def _on_cpu_plain(x: Tensor) -> bool:
    """The custom paths' domain: plain-layout 4-d CPU tensors outside torch.func transforms (vmap/grad see
    torch's own ops, which they know how to batch)."""
    return x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous() and not _functorch_active()


def _functorch_active() -> bool:
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


class InstanceNorm(nn.GroupNorm):
    """GroupNorm(C, C, affine): torch's module, parameters and results, with a cheap second derivative on CPU."""

    def __init__(self, num_channels: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__(num_channels, num_channels, eps=eps, affine=True, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        # Under CPU bfloat16 autocast torch's group norm takes bfloat16 activations with float32 parameters
        # (mixed types, bfloat16 out); so does ours, its second derivative computed in float32.
        if torch.is_autocast_enabled("cpu"):
            dtypes_ok = x.dtype == torch.bfloat16 and self.weight.dtype == torch.float32
        else:
            dtypes_ok = x.dtype == self.weight.dtype
        if torch.is_grad_enabled() and dtypes_ok and _on_cpu_plain(x) and x[0, 0].numel() > 1:
            return _InstanceNormFn.apply(x, self.weight, self.bias, self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


# -- the 2x2 average pool ----------------------------------------------------------------------------


def _pool(x: Tensor) -> Tensor:
    """2x2 mean, stride 2, of an even-sized [N, C, H, W] tensor: two strided adds."""
    cols = x[..., 0::2] + x[..., 1::2]
    return (cols[..., 0::2, :] + cols[..., 1::2, :]).mul_(0.25)


def _unpool(g: Tensor) -> Tensor:
    """The pool's adjoint: each output gradient spread as g / 4 over its 2x2 window (four strided copies)."""
    n, c, h, w = g.shape
    out = g.new_empty((n, c, 2 * h, 2 * w))
    quarter = g * 0.25
    for i in (0, 1):
        for j in (0, 1):
            out[:, :, i::2, j::2] = quarter
    return out


class _PoolFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return _pool(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return _UnpoolFn.apply(g)


class _UnpoolFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g: Tensor) -> Tensor:
        return _unpool(g)

    @staticmethod
    def backward(ctx, gg: Tensor) -> Tensor:
        return _PoolFn.apply(gg.contiguous())


class AvgPool2(nn.AvgPool2d):
    """AvgPool2d(2, 2): torch's module and results; on CPU, for even-sized contiguous inputs, strided adds."""

    def __init__(self) -> None:
        super().__init__(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        if (not torch.is_autocast_enabled("cpu") and _on_cpu_plain(x)
                and x.shape[-1] % 2 == 0 and x.shape[-2] % 2 == 0):
            return _PoolFn.apply(x)
        return F.avg_pool2d(x, 2, 2)


def with_torch_layers(net: nn.Module, in_place: bool = False) -> nn.Module:
    """``net`` with torch's own GroupNorm / AvgPool2d in place of ``InstanceNorm`` / ``AvgPool2`` (same
    parameters): the oracle of the tests and the "before" of bench/layers.py."""
    net = net if in_place else copy.deepcopy(net)
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, InstanceNorm):
                plain = nn.GroupNorm(child.num_groups, child.num_channels, eps=child.eps).to(child.weight)
                plain.load_state_dict(child.state_dict())
                plain.requires_grad_(child.weight.requires_grad)
                setattr(parent, name, plain)
            elif isinstance(child, AvgPool2):
                setattr(parent, name, nn.AvgPool2d(2, 2))
    return net

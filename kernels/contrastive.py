"""Fused normalized-similarity contrastive loss (InfoNCE / binary NCE): dispatch, custom ops, autograd.

The math (docs/method.md, "Fused contrastive loss") is written out plainly in
``reference.contrastive_loss_reference``. The fused paths never hold the N x M similarity matrix:

* ``chunked`` (``contrastive_chunked.py``, PyTorch, any device) and ``triton``
  (``contrastive_triton.py``) share one structure: the forward computes the logits once and, when
  the anchors need a gradient, also U = sum_j (dl_i/dx_ij) b_hat_j (the anchors' gradient up to the
  upstream row weights, which separate); the backward recomputes the logits once for the keys'
  gradient and only if the keys need one. 8NMD matmul FLOPs in all, 6NMD of them useful.
* A part of the loss that is linear in x over the positives (InfoNCE's -mean_{P_i} x_ij) goes through
  per-class sums of the normalised vectors (O((N + M) D)), found by sorting the key labels: no mask,
  no host sync.

Both normalise in PyTorch (float32 for half inputs; the Triton path always computes in float32)
before the kernels and chain the gradient of the normalisation afterwards. Autograd saves the inputs
a, b (alive in the caller anyway), the labels, one float per anchor and U ([N, D], only when the
anchors need a gradient). The forward has one host sync (the label check); the backward has none.

The public entry ``contrastive_loss`` goes through the custom ops ``mim4dd_fast::contrastive_loss`` and
``::contrastive_loss_backward`` (fake impls + ``register_autograd``), so it works inside
``torch.compile(fullgraph=True)``; their FLOP formulas count the useful matmul FLOPs where they are
done (``contrastive_flops`` also reports the executed ones).
"""

from __future__ import annotations

import contextlib
import math

import torch

from . import contrastive_chunked, contrastive_triton
from .backend import HAVE_TRITON
from .checks import KernelArgumentError, check_contrastive_args, check_contrastive_labels
from .critics import CRITICS
from .reference import NORM_EPS, compute_dtype, contrastive_loss_reference

__all__ = ["contrastive_loss", "contrastive_flops", "resolve_impl", "resolve_precision", "torch_matmul_precision",
           "IMPLS", "PRECISIONS", "EAGER_MAX_LOGITS"]

IMPLS = ("auto", "chunked", "triton", "reference")
PRECISIONS = ("auto", *contrastive_triton.PRECISIONS)
# impl="auto" on CUDA runs the plain PyTorch reference ("eager") below this many logits (N * M): there a
# few library GEMMs beat the fixed cost of the fused path. Provisional (no GPU was available to
# measure it); bench/gpu_check.sh measures the crossover and reports it in its summary.
EAGER_MAX_LOGITS = 1 << 21


def contrastive_flops(N: int, M: int, D: int, need_a: bool = True, need_b: bool = True) -> dict[str, int]:
    """Matmul FLOPs of one forward + backward of the fused paths.

    ``useful``: what the math needs (2NMD logits + 2NMD per requested gradient, what eager autograd
    does and what FlopCounterMode reports for the custom ops). ``executed``: the fused paths' work:
    the forward pass computes the logits and the anchors' gradient (``forward_pass``), the backward
    recomputes the logits for the keys' gradient (``backward_pass``, ``recompute``).
    """
    nmd2 = 2 * N * M * D
    forward_pass = nmd2 * (1 + int(need_a))
    backward_pass = 2 * nmd2 if need_b else 0
    return {
        "useful": nmd2 * (1 + int(need_a) + int(need_b)),
        "executed": forward_pass + backward_pass,
        "forward_pass": forward_pass,
        "backward_pass": backward_pass,
        "recompute": nmd2 if need_b else 0,
    }


# --------------------------------------------------------------------------------------------------
# shared per-call preparation (O((N + M) D) and O((N + M) log M), no N x M work, no host sync)
# --------------------------------------------------------------------------------------------------
class _Classes:
    """Positive counts and per-class sums, via the keys' labels sorted once.

    Each class is represented by one key index (the first of its class in sorted order), so per-class
    sums go through ``index_add_`` into [M, D] buffers without knowing the number of classes.
    """

    def __init__(self, ya: torch.Tensor, yb: torch.Tensor) -> None:
        sorted_b, order = torch.sort(yb, stable=True)
        lo = torch.searchsorted(sorted_b, ya)
        self.npos = torch.searchsorted(sorted_b, ya, right=True) - lo
        self.present = self.npos > 0
        self.rep_a = order[lo.clamp(max=yb.shape[0] - 1)]
        self.rep_b = order[torch.searchsorted(sorted_b, yb)]

    def key_sums(self, v: torch.Tensor) -> torch.Tensor:
        """[N, D]: for each anchor, the sum of v over the keys of its class (0 without positives)."""
        sums = torch.zeros_like(v).index_add_(0, self.rep_b, v)
        return sums[self.rep_a] * self.present[:, None]

    def anchor_sums(self, w: torch.Tensor, num_keys: int) -> torch.Tensor:
        """[M, D]: for each key, the sum of w over the anchors of its class."""
        sums = w.new_zeros(num_keys, w.shape[1]).index_add_(0, self.rep_a, w * self.present[:, None])
        return sums[self.rep_b]


def _normalize(x: torch.Tensor, dt: torch.dtype):
    x = x.to(dt)
    r = x.norm(dim=1)
    return (x / r.clamp_min(NORM_EPS)[:, None]).contiguous(), r


def _normalize_backward(g_hat: torch.Tensor, x_hat: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Gradient of x_hat = x / max(||x||, eps): (g - x_hat <x_hat, g>) / ||x|| (just g / eps when clamped)."""
    proj = torch.where(r >= NORM_EPS, (x_hat * g_hat).sum(dim=1), torch.zeros_like(r))
    return (g_hat - x_hat * proj[:, None]) / r.clamp_min(NORM_EPS)[:, None]


def _work_dtype(dtype: torch.dtype, impl: str) -> torch.dtype:
    return torch.float32 if impl == "triton" else compute_dtype(dtype)


class _Prepared:
    """Normalised rows, int64 labels, class bookkeeping and the per-anchor constants of the critics."""

    def __init__(self, a, b, ya, yb, impl, noise_ratio, neg_weight) -> None:
        dt = _work_dtype(a.dtype, impl)
        self.a_hat, self.ra = _normalize(a, dt)
        self.b_hat, self.rb = _normalize(b, dt)
        self.ya, self.yb = ya.to(torch.int64).contiguous(), yb.to(torch.int64).contiguous()
        self.classes = _Classes(self.ya, self.yb)
        npos = self.classes.npos.to(dt)
        self.inv_npos = (1.0 / npos.clamp_min(1)).contiguous()
        self.w_neg = (neg_weight / (b.shape[0] - npos).clamp_min(1)).contiguous()
        self.log_k = math.log(noise_ratio)
        self.valid = self.classes.present

    def row_scale(self, gout: torch.Tensor, reduction: str, tau: float) -> torch.Tensor:
        """dL/dl_i / tau: gout / #valid ("mean") or gout_i ("none"); 0 for anchors without positives."""
        validf = self.valid.to(self.a_hat.dtype)
        weights = gout.to(validf.dtype) * validf
        if reduction == "mean":
            weights = weights / validf.sum()
        return (weights / tau).contiguous()


@contextlib.contextmanager
def torch_matmul_precision(device: torch.device, precision: str):
    """cuBLAS GEMMs of the PyTorch paths at ``precision``: TF32 only for "tf32" (cuBLAS has no 3xTF32
    mode; plain fp32 is at least as accurate). No effect on CPU."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _path(impl: str):
    return contrastive_triton if impl == "triton" else contrastive_chunked


# --------------------------------------------------------------------------------------------------
# custom ops: forward and backward, each opaque to torch.compile
# --------------------------------------------------------------------------------------------------
def _forward_impl(a, b, ya, yb, tau, critic, noise_ratio, neg_weight, reduction, impl, precision, need_u):
    """(loss, stat, u): stat [N] is the critic's per-anchor statistic (InfoNCE: logsumexp) and u [N, D]
    the anchors' gradient per unit row weight (empty unless need_u), both kept for the backward."""
    p = _Prepared(a, b, ya, yb, impl, noise_ratio, neg_weight)
    lowest, any_positive = torch.stack([torch.minimum(p.ya.min(), p.yb.min()), p.valid.any().long()]).tolist()
    check_contrastive_labels(lowest, bool(any_positive))
    path = _path(impl)
    with torch_matmul_precision(a.device, precision):
        loss, stat, u = path.forward(p.a_hat, p.b_hat, p.ya, p.yb, p.inv_npos, p.w_neg, p.log_k, tau, critic,
                                     precision, need_u)
    coef = CRITICS[critic].positive_coef(p.inv_npos)
    if coef is not None:  # l_i += coef_i * sum_{j in P_i} x_ij = coef_i <a_hat_i, S_i> / tau
        pos_sum = p.classes.key_sums(p.b_hat)
        loss = loss + coef * (p.a_hat * pos_sum).sum(dim=1) / tau
        if need_u:
            u.add_(coef[:, None] * pos_sum)
    loss = torch.where(p.valid, loss, torch.zeros_like(loss)).to(compute_dtype(a.dtype))
    if reduction == "mean":
        loss = loss.sum() / p.valid.sum()
    return loss, stat, u


@torch.library.custom_op("mim4dd_fast::contrastive_loss", mutates_args=())
def _contrastive_op(a: torch.Tensor, b: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor, tau: float,
                    critic: str, noise_ratio: float, neg_weight: float, reduction: str, impl: str,
                    precision: str, need_u: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward_impl(a, b, ya, yb, tau, critic, noise_ratio, neg_weight, reduction, impl, precision, need_u)


@_contrastive_op.register_fake
def _(a, b, ya, yb, tau, critic, noise_ratio, neg_weight, reduction, impl, precision, need_u):
    out_dt, work_dt = compute_dtype(a.dtype), _work_dtype(a.dtype, impl)
    shape = () if reduction == "mean" else (a.shape[0],)
    u_shape = tuple(a.shape) if need_u else (0,)
    return a.new_empty(shape, dtype=out_dt), a.new_empty((a.shape[0],), dtype=work_dt), a.new_empty(u_shape,
                                                                                                     dtype=work_dt)


def _backward_impl(gout, a, b, ya, yb, stat, u, tau, critic, noise_ratio, neg_weight, reduction, impl, precision,
                   need_a, need_b):
    """Gradients w.r.t. a and b (empty [0] tensors for the ones not needed). No host sync."""
    p = _Prepared(a, b, ya, yb, impl, noise_ratio, neg_weight)
    row_scale = p.row_scale(gout, reduction, tau)
    grad_a = a.new_empty(0)
    if need_a:
        if u.shape != p.a_hat.shape:
            raise RuntimeError("contrastive_loss: the forward ran without the anchors' gradient (need_u=False).")
        grad_a = _normalize_backward(row_scale[:, None] * u, p.a_hat, p.ra).to(a.dtype)
    grad_b = b.new_empty(0)
    if need_b:
        with torch_matmul_precision(a.device, precision):
            gb_hat = _path(impl).grad_b(p.a_hat, p.b_hat, p.ya, p.yb, p.inv_npos, p.w_neg, p.log_k, stat, row_scale,
                                        tau, critic, precision)
        coef = CRITICS[critic].positive_coef(p.inv_npos)
        if coef is not None:
            gb_hat.add_(p.classes.anchor_sums((row_scale * coef)[:, None] * p.a_hat, b.shape[0]))
        grad_b = _normalize_backward(gb_hat, p.b_hat, p.rb).to(b.dtype)
    return grad_a, grad_b


@torch.library.custom_op("mim4dd_fast::contrastive_loss_backward", mutates_args=())
def _contrastive_backward_op(gout: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ya: torch.Tensor,
                             yb: torch.Tensor, stat: torch.Tensor, u: torch.Tensor, tau: float, critic: str,
                             noise_ratio: float, neg_weight: float, reduction: str, impl: str, precision: str,
                             need_a: bool, need_b: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward_impl(gout, a, b, ya, yb, stat, u, tau, critic, noise_ratio, neg_weight, reduction, impl,
                          precision, need_a, need_b)


@_contrastive_backward_op.register_fake
def _(gout, a, b, ya, yb, stat, u, tau, critic, noise_ratio, neg_weight, reduction, impl, precision, need_a,
      need_b):
    ga = a.new_empty(a.shape) if need_a else a.new_empty(0)
    gb = b.new_empty(b.shape) if need_b else b.new_empty(0)
    return ga, gb


def _setup_context(ctx, inputs, output):
    a, b, ya, yb, tau, critic, noise_ratio, neg_weight, reduction, impl, precision, _ = inputs
    ctx.save_for_backward(a, b, ya, yb, output[1], output[2])
    ctx.hyper = (tau, critic, noise_ratio, neg_weight, reduction, impl, precision)


def _backward(ctx, grad_loss, grad_stat, grad_u):
    a, b, ya, yb, stat, u = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_a or need_b):
        return (None,) * 12
    grad_a, grad_b = _contrastive_backward_op(grad_loss, a, b, ya, yb, stat, u, *ctx.hyper, need_a, need_b)
    return (grad_a if need_a else None, grad_b if need_b else None) + (None,) * 10


torch.library.register_autograd("mim4dd_fast::contrastive_loss", _backward, setup_context=_setup_context)


def _flop_counter_formulas():
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.mim4dd_fast.contrastive_loss)
    def _fwd_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        # logits, plus the anchors' gradient when computed here (need_u, the last argument)
        flops = contrastive_flops(a_shape[0], b_shape[0], a_shape[1], need_a=bool(args[-1]), need_b=False)
        return flops["useful"]

    @register_flop_formula(torch.ops.mim4dd_fast.contrastive_loss_backward)
    def _bwd_flops(gout_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        # the keys' gradient; the anchors' was counted in the forward, the recomputed logits are not useful
        return 2 * a_shape[0] * b_shape[0] * a_shape[1] * int(bool(args[-1]))


_flop_counter_formulas()


# --------------------------------------------------------------------------------------------------
# public entry
# --------------------------------------------------------------------------------------------------
def resolve_impl(impl: str, a: torch.Tensor, b: torch.Tensor) -> str:
    """The implementation "auto" stands for on these inputs (see ``EAGER_MAX_LOGITS``, ``MAX_D``)."""
    D = a.shape[1]
    if impl == "triton" and D > contrastive_triton.MAX_D:
        raise KernelArgumentError(f"impl 'triton' covers D <= {contrastive_triton.MAX_D}, got D = {D}; "
                                  "use impl 'auto' or 'chunked'.")
    if impl != "auto":
        return impl
    if not a.is_cuda:
        return "chunked"
    if a.shape[0] * b.shape[0] < EAGER_MAX_LOGITS:
        return "reference"
    return "triton" if (HAVE_TRITON and D <= contrastive_triton.MAX_D) else "chunked"


def resolve_precision(precision: str, a: torch.Tensor) -> str:
    """"auto" is tf32x3 on CUDA (fp32-level accuracy on tensor cores) and ieee elsewhere."""
    if precision != "auto":
        return precision
    return "tf32x3" if a.is_cuda else "ieee"


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
    precision: str = "auto",
) -> torch.Tensor:
    """Normalized-similarity contrastive loss between anchors a [N, D] and keys b [M, D].

    critic: a name in ``CRITICS`` ("infonce", "nce"); reduction "mean" (over anchors with a positive)
    or "none" ([N], 0 where an anchor has no positive). impl: "auto" (CUDA: plain PyTorch below
    ``EAGER_MAX_LOGITS`` logits, else Triton for D <= 256, else chunked; CPU: chunked), "chunked",
    "triton" (CUDA, or TRITON_INTERPRET=1 on CPU), "reference" (the plain N x M version). precision:
    "auto" (tf32x3 on CUDA, ieee elsewhere), "ieee", "tf32x3", "tf32" or "bf16" (docs/method.md says
    what each path does with it). Raises KernelArgumentError (a ValueError and ConfigError) on bad
    arguments. Differentiable once (no double backward through the fused paths).
    """
    check_contrastive_args(a, b, ya, yb, tau, critic, noise_ratio, neg_weight, reduction, impl, precision,
                           IMPLS, PRECISIONS)
    impl = resolve_impl(impl, a, b)
    precision = resolve_precision(precision, a)
    if impl == "reference":
        classes = _Classes(ya.to(torch.int64), yb.to(torch.int64))
        lowest, any_positive = torch.stack([torch.minimum(ya.min(), yb.min()).long(),
                                            classes.present.any().long()]).tolist()
        check_contrastive_labels(lowest, bool(any_positive))
        return contrastive_loss_reference(a, b, ya, yb, tau=tau, critic=critic, noise_ratio=noise_ratio,
                                          neg_weight=neg_weight, reduction=reduction,
                                          matmul_dtype=torch.bfloat16 if precision == "bf16" else None)
    need_u = torch.is_grad_enabled() and a.requires_grad
    loss, _, _ = _contrastive_op(a, b, ya, yb, float(tau), critic, float(noise_ratio), float(neg_weight),
                                 reduction, impl, precision, need_u)
    return loss

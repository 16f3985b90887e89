"""feature_reduce: adaptive average pooling to p x p (+cast) that saves nothing for backward.

Oracles: ``F.adaptive_avg_pool2d(x, p).flatten(1)`` and its autograd gradient (computed in float64),
plus the window-by-window definition in ``kernels/reference.py``. The triton path runs in the
interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1) on small shapes.
"""

from __future__ import annotations

import gc
import importlib
import weakref

import pytest
import torch
import torch.nn.functional as F
from mim4dd_fast.kernels.feature_reduce import feature_reduce, window
from mim4dd_fast.kernels.reference import feature_reduce_reference

from mim4dd_fast.errors import ConfigError

try:  # a dev dependency; bench/gpu_check.sh may run this file where it is not installed
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - installed in CI
    given = None

# The package re-exports the function under the module's name, so fetch the module itself.
fr_module = importlib.import_module("mim4dd_fast.kernels.feature_reduce")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["chunked", "triton"]

# (B, C, H, W, p): divisible, odd / non-divisible (overlapping windows), H < p, H == p, p == 1.
SHAPES = [
    (2, 3, 8, 8, 2),
    (1, 4, 5, 7, 2),
    (3, 2, 9, 6, 4),
    (2, 3, 1, 3, 4),
    (4, 8, 3, 3, 2),
    (2, 2, 2, 2, 2),
    (1, 1, 9, 9, 1),
    (2, 5, 7, 9, 3),
]

TOL = {  # (rtol, atol) for values stored in this dtype
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def _expected(x: torch.Tensor, p: int, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and input gradient of adaptive_avg_pool2d(x, p).flatten(1), computed in float64."""
    x64 = x.detach().double().requires_grad_(True)
    y = F.adaptive_avg_pool2d(x64, p).flatten(1)
    (gx,) = torch.autograd.grad(y, x64, grad_out.double())
    return y.detach(), gx


def _check(x, p, impl, out_dtype=None):
    x = x.detach().requires_grad_(True)
    y = feature_reduce(x, p, out_dtype=out_dtype, impl=impl)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    B, C = x.shape[:2]
    assert y.shape == (B, C * p * p) and y.dtype == out_dtype
    grad_out = torch.randn(y.shape, device=x.device).to(out_dtype)
    (gx,) = torch.autograd.grad(y, x, grad_out)
    assert gx.dtype == x.dtype and gx.shape == x.shape
    y_ref, gx_ref = _expected(x, p, grad_out)
    rtol, atol = TOL[out_dtype]
    torch.testing.assert_close(y.double(), y_ref, rtol=rtol, atol=atol)
    rtol, atol = TOL[x.dtype]
    torch.testing.assert_close(gx.double(), gx_ref, rtol=rtol, atol=atol)


def test_window_rule_matches_hand_values():
    # H=5, p=2: rows [0, 3) and [2, 5) (overlap at row 2); H=1, p=4: every cell is row 0.
    assert [window(i, 5, 2) for i in range(2)] == [(0, 3), (2, 5)]
    assert [window(i, 1, 4) for i in range(4)] == [(0, 1)] * 4
    assert [window(i, 8, 2) for i in range(2)] == [(0, 4), (4, 8)]


def test_hand_computed_forward_and_gradient():
    # One 1x3 map [1, 2, 4], p=2: windows cols [0, 2) and [1, 3) -> means 1.5 and 3.
    x = torch.tensor([[[[1.0, 2.0, 4.0]]]], requires_grad=True)
    for impl in IMPLS:
        y = feature_reduce(x.to(DEVICE) if impl == "triton" else x, 2, impl=impl)
        # rows: H=1 -> both row windows are row 0, so the 2x2 output is [[1.5, 3], [1.5, 3]].
        assert y.cpu().tolist() == [[1.5, 3.0, 1.5, 3.0]]
        (gx,) = torch.autograd.grad(y.sum(), x)
        # each output cell spreads 1/2 over its two columns; the middle column is in 2 col windows,
        # and every column is in both row windows: grads 2*(1/2), 2*(1/2 + 1/2), 2*(1/2).
        assert gx.flatten().tolist() == [1.0, 2.0, 1.0]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_reference_is_adaptive_avg_pool(shape):
    *dims, p = shape
    x = torch.randn(dims, dtype=torch.float64, requires_grad=True)
    g = torch.randn(dims[0], dims[1] * p * p, dtype=torch.float64)
    y_ref, gx_ref = _expected(x, p, g)
    y = feature_reduce_reference(x, p)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], gx_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_torch_float32(impl, shape):
    *dims, p = shape
    _check(torch.randn(dims, device=DEVICE), p, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 2), (1, 4, 2, 9, 3)], ids=["5x7p2", "2x9p3"])
def test_matches_torch_dtypes(impl, dtype, shape):
    *dims, p = shape
    _check(torch.randn(dims, device=DEVICE).to(dtype), p, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_out_dtype_bfloat16(impl, dtype):
    # Stored in bf16; the input gradient comes back in the input's dtype.
    _check(torch.randn(3, 4, 7, 5, device=DEVICE).to(dtype), 2, impl, out_dtype=torch.bfloat16)


@pytest.mark.parametrize("impl", IMPLS)
def test_channels_last_input(impl):
    x = torch.randn(2, 6, 7, 5, device=DEVICE).to(memory_format=torch.channels_last)
    _check(x, 3, impl)


def test_gradcheck_float64_chunked():
    # Non-divisible 5x4 -> 3x3 (overlapping windows). The triton gradient is checked against
    # float64 autograd of adaptive_avg_pool2d above; gradcheck in the interpreter would be slow.
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    fn = lambda t: feature_reduce(t, 3, impl="chunked")
    assert torch.autograd.gradcheck(fn, (x,))
    # The backward is linear in grad_out and differentiable too (double backward, e.g. DC matching).
    assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)


if given is not None:

    @settings(max_examples=25, deadline=None)
    @given(
        b=st.integers(1, 3), c=st.integers(1, 4), h=st.integers(1, 12), w=st.integers(1, 12),
        p=st.integers(1, 5),
    )
    def test_chunked_random_shapes(b, c, h, w, p):
        x = torch.randn(b, c, h, w, dtype=torch.float64)
        _check(x, p, "chunked")


def _input_in_graph():
    """A non-leaf activation, as a hooked block output is."""
    leaf = torch.randn(3, 4, 8, 8, device=DEVICE, requires_grad=True)
    return leaf, leaf * 1.5


@pytest.mark.parametrize("impl", IMPLS)
def test_saves_nothing_for_backward(impl):
    leaf, x = _input_in_graph()
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = feature_reduce(x, 2, out_dtype=torch.bfloat16, impl=impl)
    assert all(shape != tuple(x.shape) and n < x.numel() for shape, n in saved)
    assert saved == []  # not even the small output
    # Nothing holds the input outside saved tensors either (e.g. a ctx attribute): it is freed.
    ref = weakref.ref(x)
    del x
    gc.collect()
    assert ref() is None
    y.float().sum().backward()  # backward still works from shapes alone
    torch.testing.assert_close(leaf.grad, torch.full_like(leaf, 1.5 / 16), rtol=0, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_keeps_nothing(impl):
    _, x = _input_in_graph()
    x = x.detach().requires_grad_(True)
    with torch.no_grad():
        y = feature_reduce(x, 2, impl=impl)
    assert y.grad_fn is None and not y.requires_grad
    ref = weakref.ref(x)
    del x
    gc.collect()
    assert ref() is None


def test_auto_picks_chunked_on_cpu():
    x = torch.randn(1, 2, 4, 4)
    assert fr_module._resolve_impl(x, "auto") == "chunked"
    assert fr_module._resolve_impl(x, "chunked") == "chunked"


def test_opcheck_custom_ops():
    # Schema, fake (meta) impls and AOT dispatch of both ops agree with the real kernels.
    x = torch.randn(2, 3, 5, 7)
    torch.library.opcheck(fr_module._feature_reduce_op, (x, 2, torch.bfloat16, "chunked"))
    g = torch.randn(2, 3 * 2 * 2)
    torch.library.opcheck(fr_module._feature_reduce_backward_op, (g, [2, 3, 5, 7], 2, torch.float32, "chunked"))


@pytest.mark.parametrize("impl", IMPLS)
def test_torch_func_grad_and_vmap(impl):
    x = torch.randn(3, 2, 5, 7, dtype=torch.float64, device=DEVICE)
    loss = lambda t: feature_reduce(t, 2, impl=impl).square().sum()
    loss_ref = lambda t: F.adaptive_avg_pool2d(t, 2).square().sum()
    torch.testing.assert_close(torch.func.grad(loss)(x), torch.func.grad(loss_ref)(x))
    # vmap over a leading dim, and per-sample gradients (vmap of grad).
    xb = torch.randn(4, 3, 2, 5, 7, dtype=torch.float64, device=DEVICE)
    out = torch.func.vmap(lambda t: feature_reduce(t, 2, impl=impl), in_dims=1)(xb)
    ref = F.adaptive_avg_pool2d(xb.transpose(0, 1).flatten(0, 1), 2).flatten(1).unflatten(0, (3, 4))
    torch.testing.assert_close(out, ref)
    per_sample = torch.func.vmap(torch.func.grad(lambda t: loss(t[None])))(x)
    per_sample_ref = torch.func.vmap(torch.func.grad(lambda t: loss_ref(t[None])))(x)
    torch.testing.assert_close(per_sample, per_sample_ref)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=torch.randn(2, 3, 4)), "4-D feature map"),
        (dict(x=torch.randn(2, 3, 4, 4), p=0), "p must be an integer"),
        (dict(x=torch.randn(2, 3, 4, 4), impl="cuda"), "Unknown feature_reduce impl"),
        (dict(x=torch.ones(2, 3, 4, 4, dtype=torch.int64)), "floating-point feature map"),
        (dict(x=torch.randn(2, 3, 4, 4), out_dtype=torch.int32), "out_dtype"),
        (dict(x=torch.randn(2, 3, 0, 4)), "non-empty spatial map"),
    ],
)
def test_user_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        feature_reduce(**kwargs)


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setattr("mim4dd_fast.kernels.checks.INTERPRET", False)
    with pytest.raises(ConfigError, match="needs CUDA tensors"):
        feature_reduce(torch.randn(1, 2, 4, 4), impl="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", [(64, 128, 16, 16, 2), (32, 128, 17, 15, 4), (16, 64, 64, 64, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_large(shape, dtype):
    *dims, p = shape
    x = torch.randn(dims, device="cuda").to(dtype)
    _check(x, p, "triton", out_dtype=torch.bfloat16)
    _check(x, p, "auto")

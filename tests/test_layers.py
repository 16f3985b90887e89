"""The ConvNet's fast layers equal torch's own, to float64 rounding, in value, gradient and second derivative.

The oracle is torch's GroupNorm / avg_pool2d / Conv2d (an independent implementation) differentiated by
autograd, plus torch.autograd.gradcheck/gradgradcheck (finite differences).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mim4dd_fast.layers import AvgPool2, InstanceNorm, with_torch_layers
from mim4dd_fast.methods.mtt import unroll_full
from mim4dd_fast.models import ConvNet, flatten_params


def _second_order(fn, x, w, b, terms):
    """Gradients of a scalar built from (dx, dw, db) of <fn(x, w, b), gy>, w.r.t. x, w and gy."""
    y = fn(x, w, b)
    gy = torch.sin(torch.arange(y.numel(), dtype=y.dtype)).view_as(y).requires_grad_(True)
    dx, dw, db = torch.autograd.grad((y * gy).sum(), [x, w, b], create_graph=True)
    scalars = {"x": (dx.pow(2) * torch.cos(x.detach())).sum(), "w": (dw * torch.arange(dw.numel())).sum(),
               "b": db.pow(3).sum()}
    loss = sum(scalars[t] for t in terms)
    return torch.autograd.grad(loss, [x, w, gy], allow_unused=True)


def _norm_case(seed: int, shape: tuple[int, ...]):
    """Float64 (x, w, b) requiring grad, and our InstanceNorm as a function of them."""
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x, w, b = (torch.randn(s, dtype=torch.float64, generator=gen).requires_grad_(True) for s in (shape, (c,), (c,)))
    norm = InstanceNorm(c).double()

    def ours(x, w, b):
        return torch.func.functional_call(norm, {"weight": w, "bias": b}, (x,))

    return x, w, b, ours


@pytest.mark.parametrize("terms", ["xwb", "x", "w", "b", "wb", "xb"])
def test_instance_norm_second_derivative_equals_groupnorm(terms):
    x, w, b, ours = _norm_case(0, (3, 4, 5, 7))
    ref = _second_order(lambda x, w, b: F.group_norm(x, 4, w, b, 1e-5), x, w, b, terms)
    got = _second_order(ours, x, w, b, terms)
    for r, g in zip(ref, got, strict=True):
        if r is None:  # torch's graph does not reach it: ours may give None or exact zeros
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_instance_norm_gradgradcheck():
    x, w, b, ours = _norm_case(1, (2, 3, 4, 3))
    assert torch.autograd.gradcheck(ours, (x, w, b))
    assert torch.autograd.gradgradcheck(ours, (x, w, b))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 5), h=st.integers(1, 6), w=st.integers(2, 6),
       channels_last=st.booleans(), grad=st.booleans())
def test_instance_norm_forward_and_gradient_equal_groupnorm(n, c, h, w, channels_last, grad):
    ref = nn.GroupNorm(c, c).double()
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    ours = InstanceNorm(c).double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xr, xo = x.clone().requires_grad_(grad), x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        yr, yo = ref(xr), ours(xo)
    torch.testing.assert_close(yo, yr, rtol=1e-12, atol=1e-12)
    if grad:
        gy = torch.randn_like(yr)
        gr = torch.autograd.grad(yr, [xr, ref.weight, ref.bias], gy)
        go = torch.autograd.grad(yo, [xo, ours.weight, ours.bias], gy)
        for a, b in zip(go, gr, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_instance_norm_keeps_groupnorm_state_dict():
    ours = InstanceNorm(6)
    assert isinstance(ours, nn.GroupNorm) and set(ours.state_dict()) == {"weight", "bias"}


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 4), h=st.integers(2, 9), w=st.integers(2, 9))
def test_avg_pool_equals_torch_in_value_and_gradient(n, c, h, w):
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    xr, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yr, yo = F.avg_pool2d(xr, 2, 2), AvgPool2()(xo)
    torch.testing.assert_close(yo, yr, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(yr)
    torch.testing.assert_close(torch.autograd.grad(yo, xo, gy)[0], torch.autograd.grad(yr, xr, gy)[0])


def test_avg_pool_gradgradcheck():
    x = torch.randn(2, 3, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(AvgPool2(), (x,))
    assert torch.autograd.gradgradcheck(AvgPool2(), (x,))


def test_mtt_unroll_gradient_equals_the_plain_torch_convnet_in_float64():
    """The whole student unroll (second derivatives of every layer) with the fast layers vs torch's."""
    torch.manual_seed(0)
    net = ConvNet(3, 4, 16, width=8, depth=2).double().requires_grad_(False)
    plain = with_torch_layers(net)
    assert any(isinstance(m, InstanceNorm) for m in net.modules())
    assert not any(isinstance(m, (InstanceNorm, AvgPool2)) for m in plain.modules())
    start = flatten_params(net).double()
    target = start + 0.02 * torch.randn_like(start)
    images = torch.randn(8, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(8) % 4
    syn_lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    batches = [(torch.randperm(8, generator=torch.Generator().manual_seed(k))[:6], None) for k in range(3)]
    ours = unroll_full(net, start, target, images, labels, syn_lr, batches)
    ref = unroll_full(plain, start, target, images, labels, syn_lr, batches)
    for g, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


def test_instance_norm_under_bf16_autocast_is_torch_s_or_closer_to_float32():
    """Under CPU bfloat16 autocast the norm takes bfloat16 activations as torch's does; its second derivative,
    computed in float32, is at least as close to the float32 one as torch's bfloat16 composite."""
    gen = torch.Generator().manual_seed(2)
    x32 = torch.randn(4, 8, 8, 8, generator=gen).bfloat16().float()  # values exactly representable in bf16
    ours, ref = InstanceNorm(8), nn.GroupNorm(8, 8)
    with torch.no_grad():
        ours.weight.normal_(generator=gen)
        ours.bias.normal_(generator=gen)
    ref.load_state_dict(ours.state_dict())

    def second(norm, x, autocast):
        x = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = norm(x)
        gw, gb = torch.autograd.grad((y.float() * torch.cos(x.detach().float())).sum(), [norm.weight, norm.bias],
                                     create_graph=True)
        (gx,) = torch.autograd.grad(gw.pow(2).sum() + gb.pow(2).sum(), x)
        return y.detach().float(), gx.float()

    y_exact, g_exact = second(ref, x32, autocast=False)
    y_ours, g_ours = second(ours, x32.bfloat16(), autocast=True)
    y_torch, g_torch = second(ref, x32.bfloat16(), autocast=True)
    torch.testing.assert_close(y_ours, y_torch)  # the same forward kernel
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "InstanceNorm" in type(ours(x32.bfloat16().requires_grad_(True)).grad_fn).__name__  # ours ran
    err_ours = float((g_ours - g_exact).norm() / g_exact.norm())
    err_torch = float((g_torch - g_exact).norm() / g_exact.norm())
    assert err_ours <= max(1.5 * err_torch, 1e-2)

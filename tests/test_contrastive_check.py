"""The suite's gradient check can fail: a zeroed or sign-flipped gradient is caught at the sizes the
GPU tests use, where the elementwise atol=1e-5 check it replaced passes an all-zero gradient."""

import pytest
import torch
from mim4dd_fast.kernels import contrastive_loss
from mim4dd_fast.kernels.testing import assert_rel_close, check_against_float64, reference_float64, rel_err


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``factor`` (0: zeroed, -1: sign-flipped)."""

    @staticmethod
    def forward(x, factor):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.factor = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _corrupted(which: str, factor: float):
    def fn(a, b, ya, yb, **kw):
        if which == "a":
            a = _ScaleGrad.apply(a, factor)
        else:
            b = _ScaleGrad.apply(b, factor)
        return contrastive_loss(a, b, ya, yb, impl="chunked", **kw)

    return fn


def _data(N, M, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, D, generator=g), torch.randn(M, D, generator=g),
            torch.randint(0, 10, (N,), generator=g), torch.randint(0, 10, (M,), generator=g))


def test_relative_error_of_zero_and_sign_flip_is_one_and_two():
    want = torch.tensor([1e-7, -3e-7, 2e-8])
    assert rel_err(torch.zeros(3), want) == pytest.approx(1.0)
    assert rel_err(-want, want) == pytest.approx(2.0)
    assert rel_err(want, want) == 0.0
    with pytest.raises(AssertionError, match="relative norm error"):
        assert_rel_close(torch.full((3,), float("nan")), want, 1e-4)


@pytest.mark.parametrize("N, M, D", [(67, 45, 37), (4096, 3001, 128)])
def test_check_catches_zeroed_and_sign_flipped_gradients(N, M, D):
    a, b, ya, yb = _data(N, M, D)
    want = reference_float64(a, b, ya, yb)
    check_against_float64(_corrupted("a", 1.0), a, b, ya, yb, 1e-4, want=want)  # the honest gradient passes
    for which in ("a", "b"):
        for factor in (0.0, -1.0):
            with pytest.raises(AssertionError, match=f"grad_{which}: relative norm error"):
                check_against_float64(_corrupted(which, factor), a, b, ya, yb, 1e-4, want=want)
    if N == 4096:  # the elementwise check it replaced: every entry is below atol, so zeros pass it
        for grad in want[1:]:
            assert grad.abs().max().item() < 1e-5
            torch.testing.assert_close(torch.zeros_like(grad), grad, rtol=1e-3, atol=1e-5)

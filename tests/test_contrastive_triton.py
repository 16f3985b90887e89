"""Triton contrastive kernels against the reference.

Without an NVIDIA device tests/conftest.py sets TRITON_INTERPRET=1, and the small cases run in the
interpreter on CPU tensors; on a CUDA machine the same cases run compiled on the GPU, plus large ones.
"""

import os

import pytest
import torch
from mim4dd_fast.kernels import contrastive_loss
from mim4dd_fast.kernels.reference import contrastive_loss_reference as ref

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if (torch.cuda.is_available() and not INTERPRET) else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA (compiled Triton)")


def _data(N, M, D, classes, seed=0, dtype=torch.float32, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, D, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    b = torch.randn(M, D, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    ya = torch.randint(0, classes, (N,), generator=g).to(device)
    yb = torch.randint(0, classes, (M,), generator=g).to(device)
    return a, b, ya, yb


def _loss_and_grads(fn, a, b, ya, yb, **kw):
    loss = fn(a, b, ya, yb, **kw)
    weight = torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    ga, gb = torch.autograd.grad((loss * weight).sum(), (a, b))
    return loss.detach(), ga, gb


def _check(a, b, ya, yb, rtol, atol, **kw):
    want = _loss_and_grads(ref, a, b, ya, yb, **kw)
    got = _loss_and_grads(contrastive_loss, a, b, ya, yb, impl="triton", **kw)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g.float(), w.float(), rtol=rtol, atol=atol)
    return got


# (N, M, D, dtype, critic, reduction): odd sizes that straddle the 32-wide tiles, one-row/one-column
# cases, and every dtype once per critic
CASES = [
    (67, 45, 37, torch.float32, "infonce", "none"),
    (45, 96, 64, torch.float32, "nce", "mean"),
    (1, 33, 20, torch.float32, "infonce", "mean"),
    (40, 1, 17, torch.float32, "nce", "none"),
    (50, 70, 24, torch.float16, "infonce", "mean"),
    (50, 70, 24, torch.bfloat16, "nce", "none"),
]


@pytest.mark.parametrize("N, M, D, dtype, critic, reduction", CASES)
def test_triton_matches_reference(N, M, D, dtype, critic, reduction):
    a, b, ya, yb = _data(N, M, D, classes=3 if min(N, M) > 1 else 1, dtype=dtype)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    _check(a, b, ya, yb, tau=0.1, critic=critic, reduction=reduction, noise_ratio=2.0, neg_weight=0.5, **tol)


@pytest.mark.parametrize("critic", ["infonce", "nce"])
def test_triton_classes_absent_on_one_side(critic):
    a, b, ya, yb = _data(39, 41, 11, classes=4)
    ya[:5] = 7  # no key of this class
    yb[:6] = 8  # no anchor of this class
    loss, ga, _ = _check(a, b, ya, yb, rtol=1e-4, atol=1e-5, critic=critic, reduction="none")
    assert torch.all(loss[:5] == 0) and torch.all(ga[:5] == 0)


@gpu
@pytest.mark.parametrize("critic", ["infonce", "nce"])
@pytest.mark.parametrize("N, M, D", [(4096, 3001, 128), (1000, 5000, 512), (2049, 2047, 77)])
def test_triton_large_on_gpu(critic, N, M, D):
    a, b, ya, yb = _data(N, M, D, classes=10, device="cuda")
    _check(a, b, ya, yb, rtol=1e-3, atol=1e-5, critic=critic, reduction="mean")


@gpu
def test_auto_picks_triton_on_gpu_and_matches_chunked():
    a, b, ya, yb = _data(3000, 3000, 128, classes=10, device="cuda")
    got = _loss_and_grads(contrastive_loss, a, b, ya, yb)  # impl="auto"
    want = _loss_and_grads(contrastive_loss, a, b, ya, yb, impl="chunked")
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5)

"""Cache-sized chunks (models.chunks) change the rounding, never the function: each chunked path against
the same computation on the whole batch, in float64, with a budget small enough that every batch splits."""

import pytest
import torch
import torch.nn.functional as F

import mim4dd_fast.models as models
from mim4dd_fast.methods import mtt as mtt_mod
from mim4dd_fast.methods.dc import mean_ce_grad
from mim4dd_fast.models import build_model, chunks, embed_no_grad, functional_forward


@pytest.fixture
def tiny_budget(monkeypatch):
    """Budget of 3 images of ConvNet width 8 at 8x8 (largest activation 8*8*8 float64 = 4 KiB each)."""
    monkeypatch.setattr(models, "CHUNK_BYTES", 3 * 8 * 8 * 8 * 8)


def _net(seed=0):
    torch.manual_seed(seed)
    return build_model(3, 4, 8, width=8).double()


def test_chunks_cover_the_batch_in_order_with_sizes_between_budget_and_twice_it(tiny_budget):
    net = _net()
    for n in (1, 2, 3, 5, 6, 7, 20, 23):
        bounds = chunks(net, torch.empty(n, 3, 8, 8, dtype=torch.float64))
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(b == a2 for (_, b), (a2, _) in zip(bounds, bounds[1:], strict=False))
        sizes = [b - a for a, b in bounds]
        assert all(3 <= s <= 5 for s in sizes) if n >= 3 else sizes == [n]
    assert chunks(net, torch.empty(0, 3, 8, 8), rows=20) == chunks(net, torch.empty(20, 3, 8, 8))
    # Accelerators and models that do not declare their activation size run the whole batch.
    assert chunks(net, torch.empty(20, 3, 8, 8, device="meta")) == [(0, 20)]
    assert chunks(torch.nn.Linear(3, 3), torch.empty(20, 3)) == [(0, 20)]


def test_default_budget_keeps_a_cifar_student_step_whole_and_splits_a_real_batch():
    net = build_model(3, 10, 32, width=128)  # 512 KiB per image at the first block: 8 images per 4 MiB
    assert chunks(net, torch.empty(10, 3, 32, 32)) == [(0, 10)]
    assert [b - a for a, b in chunks(net, torch.empty(256, 3, 32, 32))] == [8] * 32


def test_embed_no_grad_equals_embed(tiny_budget):
    net = _net()
    x = torch.randn(11, 3, 8, 8, dtype=torch.float64)
    out = embed_no_grad(net, x)
    assert not out.requires_grad and out.is_contiguous()
    torch.testing.assert_close(out, net.embed(x), rtol=1e-12, atol=1e-12)


def test_dc_real_gradient_in_chunks_equals_the_mean_loss_gradient(tiny_budget):
    net = _net()
    params = list(net.parameters())
    x, y = torch.randn(13, 3, 8, 8, dtype=torch.float64), torch.randint(0, 4, (13,))
    whole = torch.autograd.grad(F.cross_entropy(net(x), y), params)
    for got, want in zip(mean_ce_grad(net, params, x, y), whole, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("seed", [None, 123])  # DSA off / on (per-image parameters drawn for the whole step)
def test_mtt_step_gradient_in_chunks_equals_the_whole_minibatch(tiny_budget, seed):
    net = _net()
    theta = models.flatten_params(net).requires_grad_(True)
    images = torch.randn(12, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(12) % 4
    idx = torch.randperm(12, generator=torch.Generator().manual_seed(1))[:10]
    assert len(chunks(net, images, rows=10)) == 3
    g = mtt_mod._step_grad(net, theta, images, labels, (idx, seed), create_graph=True)
    x = mtt_mod.augment_step(images[idx], seed)  # the whole minibatch at once
    want = torch.autograd.grad(F.cross_entropy(functional_forward(net, theta, x), labels[idx]), theta,
                               create_graph=True)[0]
    torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-13)
    v = torch.randn_like(theta)  # and the second-order terms the unroll differentiates
    for got, exp in zip(torch.autograd.grad(g @ v, [theta, images]), torch.autograd.grad(want @ v, [theta, images]),
                        strict=True):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-13)


def test_chunked_checkpointed_unroll_equals_the_full_unroll(tiny_budget):
    net = _net()
    start = models.flatten_params(net)
    target = start + 0.01 * torch.randn(start.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    images = torch.randn(12, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(12) % 4
    syn_lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randperm(12, generator=g)[:10], s) for s in (5, None, 9)]
    full = mtt_mod.unroll_full(net, start, target, images, labels, syn_lr, batches)
    ckpt = mtt_mod.unroll_checkpointed(net, start, target, images, labels, syn_lr, batches)
    for a, b in zip(ckpt, full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert float(full[1].abs().sum()) > 0 and float(full[2].abs()) > 0

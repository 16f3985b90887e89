"""The chunked fused contrastive loss (custom op) against the plain reference: values, gradients,
memory kept for backward, work skipped for inputs without gradient, no host sync in the backward,
torch.compile and the FLOP formula."""

import mim4dd_fast.kernels.contrastive as C
import mim4dd_fast.kernels.contrastive_chunked as CC
import pytest
import torch
from mim4dd_fast.kernels import contrastive_flops, contrastive_loss
from mim4dd_fast.kernels.reference import contrastive_loss_reference as ref
from mim4dd_fast.kernels.testing import assert_rel_close
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from mim4dd_fast import profiling


def _data(N, M, D, classes=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, D, generator=g).to(dtype).requires_grad_(True)
    b = torch.randn(M, D, generator=g).to(dtype).requires_grad_(True)
    ya = torch.randint(0, classes, (N,), generator=g)
    yb = torch.randint(0, classes, (M,), generator=g)
    return a, b, ya, yb


def _loss_and_grads(fn, a, b, ya, yb, **kw):
    loss = fn(a, b, ya, yb, **kw)
    # a non-uniform upstream gradient for "none" so per-row weighting is exercised
    weight = torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    ga, gb = torch.autograd.grad((loss * weight).sum(), (a, b))
    return loss.detach(), ga, gb


@pytest.fixture
def small_chunks(monkeypatch):
    """Force many chunks (and a ragged last one) at test sizes."""
    monkeypatch.setattr(CC, "CHUNK_BYTES", 40_000)


@pytest.mark.parametrize("critic", ["infonce", "nce"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("N, M, D", [(301, 517, 67), (1, 130, 9), (90, 1, 16)])
def test_chunked_matches_reference(small_chunks, critic, reduction, N, M, D):
    a, b, ya, yb = _data(N, M, D, classes=4 if min(N, M) > 1 else 1)
    kw = dict(tau=0.07, critic=critic, noise_ratio=3.0, neg_weight=0.6, reduction=reduction)
    want = _loss_and_grads(ref, a, b, ya, yb, **kw)
    got = _loss_and_grads(contrastive_loss, a, b, ya, yb, impl="chunked", **kw)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("critic", ["infonce", "nce"])
def test_classes_absent_on_one_side(small_chunks, critic):
    a, b, ya, yb = _data(200, 150, 24, classes=6)
    ya[:40] = 9  # anchors whose class has no key: loss 0, no gradient
    yb[:30] = 11  # keys whose class has no anchor: negatives for everyone
    want = _loss_and_grads(ref, a, b, ya, yb, critic=critic, reduction="none")
    got = _loss_and_grads(contrastive_loss, a, b, ya, yb, critic=critic, reduction="none", impl="chunked")
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=2e-4, atol=2e-5)
    assert torch.all(got[0][:40] == 0) and torch.all(got[1][:40] == 0)


def test_float64_is_exact_and_auto_is_chunked_on_cpu(small_chunks):
    a, b, ya, yb = _data(123, 77, 13, dtype=torch.float64)
    for critic in ("infonce", "nce"):
        want = _loss_and_grads(ref, a, b, ya, yb, critic=critic)
        got = _loss_and_grads(contrastive_loss, a, b, ya, yb, critic=critic)  # impl="auto"
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32_and_return_input_dtype_grads(dtype):
    a, b, ya, yb = _data(64, 48, 32, dtype=dtype)
    want = _loss_and_grads(ref, a, b, ya, yb)
    got = _loss_and_grads(contrastive_loss, a, b, ya, yb, impl="chunked")
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for g, w in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("critic", ["infonce", "nce"])
def test_gradcheck_chunked_float64(small_chunks, monkeypatch, critic):
    monkeypatch.setattr(CC, "CHUNK_BYTES", 3 * 7 * 8)  # 3 rows per chunk at M = 7
    a, b, ya, yb = _data(8, 7, 5, classes=3, dtype=torch.float64)
    fn = lambda a, b: contrastive_loss(a, b, ya, yb, tau=0.4, critic=critic, noise_ratio=2.0,
                                       reduction="none", impl="chunked")
    assert torch.autograd.gradcheck(fn, (a, b))


@pytest.mark.parametrize("critic", ["infonce", "nce"])
def test_inputs_without_gradient_skip_their_work(small_chunks, monkeypatch, critic):
    """b constant: the keys' backward pass never runs; a constant: the forward computes no U."""
    a, b, ya, yb = _data(40, 30, 8)
    calls = []
    real_grad_b, real_forward = CC.grad_b, CC.forward
    monkeypatch.setattr(CC, "grad_b", lambda *t: calls.append("grad_b") or real_grad_b(*t))
    monkeypatch.setattr(CC, "forward", lambda *t: calls.append(("forward", t[-1])) or real_forward(*t))

    loss = contrastive_loss(a, b.detach(), ya, yb, critic=critic, impl="chunked")
    (ga,) = torch.autograd.grad(loss, (a,))
    assert calls == [("forward", True)]
    assert_rel_close(ga, torch.autograd.grad(ref(a, b, ya, yb, critic=critic), (a,))[0], 1e-5)

    calls.clear()
    loss = contrastive_loss(a.detach(), b, ya, yb, critic=critic, impl="chunked")
    (gb,) = torch.autograd.grad(loss, (b,))
    assert calls == [("forward", False), "grad_b"]
    assert_rel_close(gb, torch.autograd.grad(ref(a, b, ya, yb, critic=critic), (b,))[0], 1e-5)

    calls.clear()
    with torch.no_grad():
        contrastive_loss(a, b, ya, yb, critic=critic, impl="chunked")
    assert calls == [("forward", False)]


@pytest.mark.parametrize("critic", ["infonce", "nce"])
def test_backward_reads_no_tensor_data_on_the_host(critic):
    """The backward runs on fake tensors (shapes only): any .item(), bool(), int() or data-dependent
    shape (unique, nonzero) would raise there, so the backward has no host sync. The forward's label
    check does read data: the same harness must catch it."""
    a, b, ya, yb = (t.detach() for t in _data(12, 9, 5))
    hyper = (0.1, critic, 1.0, 1.0, "mean", "chunked", "ieee")
    loss, stat, u = C._forward_impl(a, b, ya, yb, *hyper, True)
    real = (torch.ones(()), a, b, ya, yb, stat, u)
    with FakeTensorMode() as mode:
        ga, gb = C._backward_impl(*[mode.from_tensor(t) for t in real], *hyper, True, True)
    assert ga.shape == a.shape and gb.shape == b.shape
    with FakeTensorMode() as mode, pytest.raises(Exception, match="[Dd]ata.dependent|item|scalar"):
        C._forward_impl(*[mode.from_tensor(t) for t in real[1:5]], *hyper, True)


def test_saved_bytes_at_4096_are_a_small_fraction_of_the_reference():
    """What autograd keeps beyond the inputs a, b (alive in the caller anyway): labels, one float per
    anchor and U [N, D]; at most 2% of what the reference keeps beyond them."""
    a, b, ya, yb = _data(4096, 4096, 128, classes=10)
    inputs = a.nbytes + b.nbytes
    with profiling.SavedTensorBytes() as saved_ref:
        loss_ref = ref(a, b, ya, yb)
    with profiling.SavedTensorBytes() as saved:
        loss = contrastive_loss(a, b, ya, yb, impl="chunked")
    assert saved_ref.peak - inputs > 100e6
    assert saved.peak - inputs <= 0.02 * (saved_ref.peak - inputs)
    assert saved.peak <= inputs + a.nbytes + ya.nbytes + yb.nbytes + 4096 * 4  # + U, labels, one float per anchor
    del loss_ref, loss


def test_torch_compile_fullgraph_around_the_op():
    a, b, ya, yb = _data(50, 40, 16)

    def step(a, b, ya, yb):
        return 2.0 * contrastive_loss(a, b, ya, yb, tau=0.2, critic="nce", reduction="mean")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = _loss_and_grads(compiled, a, b, ya, yb)
    want = _loss_and_grads(lambda *t: 2.0 * ref(*t, tau=0.2, critic="nce"), a, b, ya, yb)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("need_a, need_b", [(True, True), (False, True), (True, False)])
def test_flop_counter_reports_useful_flops_where_they_are_done(reduction, need_a, need_b):
    """The forward op does the logits and (when a needs a gradient) the anchors' gradient; the backward
    op the keys' gradient. FlopCounterMode reports the useful 2NMD per product, the recomputed logits
    appear only in contrastive_flops' executed count."""
    N, M, D = 33, 21, 10
    a, b, ya, yb = _data(N, M, D)
    a, b = a.detach().requires_grad_(need_a), b.detach().requires_grad_(need_b)
    with FlopCounterMode(display=False) as fwd:
        loss = contrastive_loss(a, b, ya, yb, reduction=reduction, impl="chunked")
    with FlopCounterMode(display=False) as bwd:
        loss.sum().backward()
    nmd2 = 2 * N * M * D
    flops = contrastive_flops(N, M, D, need_a=need_a, need_b=need_b)
    assert fwd.get_total_flops() == flops["forward_pass"] == nmd2 * (1 + need_a)
    assert bwd.get_total_flops() == nmd2 * need_b
    assert flops["useful"] == fwd.get_total_flops() + bwd.get_total_flops() == nmd2 * (1 + need_a + need_b)
    assert flops["executed"] == flops["useful"] + flops["recompute"] == nmd2 * (1 + need_a + 2 * need_b)
    # what eager autograd reports for the plain reference: the same useful total
    with FlopCounterMode(display=False) as eager:
        ref(a, b, ya, yb, reduction=reduction).sum().backward()
    assert eager.get_total_flops() == flops["useful"]


@pytest.mark.parametrize(
    "kw, words",
    [(dict(impl="cuda"), "impl"), (dict(tau=-0.1), "tau"), (dict(reduction="sum"), "reduction"),
     (dict(noise_ratio=-1.0), "noise_ratio"), (dict(critic="x"), "critic"), (dict(precision="fp16"), "precision")],
)
def test_public_entry_rejects_bad_arguments(kw, words):
    a, b, ya, yb = _data(5, 6, 3)
    with pytest.raises(ValueError, match=words):
        contrastive_loss(a, b, ya, yb, **kw)


def test_data_errors_raise_inside_the_op():
    a, b, ya, yb = _data(5, 6, 3)
    with pytest.raises(ValueError, match="no anchor has a positive"):
        contrastive_loss(a, b, ya + 100, yb, impl="chunked")
    with pytest.raises(ValueError, match=">= 0"):
        contrastive_loss(a, b, ya, yb - 10, impl="chunked")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("mim4dd_fast.kernels.checks.INTERPRET", False)
    a, b, ya, yb = _data(5, 6, 3)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        contrastive_loss(a, b, ya, yb, impl="triton")

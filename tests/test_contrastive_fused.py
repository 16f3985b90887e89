"""The chunked fused contrastive loss (custom op) against the plain reference: values, gradients,
memory kept for backward, torch.compile and the FLOP formula."""

import mim4dd_fast.kernels.contrastive as C
import pytest
import torch
from mim4dd_fast.kernels import contrastive_flops, contrastive_loss
from mim4dd_fast.kernels.reference import contrastive_loss_reference as ref
from torch.utils.flop_counter import FlopCounterMode


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
    monkeypatch.setattr(C, "CHUNK_BYTES", 40_000)


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
    monkeypatch.setattr(C, "CHUNK_BYTES", 3 * 7 * 8)  # 3 rows per chunk at M = 7
    a, b, ya, yb = _data(8, 7, 5, classes=3, dtype=torch.float64)
    fn = lambda a, b: contrastive_loss(a, b, ya, yb, tau=0.4, critic=critic, noise_ratio=2.0,
                                       reduction="none", impl="chunked")
    assert torch.autograd.gradcheck(fn, (a, b))


def test_only_needed_gradients_are_computed():
    a, b, ya, yb = _data(40, 30, 8)
    b = b.detach()
    loss = contrastive_loss(a, b, ya, yb, impl="chunked")
    (ga,) = torch.autograd.grad(loss, (a,))
    torch.testing.assert_close(ga, torch.autograd.grad(ref(a, b, ya, yb), (a,))[0], rtol=1e-4, atol=1e-6)


def _saved_bytes(fn, a, b, ya, yb):
    """Bytes autograd keeps for backward (each storage once), total and excluding the inputs a, b."""
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(a, b, ya, yb)
    inputs = {a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()}
    total = sum(seen.values())
    return total, total - sum(n for p, n in seen.items() if p in inputs)


def test_saved_bytes_at_4096_are_a_small_fraction_of_the_reference():
    a, b, ya, yb = _data(4096, 4096, 128, classes=10)
    ref_total, ref_extra = _saved_bytes(ref, a, b, ya, yb)
    ours_total, ours_extra = _saved_bytes(lambda *t: contrastive_loss(*t, impl="chunked"), a, b, ya, yb)
    # the inputs themselves are 2.9% of the reference's total and alive in the caller anyway, so the
    # 2% goal is on what autograd keeps beyond them; the total must not exceed inputs + a few rows
    assert ref_extra > 100e6
    assert ours_extra <= 0.02 * ref_extra
    assert ours_total <= a.nbytes + b.nbytes + 4 * 4096 * 8


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
def test_flop_counter_reports_the_registered_useful_flops(reduction):
    N, M, D = 33, 21, 10
    a, b, ya, yb = _data(N, M, D)
    with FlopCounterMode(display=False) as fwd:
        loss = contrastive_loss(a, b, ya, yb, reduction=reduction, impl="chunked")
    with FlopCounterMode(display=False) as bwd:
        loss.sum().backward()
    flops = contrastive_flops(N, M, D)
    assert fwd.get_total_flops() == flops["forward"] == 2 * N * M * D
    assert bwd.get_total_flops() == flops["backward"] == 4 * N * M * D
    assert flops["recompute"] == 2 * N * M * D


@pytest.mark.parametrize(
    "kw, words",
    [(dict(impl="cuda"), "impl"), (dict(tau=-0.1), "tau"), (dict(reduction="sum"), "reduction"),
     (dict(noise_ratio=-1.0), "noise_ratio"), (dict(critic="x"), "critic")],
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
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a, b, ya, yb = _data(5, 6, 3)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        contrastive_loss(a, b, ya, yb, impl="triton")

"""Triton contrastive kernels against the float64 reference, by relative norm at every size.

Without an NVIDIA device tests/conftest.py sets TRITON_INTERPRET=1 and the small cases run in the
interpreter on CPU tensors (one fixed tile configuration; bf16 emulated by rounding); on a CUDA
machine the same cases run compiled on the GPU, plus large ones at every precision.
"""

from functools import partial

import mim4dd_fast.kernels.contrastive as C
import mim4dd_fast.kernels.contrastive_triton as CT
import pytest
import torch
from mim4dd_fast.kernels import backend, contrastive_loss
from mim4dd_fast.kernels.testing import PRECISION_RTOL, check_against_float64, loss_and_grads, rel_err

DEVICE = "cuda" if (torch.cuda.is_available() and not backend.INTERPRET) else "cpu"
def gpu(test):
    """GPU-only (compiled Triton): marked `gpu` and skipped cleanly without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA (compiled Triton)")(test))
HALF_RTOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}  # gradients come back in the input dtype


def _data(N, M, D, classes, seed=0, dtype=torch.float32, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, D, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(M, D, generator=g).to(device=device, dtype=dtype)
    ya = torch.randint(0, classes, (N,), generator=g).to(device)
    yb = torch.randint(0, classes, (M,), generator=g).to(device)
    return a, b, ya, yb


def _triton(precision="auto"):
    return partial(contrastive_loss, impl="triton", precision=precision)


# (N, M, D, dtype, critic, reduction): sizes that straddle the tiles (masking), D not a power of two
# (37, 77, 200: padded feature blocks up to 256), one-row/one-column cases, half inputs once per critic
CASES = [
    (67, 45, 37, torch.float32, "infonce", "none"),
    (45, 96, 64, torch.float32, "nce", "mean"),
    (1, 33, 20, torch.float32, "infonce", "mean"),
    (40, 1, 17, torch.float32, "nce", "none"),
    (33, 40, 200, torch.float32, "infonce", "none"),
    (50, 70, 24, torch.float16, "infonce", "mean"),
    (50, 70, 24, torch.bfloat16, "nce", "none"),
]


@pytest.mark.parametrize("N, M, D, dtype, critic, reduction", CASES)
def test_triton_matches_float64_reference(N, M, D, dtype, critic, reduction):
    a, b, ya, yb = _data(N, M, D, classes=3 if min(N, M) > 1 else 1, dtype=dtype)
    loss, ga, gb = loss_and_grads(_triton("ieee"), a, b, ya, yb, critic=critic, reduction=reduction)
    assert loss.dtype == torch.float32 and ga.dtype == dtype and gb.dtype == dtype
    check_against_float64(_triton("ieee"), a, b, ya, yb, HALF_RTOL[dtype], tau=0.1, critic=critic,
                          reduction=reduction, noise_ratio=2.0, neg_weight=0.5)


@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32", "bf16"])
@pytest.mark.parametrize("critic", ["infonce", "nce"])
def test_each_precision_mode(precision, critic):
    """In the interpreter tf32/tf32x3 multiply in fp32 (their rounding needs the GPU) and bf16 rounds
    the operands to bfloat16 before an fp32 product, as the GPU does."""
    a, b, ya, yb = _data(70, 50, 40, classes=4)
    errors = check_against_float64(_triton(precision), a, b, ya, yb, PRECISION_RTOL[precision], critic=critic,
                                   reduction="none")
    if precision == "bf16":  # really rounded: measurably worse than fp32, still within its bound
        assert errors["grad_a"] > 1e-4


@pytest.mark.parametrize("critic", ["infonce", "nce"])
def test_anchors_without_positives_and_keys_of_absent_classes(critic):
    a, b, ya, yb = _data(39, 41, 11, classes=4)
    ya[:5] = 7  # no key of this class
    yb[:6] = 8  # no anchor of this class
    check_against_float64(_triton(), a, b, ya, yb, 1e-4, critic=critic, reduction="none")
    loss, ga, _ = loss_and_grads(_triton(), a, b, ya, yb, critic=critic, reduction="none")
    assert torch.all(loss[:5] == 0) and torch.all(ga[:5] == 0)


@pytest.mark.parametrize("critic", ["infonce", "nce"])
def test_non_contiguous_inputs(critic):
    a, b, ya, yb = _data(36, 52, 24, classes=3)
    a_t = a.T.contiguous().T  # column-major view
    b_s = torch.cat([b, b], dim=1)[:, ::2]  # every other column: row stride 2D, column stride 2
    assert not a_t.is_contiguous() and not b_s.is_contiguous()
    check_against_float64(_triton(), a_t, b_s, ya, yb, 1e-4, critic=critic, reduction="mean")


def test_inputs_without_gradient_skip_their_kernels(monkeypatch):
    a, b, ya, yb = _data(40, 30, 16, classes=3)
    calls = []
    real_forward, real_grad_b = CT.forward, CT.grad_b
    monkeypatch.setattr(CT, "forward", lambda *t: calls.append(("forward", t[-1])) or real_forward(*t))
    monkeypatch.setattr(CT, "grad_b", lambda *t: calls.append("grad_b") or real_grad_b(*t))
    want = loss_and_grads(_triton(), a, b, ya, yb)
    calls.clear()
    loss = contrastive_loss(a.requires_grad_(True), b, ya, yb, impl="triton")
    (ga,) = torch.autograd.grad(loss, (a,))
    assert calls == [("forward", True)]  # no grad_b launch: b needs no gradient
    assert rel_err(ga, want[1]) < 1e-6
    calls.clear()
    loss = contrastive_loss(a.detach(), b.requires_grad_(True), ya, yb, impl="triton")
    (gb,) = torch.autograd.grad(loss, (b,))
    assert calls == [("forward", False), "grad_b"]  # the forward skips U: a needs no gradient
    assert rel_err(gb, want[2]) < 1e-6


def test_auto_dispatch_by_device_size_and_width(monkeypatch):
    a, b, _, _ = _data(8, 8, 4, classes=2, device="cpu")
    assert C.resolve_impl("auto", a, b) == "chunked"
    assert C.resolve_precision("auto", a) == "ieee"
    for name in ("reference", "chunked", "triton"):
        assert C.resolve_impl(name, a, b) == name
    wide = torch.zeros(2, CT.MAX_D + 1)
    with pytest.raises(ValueError, match="D <= 256"):
        contrastive_loss(wide, wide, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                         impl="triton")


# ------------------------------------------------------------------------------------------------
# GPU only (compiled Triton): large shapes at every precision, no sync in backward, dispatch
# ------------------------------------------------------------------------------------------------
LARGE = [(4096, 3001, 128), (1000, 5000, 256), (2049, 2047, 77)]


@gpu
@pytest.mark.parametrize("critic, precision", [("infonce", "ieee"), ("infonce", "tf32x3"), ("infonce", "tf32"),
                                               ("infonce", "bf16"), ("nce", "tf32x3"), ("nce", "bf16")])
@pytest.mark.parametrize("N, M, D", LARGE)
def test_triton_large_on_gpu(critic, precision, N, M, D):
    """Every precision once; NCE at the two precisions with tensor cores that differ most (few compiles)."""
    a, b, ya, yb = _data(N, M, D, classes=10)
    check_against_float64(_triton(precision), a, b, ya, yb, PRECISION_RTOL[precision], critic=critic,
                          reduction="mean")


@gpu
@pytest.mark.parametrize("autotune", [True, False])
def test_autotuned_and_fixed_tiles_agree_on_gpu(monkeypatch, autotune):
    monkeypatch.setattr(backend, "AUTOTUNE", autotune)
    a, b, ya, yb = _data(3000, 2500, 128, classes=10)
    check_against_float64(_triton("tf32x3"), a, b, ya, yb, 1e-4, critic="infonce", reduction="none")


@gpu
@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_backward_has_no_host_sync_on_gpu(impl):
    a, b, ya, yb = _data(2048, 2048, 64, classes=10)
    a.requires_grad_(True)
    b.requires_grad_(True)
    contrastive_loss(a, b, ya, yb, impl=impl).backward()  # warm-up: compiling and autotuning may sync
    a.grad = b.grad = None
    loss = contrastive_loss(a, b, ya, yb, impl=impl)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert a.grad is not None and b.grad is not None


@gpu
def test_chunked_on_gpu_at_each_precision():
    a, b, ya, yb = _data(3000, 2000, 512, classes=10)
    for precision in ("ieee", "tf32", "bf16"):
        check_against_float64(partial(contrastive_loss, impl="chunked", precision=precision), a, b, ya, yb,
                              PRECISION_RTOL[precision])


@gpu
def test_auto_on_gpu_picks_eager_triton_or_chunked():
    small, big, wide = _data(100, 100, 32, 5), _data(2048, 2048, 128, 5), _data(2048, 2048, 512, 5)
    assert C.resolve_impl("auto", small[0], small[1]) == "reference"
    assert C.resolve_impl("auto", big[0], big[1]) == "triton"
    assert C.resolve_impl("auto", wide[0], wide[1]) == "chunked"
    assert C.resolve_precision("auto", big[0]) == "tf32x3"
    for a, b, ya, yb in (small, big, wide):
        check_against_float64(contrastive_loss, a, b, ya, yb, 1e-4)


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_the_tensors_gpu_not_the_current_one():
    a, b, ya, yb = _data(512, 512, 64, classes=5, device="cuda:1")
    with torch.cuda.device(0):
        check_against_float64(_triton(), a, b, ya, yb, 1e-4)


def test_kernels_compile_for_sm90_on_a_cpu_machine():
    """The compiler sees code the interpreter never checks (a branch's tl.dot operand dtypes, loop-carried
    types): compile the bf16 forward/grad_b (NCE) and both pooling kernels for sm_90 with triton's ptxas."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton install has no bundled ptxas")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-m", "mim4dd_fast.kernels.aot", "--critics", "nce", "--precisions", "bf16"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["kernel"] for r in rows] == ["forward", "grad_b", "feature_reduce forward", "feature_reduce backward"]
    assert all(0 < r["registers"] <= 255 for r in rows)
    assert rows[0]["local_bytes"] == 0  # bf16 at the fixed GPU tiles: no spills

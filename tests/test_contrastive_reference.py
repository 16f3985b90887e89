"""The plain-PyTorch contrastive reference against a textbook loop computation (the spec's oracle),
and the public entry's argument errors."""

import math

import numpy as np
import pytest
import torch
from mim4dd_fast.kernels import contrastive_loss
from mim4dd_fast.kernels.reference import contrastive_loss_reference as ref

from mim4dd_fast.errors import ConfigError


def _softplus(v: float) -> float:
    return math.log1p(math.exp(-abs(v))) + max(v, 0.0)


def textbook(a, b, ya, yb, tau, critic, k=1.0, w=1.0, reduction="mean"):
    """The loss's definition (docs/method.md), one anchor and one key at a time, in float64 numpy."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    losses, valid = [], []
    for i in range(a.shape[0]):
        ai = a[i] / max(np.linalg.norm(a[i]), 1e-12)
        x = [float(ai @ (b[j] / max(np.linalg.norm(b[j]), 1e-12))) / tau for j in range(b.shape[0])]
        pos = [x[j] for j in range(len(x)) if yb[j] == ya[i]]
        neg = [x[j] for j in range(len(x)) if yb[j] != ya[i]]
        if not pos:
            losses.append(0.0)
            valid.append(False)
            continue
        if critic == "infonce":
            mx = max(x)
            lse = mx + math.log(sum(math.exp(v - mx) for v in x))
            li = lse - sum(pos) / len(pos)
        else:
            lk = math.log(k)
            li = sum(_softplus(lk - v) for v in pos) / len(pos)
            li += w * (sum(_softplus(v - lk) for v in neg) / len(neg) if neg else 0.0)
        losses.append(li)
        valid.append(True)
    losses = np.array(losses)
    return losses[np.array(valid)].mean() if reduction == "mean" else losses


def _data(N=7, M=9, D=5, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, D, generator=g, dtype=dtype)
    b = torch.randn(M, D, generator=g, dtype=dtype)
    ya = torch.randint(0, classes, (N,), generator=g)
    yb = torch.randint(0, classes, (M,), generator=g)
    return a, b, ya, yb


@pytest.mark.parametrize("critic", ["infonce", "nce"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_textbook_loops(critic, reduction):
    a, b, ya, yb = _data()
    ya[0] = 7  # one anchor whose class is absent from the keys: excluded from the mean, 0 in "none"
    got = ref(a, b, ya, yb, tau=0.3, critic=critic, noise_ratio=2.5, neg_weight=0.4, reduction=reduction)
    want = textbook(a.numpy(), b.numpy(), ya.tolist(), yb.tolist(), 0.3, critic, 2.5, 0.4, reduction)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    if reduction == "none":
        assert got[0].item() == 0.0


def test_nce_with_no_negatives_has_zero_negative_mean():
    a, b, _, _ = _data(N=3, M=4)
    ya, yb = torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long)
    got = ref(a, b, ya, yb, critic="nce", neg_weight=5.0, reduction="none")
    want = textbook(a.numpy(), b.numpy(), ya.tolist(), yb.tolist(), 0.1, "nce", 1.0, 5.0, "none")
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)


@pytest.mark.parametrize("critic", ["infonce", "nce"])
def test_gradcheck_float64(critic):
    a, b, ya, yb = _data(N=5, M=6, D=4)
    a.requires_grad_(True)
    b.requires_grad_(True)
    fn = lambda a, b: ref(a, b, ya, yb, tau=0.5, critic=critic, noise_ratio=2.0, reduction="none")
    assert torch.autograd.gradcheck(fn, (a, b))


@pytest.mark.parametrize("critic", ["infonce", "nce"])
def test_invariant_to_positive_scaling_and_key_permutation(critic):
    a, b, ya, yb = _data(N=10, M=12, D=6)
    base = ref(a, b, ya, yb, critic=critic, reduction="none")
    scale_a = torch.rand(a.shape[0], 1, dtype=a.dtype) * 10 + 0.1
    torch.testing.assert_close(ref(a * scale_a, b * 3.0, ya, yb, critic=critic, reduction="none"), base)
    perm = torch.randperm(b.shape[0], generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ref(a, b[perm], ya, yb[perm], critic=critic, reduction="none"), base)


def test_separated_clusters_approach_log_m_over_p_from_above():
    """Each class is one direction and all its vectors coincide: x = 1/tau on positives, 0 elsewhere, so
    l = log(|P| + (M - |P|) e^{-1/tau}) decreases to log|P| as tau -> 0, and the MI estimate
    log(M) - l rises to log(M / |P|) (the number of classes). (The brief's "loss -> log(M/|P|)" is the
    MI estimate's limit, not the loss's.)"""
    classes, per_class, D = 4, 5, 8
    centers = torch.eye(D, dtype=torch.float64)[:classes]
    y = torch.arange(classes).repeat_interleave(per_class)
    a = b = centers[y]
    M, P = len(y), per_class
    prev = math.inf
    for tau in [1.0, 0.3, 0.1, 0.03]:
        loss = ref(a, b, y, y, tau=tau).item()
        assert loss > math.log(P) - 1e-12  # from above
        assert loss < prev
        np.testing.assert_allclose(loss, math.log(P + (M - P) * math.exp(-1 / tau)), rtol=1e-12)
        prev = loss
    assert abs(loss - math.log(P)) < 1e-12 + (M - P) / P * math.exp(-1 / 0.03)
    # and the MI estimate log(M) - loss approaches log(M / P), the log of the number of classes
    assert abs((math.log(M) - loss) - math.log(M / P)) < 1e-12


def _call(**over):
    a, b, ya, yb = _data()
    kw = dict(a=a, b=b, ya=ya, yb=yb, impl="reference")
    kw.update(over)
    return contrastive_loss(kw.pop("a"), kw.pop("b"), kw.pop("ya"), kw.pop("yb"), **kw)


@pytest.mark.parametrize(
    "over, words",
    [
        (dict(tau=0.0), "tau"),
        (dict(tau=-1.0), "tau"),
        (dict(tau=float("nan")), "tau"),
        (dict(tau=float("inf")), "tau"),
        (dict(a=torch.randn(7, 4, dtype=torch.float64)), "same feature size"),
        (dict(a=torch.randn(7, 5)), "dtype"),
        (dict(a=torch.randn(7, 5, 1, dtype=torch.float64)), "2-D"),
        (dict(ya=torch.zeros(6, dtype=torch.long)), "length 7"),
        (dict(ya=torch.zeros(7)), "integer"),
        (dict(ya=-torch.ones(7, dtype=torch.long)), ">= 0"),
        (dict(critic="bce"), "critic"),
        (dict(reduction="sum"), "reduction"),
        (dict(noise_ratio=0.0), "noise_ratio"),
        (dict(neg_weight=-1.0), "neg_weight"),
        (dict(ya=torch.full((7,), 99, dtype=torch.long)), "no anchor has a positive"),
        (dict(impl="cuda"), "impl"),
        (dict(precision="fp8"), "precision"),
        (dict(a=torch.zeros(0, 5, dtype=torch.float64), ya=torch.zeros(0, dtype=torch.long)), "at least one row"),
    ],
)
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_errors_are_one_sentence_value_errors(over, words, impl):
    over = {"impl": impl, **over}
    with pytest.raises(ValueError, match=words) as info:
        _call(**over)
    assert isinstance(info.value, ConfigError)
    msg = str(info.value)
    assert msg.endswith(".") and "\n" not in msg

"""The critic registry: every listed critic has its three forms, and a new critic needs only its
module + one registry entry to run on every path (reference, chunked, Triton) and in the MIM settings."""

import types

import numpy as np
import pytest
import torch
from mim4dd_fast.kernels import CRITICS, contrastive_loss
from mim4dd_fast.kernels.backend import HAVE_TRITON, tl, triton
from mim4dd_fast.kernels.testing import check_against_float64

from mim4dd_fast.errors import ConfigError
from mim4dd_fast.methods.mim import MIMConfig

FORMS = ("NAME", "reference", "positive_coef", "chunk_forward", "chunk_grad",
         "tile_init", "tile_update", "tile_final", "tile_grad")


def test_listed_critics_have_all_three_forms_and_mim_reads_the_list():
    assert set(CRITICS) == {"infonce", "nce"}
    for name, critic in CRITICS.items():
        assert critic.NAME == name
        assert all(hasattr(critic, form) for form in FORMS), name
    for name in CRITICS:
        MIMConfig(critic=name).validate()
    with pytest.raises(ConfigError, match="infonce, nce"):
        MIMConfig(critic="hinge").validate()


# A toy critic, written only here: l_i = -mean_{P_i} x_ij + neg_weight * mean_{N_i} x_ij^2 / 2.
def _sq_reference(x, pos, neg, npos, nneg, log_k, neg_weight):
    return -(x * pos).sum(dim=1) / npos.clamp_min(1) + neg_weight * (x * x * neg).sum(dim=1) / nneg.clamp_min(1) / 2


def _sq_chunk_forward(x, eq, inv_npos, w_neg, log_k, need_h):
    eq = eq()
    loss = w_neg * torch.where(eq, 0.0, x * x / 2).sum(dim=1)
    if need_h:
        x.copy_(torch.where(eq, 0.0, x * w_neg[:, None]))
    return loss, torch.zeros_like(loss), None


def _sq_chunk_grad(x, eq, stat, inv_npos, w_neg, log_k):
    x.copy_(torch.where(eq(), 0.0, x * w_neg[:, None]))


SQ = types.SimpleNamespace(NAME="sq", reference=_sq_reference, positive_coef=lambda inv_npos: -inv_npos,
                           chunk_forward=_sq_chunk_forward, chunk_grad=_sq_chunk_grad)

if HAVE_TRITON:

    @triton.jit
    def _sq_tile_init(BLOCK_N: tl.constexpr):
        return tl.zeros([BLOCK_N], tl.float32), tl.zeros([BLOCK_N], tl.float32)

    @triton.jit
    def _sq_tile_grad(x, eq, stat, inv_npos, w_neg, log_k):
        return tl.where(eq, 0.0, x * w_neg)

    @triton.jit
    def _sq_tile_update(x, eq, valid, s1, s2, inv_npos, w_neg, log_k):
        s1 += tl.sum(tl.where(valid & (eq == 0), x * x * 0.5, 0.0), axis=1)
        return s1, s2, tl.full(s1.shape, 1.0, tl.float32), tl.where(eq, 0.0, x * w_neg)

    @triton.jit
    def _sq_tile_final(s1, s2, inv_npos, w_neg):
        loss = s1 * w_neg
        return loss, tl.zeros_like(loss), tl.full(loss.shape, 1.0, tl.float32)

    SQ.tile_init, SQ.tile_update = _sq_tile_init, _sq_tile_update
    SQ.tile_final, SQ.tile_grad = _sq_tile_final, _sq_tile_grad


def _textbook_sq(a, b, ya, yb, tau, w):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    out = []
    for i in range(len(a)):
        x = [float(a[i] @ b[j] / np.linalg.norm(a[i]) / np.linalg.norm(b[j])) / tau for j in range(len(b))]
        pos = [v for v, y in zip(x, yb, strict=True) if y == ya[i]]
        neg = [v * v / 2 for v, y in zip(x, yb, strict=True) if y != ya[i]]
        out.append(-sum(pos) / len(pos) + w * (sum(neg) / len(neg) if neg else 0.0))
    return np.array(out)


@pytest.fixture
def sq_registered(monkeypatch):
    monkeypatch.setitem(CRITICS, "sq", SQ)


@pytest.mark.parametrize("impl", ["reference", "chunked", "triton"])
def test_a_new_critic_runs_on_every_path(sq_registered, impl):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(37, 20, generator=g), torch.randn(41, 20, generator=g)
    ya, yb = torch.randint(0, 3, (37,), generator=g), torch.randint(0, 3, (41,), generator=g)
    kw = dict(tau=0.5, critic="sq", neg_weight=0.7, reduction="none")
    loss = contrastive_loss(a, b, ya, yb, impl=impl, **kw)
    np.testing.assert_allclose(loss.numpy(), _textbook_sq(a.numpy(), b.numpy(), ya.tolist(), yb.tolist(), 0.5, 0.7),
                               rtol=2e-5, atol=2e-5)
    check_against_float64(lambda *t, **k: contrastive_loss(*t, impl=impl, **k), a, b, ya, yb, 1e-5, **kw)
    MIMConfig(critic="sq").validate()  # the MIM settings accept it without any other edit


def test_a_new_critic_gradcheck_chunked_float64(sq_registered):
    g = torch.Generator().manual_seed(4)
    a = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ya, yb = torch.tensor([0, 1, 1, 2, 0, 1]), torch.tensor([1, 0, 2, 1, 1])
    fn = lambda a, b: contrastive_loss(a, b, ya, yb, tau=0.3, critic="sq", reduction="none", impl="chunked")
    assert torch.autograd.gradcheck(fn, (a, b))

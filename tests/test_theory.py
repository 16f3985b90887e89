"""Numerical checks behind docs/theory.md.

1. When a map keeps mutual information (sufficiency, not invertibility) - exact discrete computations.
2. Which ConvNet operations are not injective - explicit collisions.
3. What the logged ``log M - L`` is under the project's key sampling, against data whose mutual
   information is known (correlated Gaussians; two Gaussian classes by quadrature). The estimator is
   the project's own reference contrastive loss.
4. The binary NCE critic's optimum and minimum against closed forms.

``python tests/test_theory.py`` prints the table quoted in docs/theory.md section 3.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from mim4dd_fast.kernels.reference import contrastive_loss_reference
from scipy.spatial.distance import jensenshannon

pytestmark = pytest.mark.usefixtures("one_thread")  # many small float64 matmuls: two threads only contend


# ----------------------------------------------------------------------------------------------
# 1. Sufficiency, not invertibility
# ----------------------------------------------------------------------------------------------
def _mi(joint: np.ndarray) -> float:
    """Exact mutual information (nats) of a 2-D probability table."""
    p = joint / joint.sum()
    outer = p.sum(1, keepdims=True) * p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / outer[nz])).sum())


def _merge_rows(joint: np.ndarray, groups: list[list[int]]) -> np.ndarray:
    """The joint table of (u(S), R) for the map u that sends every row index in a group to one value."""
    return np.stack([joint[g].sum(0) for g in groups])


def _label_coupled_joint() -> np.ndarray:
    """p(s, r) = sum_y p(s, y) p(r | y): S and R related only through the label Y (3 classes).

    Synthetic values s0, s1 have the same class posterior p(y | s), and so do s2, s3; s4, s5 differ.
    """
    posterior = np.array([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1], [0.1, 0.6, 0.3],
                          [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.5, 0.1, 0.4]])
    p_s = np.array([0.1, 0.25, 0.15, 0.2, 0.1, 0.2])
    p_sy = p_s[:, None] * posterior  # [6, 3]
    p_r_given_y = np.random.default_rng(0).dirichlet(np.ones(5), size=3)  # [3, 5]
    return p_sy @ p_r_given_y  # [6, 5]


def test_injective_maps_keep_mi_and_order_or_continuity_play_no_role():
    joint = _label_coupled_joint()
    shuffled = joint[[4, 0, 5, 2, 1, 3]]  # any injective relabelling, order-preserving or not
    assert _mi(shuffled) == pytest.approx(_mi(joint), rel=1e-13)


def test_a_non_injective_sufficient_statistic_keeps_mi():
    joint = _label_coupled_joint()
    full = _mi(joint)
    # u merges values with equal class posterior: not injective, yet sufficient -> no loss at all
    assert _mi(_merge_rows(joint, [[0, 1], [2, 3], [4], [5]])) == pytest.approx(full, rel=1e-12)
    # merging values whose posteriors differ loses information (strict DPI)
    lossy = _mi(_merge_rows(joint, [[0, 1], [2, 3], [4, 5]]))
    assert lossy < full - 1e-4
    # and the DPI chain: processing the real side too can only lose more
    both = _merge_rows(_merge_rows(joint, [[0, 1], [2, 3], [4, 5]]).T, [[0, 1], [2], [3], [4]]).T
    assert _mi(both) <= lossy + 1e-15


# ----------------------------------------------------------------------------------------------
# 2. ConvNet operations that are not injective
# ----------------------------------------------------------------------------------------------
def test_relu_instance_norm_avg_and_max_pooling_are_not_injective():
    a, b = torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 2.0])
    assert torch.equal(F.relu(a), F.relu(b)) and not torch.equal(a, b)
    gn = torch.nn.GroupNorm(1, 1, affine=False)
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(gn(x), gn(3 * x + 5), atol=1e-3)  # mean and scale discarded (up to eps)
    y = x.clone()
    y[0, 0, 0, 0] += 1.0
    y[0, 0, 0, 1] -= 1.0  # same 2x2 window sum
    assert torch.allclose(F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)) and not torch.equal(x, y)
    z = torch.tensor([[[[4.0, 1.0], [2.0, 3.0]]]])
    w = z.clone()
    w[0, 0, 0, 1] = -7.0  # change an entry that is not the window's maximum
    assert torch.equal(F.max_pool2d(z, 2), F.max_pool2d(w, 2)) and not torch.equal(z, w)


# ----------------------------------------------------------------------------------------------
# 3. The logged estimate log M - L, computed by the project's reference loss
# ----------------------------------------------------------------------------------------------
def _reference_loss_at_logits(x: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor, **kw) -> torch.Tensor:
    """The reference contrastive loss evaluated at an arbitrary logit matrix x [N, M] (float64).

    On a finite batch the normalised-similarity critic can take any values: anchors
    u_i = (x_i, sqrt(R^2 - |x_i|^2)), keys v_j = (e_j, 0) and tau = 1 / R (R >= max_i |x_i|) give
    <u_i, v_j> / (|u_i| |v_j| tau) = x_ij. Gradients flow to x.
    """
    radius = float(x.detach().norm(dim=1).max()) * 1.001 + 1e-6
    pad = (radius**2 - (x * x).sum(1, keepdim=True)).clamp_min(0).sqrt()
    u = torch.cat([x, pad], dim=1)
    v = torch.cat([torch.eye(x.shape[1], dtype=x.dtype), torch.zeros(x.shape[1], 1, dtype=x.dtype)], dim=1)
    return contrastive_loss_reference(u, v, ya, yb, tau=1.0 / radius, **kw)


def _project_estimate(x: np.ndarray, ya: np.ndarray, yb: np.ndarray) -> np.ndarray:
    """log M - L for each of T batches of logits x [T, N, M] (anchor labels ya [N], key labels yb [M]).

    Batches are evaluated G at a time as one block-diagonal logit matrix: labels are offset per batch
    (so other batches' keys are negatives) and off-block logits sit 60 below every in-block value, so
    they add less than e^-60 * G * M to each sum (far below float64 rounding).
    """
    t_all, n, m = x.shape
    group = max(1, 256 // m)
    n_labels = int(max(ya.max(), yb.max())) + 1
    out = []
    for start in range(0, t_all, group):
        blocks = x[start:start + group]
        g = blocks.shape[0]
        big = np.full((g * n, g * m), blocks.min() - 60.0)
        for t in range(g):
            big[t * n:(t + 1) * n, t * m:(t + 1) * m] = blocks[t]
        offset = np.arange(g) * n_labels
        big_ya = torch.from_numpy((offset[:, None] + ya[None, :]).reshape(-1))
        big_yb = torch.from_numpy((offset[:, None] + yb[None, :]).reshape(-1))
        per_anchor = _reference_loss_at_logits(torch.from_numpy(big), big_ya, big_yb, reduction="none")
        out.append(math.log(m) - per_anchor.numpy().reshape(g, n).mean(1))
    return np.concatenate(out)


def _log_sigmoid(z):
    return -np.logaddexp(0.0, -z)


def _log_posterior_two_classes(v, mu):
    """log p(y | v) for two unit-variance Gaussian classes at +mu (y = 0) and -mu (y = 1), equal priors."""
    return np.stack([_log_sigmoid(2 * mu * v), _log_sigmoid(-2 * mu * v)], axis=-1)


def _log_posterior_orthogonal(v, mu):
    """log p(y | v) for C unit-variance Gaussian classes at mu * e_y in R^C, equal priors."""
    z = mu * v
    return z - np.logaddexp.reduce(z, axis=-1, keepdims=True)


def _optimal_critic(lp_s, lp_r):
    """f*(s, r) = log p(r | s) / p(r) = log(C * sum_y p(y | s) p(y | r)) under the label-coupled joint."""
    return math.log(lp_s.shape[-1]) + np.logaddexp.reduce(lp_s + lp_r, axis=-1)


_GH_Z, _GH_W = np.polynomial.hermite_e.hermegauss(120)
_GH_W = _GH_W / _GH_W.sum()  # E[h(Z)] ~ sum w h(z) for Z ~ N(0, 1)


def _two_class_truth(mu: float, alpha: float = 1.0) -> dict[str, float]:
    """Exact (quadrature) I(S;Y), I(S;R) and the large-n limit of the estimate for the critic alpha * f*.

    S | Y and R | Y are independent N(+-mu, 1); by symmetry condition on the class at +mu.
    """
    v = mu + _GH_Z
    lp = _log_posterior_two_classes(v, mu)
    i_sy = math.log(2) + float((_GH_W * (np.exp(lp) * lp).sum(-1)).sum())
    f_joint = alpha * _optimal_critic(lp[:, None, :], lp[None, :, :])  # s, r both from class +mu
    f_other = alpha * _optimal_critic(lp[:, None, :], _log_posterior_two_classes(-mu + _GH_Z, mu)[None, :, :])
    i_sr_alpha = float((_GH_W[:, None] * _GH_W[None, :] * f_joint).sum())
    log_mean_exp = np.log(0.5 * (np.exp(f_joint) @ _GH_W) + 0.5 * (np.exp(f_other) @ _GH_W))
    limit = i_sr_alpha - float((_GH_W * log_mean_exp).sum())
    return {"I(S;Y)": i_sy, "I(S;R)": i_sr_alpha / alpha if alpha == 1.0 else math.nan, "limit": limit}


def _stratified_two_class(rng, mu, n, batches, alpha=1.0):
    """The project's sampling: per batch one anchor per class, exactly n keys per class (class-major)."""
    ya, yb = np.arange(2), np.repeat(np.arange(2), n)
    centre = np.array([mu, -mu])
    s = centre[ya] + rng.normal(size=(batches, 2))
    r = centre[yb] + rng.normal(size=(batches, 2 * n))
    lp_s, lp_r = _log_posterior_two_classes(s, mu), _log_posterior_two_classes(r, mu)
    return alpha * _optimal_critic(lp_s[:, :, None, :], lp_r[:, None, :, :]), ya, yb


def _textbook_two_class(rng, mu, m, batches):
    """Textbook InfoNCE sampling: anchor i's one positive is key i; the other keys are iid marginal draws."""
    y = rng.integers(0, 2, size=(batches, m))
    centre = np.array([mu, -mu])
    s, r = centre[y] + rng.normal(size=(batches, m)), centre[y] + rng.normal(size=(batches, m))
    lp_s, lp_r = _log_posterior_two_classes(s, mu), _log_posterior_two_classes(r, mu)
    return _optimal_critic(lp_s[:, :, None, :], lp_r[:, None, :, :]), np.arange(m), np.arange(m)


def _mean_se(v: np.ndarray) -> tuple[float, float]:
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size))


def test_label_coupled_mi_by_quadrature_matches_a_direct_2d_integral():
    """The 'true MI' used below, checked by integrating p log(p / (p_s p_r)) on a grid from the densities."""
    mu = 1.0
    grid = np.linspace(-10, 10, 1601)
    step = grid[1] - grid[0]
    phi = lambda v: np.exp(-0.5 * v * v) / math.sqrt(2 * math.pi)  # noqa: E731
    s, r = grid[:, None], grid[None, :]
    joint = 0.5 * phi(s - mu) * phi(r - mu) + 0.5 * phi(s + mu) * phi(r + mu)
    marg = 0.5 * phi(grid - mu) + 0.5 * phi(grid + mu)
    i_sr = float((joint * np.log(joint / (marg[:, None] * marg[None, :]))).sum() * step * step)
    truth = _two_class_truth(mu)
    assert truth["I(S;R)"] == pytest.approx(i_sr, abs=1e-6)
    assert truth["limit"] == pytest.approx(truth["I(S;R)"], abs=1e-9)  # DV at the optimal critic is tight
    assert truth["I(S;R)"] < truth["I(S;Y)"] < math.log(2)


def test_textbook_sampling_stays_below_the_analytic_mi_of_correlated_gaussians():
    """Control: one positive, iid negatives, optimal critic -> below -1/2 log(1 - rho^2), and close."""
    rng = np.random.default_rng(0)
    rho, m, batches = 0.8, 16, 1500
    true_mi = -0.5 * math.log(1 - rho**2)
    a = rng.normal(size=(batches, m))
    b = rho * a + math.sqrt(1 - rho**2) * rng.normal(size=(batches, m))
    # f*(a, b) = log p(b | a) / p(b), dropping the terms in a alone (they cancel in the softmax)
    x = -((b[:, None, :] - rho * a[:, :, None]) ** 2) / (2 * (1 - rho**2)) + b[:, None, :] ** 2 / 2
    est, se = _mean_se(_project_estimate(x, np.arange(m), np.arange(m)))
    assert est < true_mi + 3 * se
    assert est > true_mi - 0.1  # the optimal critic is nearly tight at this MI and batch size


def test_textbook_sampling_stays_below_the_two_class_mi():
    rng = np.random.default_rng(1)
    truth = _two_class_truth(1.0)
    est, se = _mean_se(_project_estimate(*_textbook_two_class(rng, 1.0, 2, 4000)))
    assert est < truth["I(S;R)"] - 5 * se  # well below with M = 2


def test_project_sampling_overestimates_the_two_class_mi_at_the_optimal_critic():
    """Stratified keys: log M - L >= I(S;R) at the optimal critic (Jensen), clearly above at 1 key/class."""
    rng = np.random.default_rng(2)
    truth = _two_class_truth(1.0)
    one, se1 = _mean_se(_project_estimate(*_stratified_two_class(rng, 1.0, 1, 4000)))
    four, se4 = _mean_se(_project_estimate(*_stratified_two_class(rng, 1.0, 4, 4000)))
    assert one - truth["I(S;R)"] > 5 * se1
    assert 0.02 < one - truth["I(S;R)"] < 0.07  # docs/theory.md section 3: +0.045 nats (+26 %)
    assert four > truth["I(S;R)"] - 3 * se4
    assert four < one  # the excess shrinks as n_real grows


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_project_sampling_is_at_least_the_large_n_limit_for_any_critic(alpha):
    """Jensen: with keys independent of the anchor, E[log M - L] >= E_joint f - E_s log E_r e^f."""
    rng = np.random.default_rng(3)
    limit = _two_class_truth(1.0, alpha)["limit"]
    for n in (1, 4):
        est, se = _mean_se(_project_estimate(*_stratified_two_class(rng, 1.0, n, 3000, alpha)))
        assert est > limit - 3 * se
    if alpha == 2.0:  # a sharper-than-optimal critic: the limit is low, the n = 1 estimate far above it
        assert est > limit  # n = 4
        est1, se1 = _mean_se(_project_estimate(*_stratified_two_class(rng, 1.0, 1, 3000, alpha)))
        assert est1 - limit > 10 * se1


@pytest.mark.parametrize("alpha", [1.0, 2.0, 4.0])
def test_project_sampling_never_exceeds_the_label_information(alpha):
    """For any critic, E[log M - L] <= I(S;Y) (docs/theory.md, section 3)."""
    rng = np.random.default_rng(4)
    truth = _two_class_truth(1.0)
    est, se = _mean_se(_project_estimate(*_stratified_two_class(rng, 1.0, 1, 3000, alpha)))
    assert est < truth["I(S;Y)"] - 3 * se


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), tau=st.floats(0.05, 2.0), n_pos=st.integers(1, 4), n_neg=st.integers(0, 6))
def test_temperature_caps_the_estimate(seed, tau, n_pos, n_neg):
    """|x| <= 1/tau, so L >= log(|P| + |N| e^(-2/tau)); the cap is reached with positives at +a, negatives at -a."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(1, 3, generator=g, dtype=torch.float64)
    b = torch.randn(n_pos + n_neg, 3, generator=g, dtype=torch.float64)
    ya, yb = torch.zeros(1, dtype=torch.long), torch.tensor([0] * n_pos + [1] * n_neg)
    floor = math.log(n_pos + n_neg * math.exp(-2 / tau))
    assert float(contrastive_loss_reference(a, b, ya, yb, tau=tau)) >= floor - 1e-12
    best = torch.cat([a.repeat(n_pos, 1), -a.repeat(n_neg, 1)])
    assert float(contrastive_loss_reference(a, best, ya, yb, tau=tau)) == pytest.approx(floor, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# 4. The binary NCE critic
# ----------------------------------------------------------------------------------------------
def _softplus(v: float) -> float:
    return math.log1p(math.exp(-abs(v))) + max(v, 0.0)


def test_binary_nce_hand_computed_value():
    # one anchor (class 0), keys: positive at logit log 3, negatives at log 2 and 0; k = 2, w = 0.5
    x = torch.tensor([[math.log(3), math.log(2), 0.0]], dtype=torch.float64)
    loss = _reference_loss_at_logits(x, torch.tensor([0]), torch.tensor([0, 1, 1]), critic="nce", noise_ratio=2.0,
                                     neg_weight=0.5)
    # softplus(log 2 - log 3) = log(5/3); softplus(log 2 - log 2) = log 2; softplus(0 - log 2) = log(3/2)
    want = math.log(5 / 3) + 0.5 * 0.5 * (math.log(2) + math.log(3 / 2))
    assert float(loss) == pytest.approx(want, rel=1e-12)
    assert want == pytest.approx(_softplus(math.log(2 / 3)) + 0.25 * (_softplus(0.0) + _softplus(-math.log(2))))


def _nce_population_batch(p: np.ndarray, q: np.ndarray, scale: int):
    """One anchor whose positive keys take value v with frequency p_v and negatives with frequency q_v."""
    pos, neg = np.rint(p * scale).astype(int), np.rint(q * scale).astype(int)
    values = np.concatenate([np.repeat(np.arange(p.size), pos), np.repeat(np.arange(q.size), neg)])
    labels = torch.tensor([0] * int(pos.sum()) + [1] * int(neg.sum()))
    return torch.from_numpy(values), labels


@pytest.mark.parametrize("k, w", [(1.0, 1.0), (4.0, 1.0), (4.0, 4.0), (0.5, 2.0)])
def test_binary_nce_optimum_is_the_density_ratio(k, w):
    """Minimising the NCE loss over a critic theta(value) gives theta* = log(p / q) + log(k / w)."""
    p, q = np.array([0.5, 0.25, 0.125, 0.125]), np.array([0.125, 0.25, 0.25, 0.375])
    values, yb = _nce_population_batch(p, q, 8)
    ya = torch.tensor([0])
    theta = torch.zeros(p.size, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=200, tolerance_grad=1e-13, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _reference_loss_at_logits(theta[values][None, :], ya, yb, critic="nce", noise_ratio=k, neg_weight=w)
        loss.backward()
        return loss

    opt.step(closure)
    want = np.log(p / q) + math.log(k / w)
    np.testing.assert_allclose(theta.detach().numpy(), want, atol=1e-6)
    if k == w == 1.0:  # the minimum is 2 log 2 - 2 JS(p, q) (natural log), as for a GAN discriminator
        assert float(closure().detach()) == pytest.approx(2 * math.log(2) - 2 * jensenshannon(p, q) ** 2, abs=1e-10)


# ----------------------------------------------------------------------------------------------
# The table in docs/theory.md
# ----------------------------------------------------------------------------------------------
def _orthogonal_truth(rng, mu: float, classes: int, samples: int = 400_000) -> dict[str, tuple[float, float]]:
    y = rng.integers(0, classes, size=samples)
    means = mu * np.eye(classes)
    lp_s = _log_posterior_orthogonal(means[y] + rng.normal(size=(samples, classes)), mu)
    lp_r = _log_posterior_orthogonal(means[y] + rng.normal(size=(samples, classes)), mu)
    i_sy = math.log(classes) + (np.exp(lp_s) * lp_s).sum(-1)
    return {"I(S;Y)": _mean_se(i_sy), "I(S;R)": _mean_se(_optimal_critic(lp_s, lp_r))}


def _stratified_orthogonal(rng, mu, classes, n, batches):
    ya, yb = np.arange(classes), np.repeat(np.arange(classes), n)
    means = mu * np.eye(classes)
    lp_s = _log_posterior_orthogonal(means[ya] + rng.normal(size=(batches, classes, classes)), mu)
    lp_r = _log_posterior_orthogonal(means[yb] + rng.normal(size=(batches, classes * n, classes)), mu)
    return _optimal_critic(lp_s[:, :, None, :], lp_r[:, None, :, :]), ya, yb


def main() -> None:
    rng = np.random.default_rng(0)
    print("| model | keys per class n | log M - L (± 2 se) | I(S;R) | excess | I(S;Y) |")
    print("|---|---|---|---|---|---|")
    truth = _two_class_truth(1.0)
    for n in (1, 2, 4, 8, 32):
        est, se = _mean_se(_project_estimate(*_stratified_two_class(rng, 1.0, n, 20_000)))
        print(f"| 2 classes, 1-D, mu = 1 | {n} | {est:.3f} ± {2 * se:.3f} | {truth['I(S;R)']:.3f} "
              f"| {est - truth['I(S;R)']:+.3f} | {truth['I(S;Y)']:.3f} |")
    est, se = _mean_se(_project_estimate(*_stratified_two_class(rng, 1.0, 1, 20_000, alpha=2.0)))
    print(f"| 2 classes, 1-D, mu = 1, critic 2 f* | 1 | {est:.3f} ± {2 * se:.3f} | {truth['I(S;R)']:.3f} "
          f"| {est - truth['I(S;R)']:+.3f} | {truth['I(S;Y)']:.3f} |")
    t10 = _orthogonal_truth(rng, 2.0, 10)
    for n in (1, 4, 32):
        est, se = _mean_se(_project_estimate(*_stratified_orthogonal(rng, 2.0, 10, n, 4000)))
        i_sr, i_sr_se = t10["I(S;R)"]
        print(f"| 10 classes, 10-D, mu = 2 | {n} | {est:.3f} ± {2 * se:.3f} | {i_sr:.3f} ± {2 * i_sr_se:.3f} "
              f"| {est - i_sr:+.3f} | {t10['I(S;Y)'][0]:.3f} |")
    for m in (2, 16):
        est, se = _mean_se(_project_estimate(*_textbook_two_class(rng, 1.0, m, 20_000)))
        print(f"| 2 classes, textbook sampling (1 positive, iid negatives), M = {m} | - | {est:.3f} ± {2 * se:.3f} "
              f"| {truth['I(S;R)']:.3f} | {est - truth['I(S;R)']:+.3f} | {truth['I(S;Y)']:.3f} |")


if __name__ == "__main__":
    main()

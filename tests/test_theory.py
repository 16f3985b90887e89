"""Numerical checks behind docs/theory.md: homeomorphisms vs non-injective layers, and the DPI."""

import math

import numpy as np
import torch
import torch.nn.functional as F


def test_sigmoid_is_a_homeomorphism_onto_0_1():
    x = torch.linspace(-15, 15, 10001, dtype=torch.float64)
    y = torch.sigmoid(x)
    assert (y > 0).all() and (y < 1).all()
    assert (torch.diff(y) > 0).all()  # strictly increasing -> injective
    assert torch.allclose(torch.logit(y), x, atol=1e-6)  # continuous inverse on the image


def test_relu_instance_norm_and_pooling_are_not_injective():
    a, b = torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 2.0])
    assert torch.equal(F.relu(a), F.relu(b)) and not torch.equal(a, b)
    gn = torch.nn.GroupNorm(1, 1, affine=False)
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(gn(x), gn(3 * x + 5), atol=1e-3)  # mean and scale discarded (up to eps)
    y = x.clone()
    y[0, 0, 0, 0] += 1.0
    y[0, 0, 0, 1] -= 1.0  # same 2x2 window sum
    assert torch.allclose(F.avg_pool2d(x, 2), F.avg_pool2d(y, 2))


def _plugin_mi(u: np.ndarray, v: np.ndarray, bins: int = 16) -> float:
    joint, _, _ = np.histogram2d(u, v, bins=bins)
    p = joint / joint.sum()
    pu, pv = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / (pu @ pv)[nz])).sum())


def test_data_processing_inequality_plugin_estimate():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200_000)
    y = x + 0.5 * rng.normal(size=x.size)
    full = _plugin_mi(x, y)
    relu = _plugin_mi(x, np.maximum(y, 0))
    assert relu < full  # processing y by ReLU lost information about x
    # an invertible map (sigmoid) on the same binning of ranks keeps it: rank-based bins are identical
    ranks = lambda z: np.argsort(np.argsort(z))  # noqa: E731
    assert math.isclose(_plugin_mi(ranks(x), ranks(y)), _plugin_mi(ranks(x), ranks(1 / (1 + np.exp(-y)))))

"""DSA: each family against hand-made expectations, siamese sharing, gradients, RNG hygiene."""

import pytest
import torch
import torch.nn.functional as F

from mim4dd_fast.augment import DEFAULT_STRATEGY, FAMILIES, DSAParams, dsa
from mim4dd_fast.errors import ConfigError

SEEDS = range(24)


def _batch(n, c=3, h=8, seed=0):
    return torch.randn(n, c, h, h, generator=torch.Generator().manual_seed(seed))


def _shift(x, dy, dx):
    """Reference crop: out[i, j] = x[i + dy, j + dx], zero outside (written with slices, not indices)."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    out[..., max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] = x[
        ..., max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)
    ]
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_family_keeps_shape_and_passes_gradient(family):
    x = _batch(5).requires_grad_(True)
    for seed in (None, 3):
        y = dsa(x, seed=seed, strategy=family)
        assert y.shape == x.shape and y.dtype == x.dtype
        (grad,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), x)
        assert grad.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_siamese_same_seed_same_transform_on_different_batches(family):
    real, syn = _batch(6, seed=1), _batch(3, seed=2)
    # Put one identical image in both batches: the seeded transform must treat it identically,
    # whatever the batch size or position.
    syn[2] = real[4]
    for seed in SEEDS:
        a = dsa(real, seed=seed, strategy=family)
        b = dsa(syn, seed=seed, strategy=family)
        torch.testing.assert_close(a[4], b[2], rtol=0, atol=0)
        # ... and each image gets the same transform as when it is alone in a 1-image batch.
        torch.testing.assert_close(dsa(real[4:5], seed=seed, strategy=family)[0], a[4], rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_siamese_shares_parameters_across_the_batch_per_sample_does_not(family):
    x = _batch(1).expand(16, -1, -1, -1).contiguous()
    shared = dsa(x, seed=5, strategy=family)
    assert all(torch.equal(shared[0], shared[i]) for i in range(16))
    per_sample = dsa(x, strategy=family, generator=torch.Generator().manual_seed(5))
    assert not all(torch.equal(per_sample[0], per_sample[i]) for i in range(16))


@pytest.mark.parametrize("family", FAMILIES)
def test_different_seeds_give_different_transforms(family):
    x = _batch(2)
    outs = [dsa(x, seed=s, strategy=family) for s in SEEDS]
    assert sum(not torch.equal(outs[0], o) for o in outs) >= 5


def test_seeded_default_strategy_is_reproducible_and_varies():
    x = _batch(4)
    torch.testing.assert_close(dsa(x, seed=11), dsa(x.clone(), seed=11), rtol=0, atol=0)
    assert len({dsa(x, seed=s).sum().item() for s in SEEDS}) > 10


def test_flip_mirrors_exactly_or_leaves_alone_and_both_happen():
    x = _batch(3)
    flipped = kept = 0
    for seed in SEEDS:
        y = dsa(x, seed=seed, strategy="flip")
        if torch.equal(y, x[..., torch.arange(7, -1, -1)]):
            flipped += 1
        else:
            assert torch.equal(y, x)
            kept += 1
    assert flipped > 0 and kept > 0


def test_crop_is_a_zero_filled_shift_shared_by_the_batch():
    x = _batch(4, h=8)  # ratio 0.125 on 8 pixels: shifts in {-1, 0, 1}
    seen = set()
    for seed in SEEDS:
        y = dsa(x, seed=seed, strategy="crop")
        matches = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if torch.equal(y, _shift(x, dy, dx))]
        assert len(matches) == 1, "the whole batch must be shifted by one common offset"
        seen.add(matches[0])
    assert len(seen) >= 5


def test_crop_shift_range_follows_the_ratio():
    x = _batch(1, c=1, h=16)  # 0.125 * 16 = 2 pixels
    shifts = set()
    for seed in range(60):
        y = dsa(x, seed=seed, strategy="crop")
        matches = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4) if torch.equal(y, _shift(x, dy, dx))]
        assert len(matches) == 1
        shifts.add(matches[0])
    assert max(max(abs(a), abs(b)) for a, b in shifts) == 2


def test_per_sample_crop_shifts_each_image_by_its_own_offset():
    x = _batch(64, c=1)
    y = dsa(x, strategy="crop", generator=torch.Generator().manual_seed(0))
    for i in range(64):
        assert any(torch.equal(y[i], _shift(x[i], dy, dx)) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def test_cutout_zeros_one_clipped_square_shared_by_the_batch():
    x = _batch(3, h=8) + 10.0  # no zeros in the input, so zeros mark the cut
    for seed in SEEDS:
        y = dsa(x, seed=seed, strategy="cutout")
        zero = y == 0
        assert torch.equal(zero, zero[:1].expand_as(zero)), "same square for every image and channel"
        rows = zero[0, 0].any(1).nonzero().flatten()
        cols = zero[0, 0].any(0).nonzero().flatten()
        # A contiguous rectangle of at most 4x4 (ratio 0.5 of 8), and nothing else changed.
        assert 1 <= rows.numel() <= 4 and 1 <= cols.numel() <= 4
        assert rows[-1] - rows[0] + 1 == rows.numel() and cols[-1] - cols[0] + 1 == cols.numel()
        assert zero[0, 0].sum() == rows.numel() * cols.numel()
        torch.testing.assert_close(y[~zero], x[~zero], rtol=0, atol=0)


def test_color_is_a_shared_affine_map_of_each_grey_image():
    # One channel: saturation is the identity, brightness adds b, contrast scales about the mean by k.
    x = _batch(5, c=1)
    p = DSAParams()
    for seed in SEEDS:
        y = dsa(x, seed=seed, strategy="color")
        xc = x - x.mean(dim=(1, 2, 3), keepdim=True)
        yc = y - y.mean(dim=(1, 2, 3), keepdim=True)
        k = (yc * xc).sum() / (xc * xc).sum()
        assert p.contrast - 1e-5 <= k.item() <= 1 + p.contrast + 1e-5
        torch.testing.assert_close(yc, k * xc, rtol=1e-5, atol=1e-5)
        shift = (y.mean(dim=(1, 2, 3)) - x.mean(dim=(1, 2, 3)))
        assert torch.allclose(shift, shift[:1].expand_as(shift), atol=1e-5)
        assert shift.abs().max() <= p.brightness / 2 + 1e-5


def _ramps(h):
    """Two channels holding each pixel's own normalised (x, y) coordinate in [-1, 1]."""
    t = torch.linspace(-1, 1, h)
    return torch.stack([t.view(1, h).expand(h, h), t.view(h, 1).expand(h, h)])


@pytest.mark.parametrize("family", ["scale", "rotate"])
def test_scale_and_rotate_are_the_documented_shared_affine_warps(family):
    # Bilinear sampling of a linear ramp is exact, so warping the coordinate ramps reveals the
    # sampling matrix; recover it by least squares in the centre (always inside the image).
    h = 16
    x = torch.cat([_ramps(h).unsqueeze(0), _batch(1, c=2, h=h)])
    t = torch.linspace(-1, 1, h)
    gy, gx = torch.meshgrid(t, t, indexing="ij")
    centre = (gx.abs() <= 0.5) & (gy.abs() <= 0.5)
    design = torch.stack([gx[centre], gy[centre]], 1).double()
    for seed in range(8):
        y = dsa(x, seed=seed, strategy=family)
        rows = [torch.linalg.lstsq(design, y[0, k][centre].double().unsqueeze(1)).solution.flatten()
                for k in range(2)]
        a = torch.stack(rows).float()  # [[a00, a01], [a10, a11]]
        if family == "scale":
            assert abs(a[0, 1]) < 1e-4 and abs(a[1, 0]) < 1e-4
            assert all(1 / 1.2 - 1e-4 <= a[k, k] <= 1.2 + 1e-4 for k in range(2))
        else:
            torch.testing.assert_close(a @ a.T, torch.eye(2), rtol=0, atol=1e-4)
            angle = torch.atan2(a[1, 0], a[0, 0]).abs().item()
            assert angle <= 15 * torch.pi / 180 + 1e-4
        # The random image in the same batch went through the same warp.
        theta = torch.cat([a, torch.zeros(2, 1)], 1).unsqueeze(0)
        grid = F.affine_grid(theta, [1, 2, h, h], align_corners=True)
        expected = F.grid_sample(x[1:], grid, align_corners=True)
        torch.testing.assert_close(y[1:], expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_image_batch_works(family):
    x = _batch(1).requires_grad_(True)
    y = dsa(x, seed=0, strategy=family)
    y.sum().backward()
    assert y.shape == x.shape and x.grad is not None


def test_seeded_calls_leave_the_global_rng_untouched():
    state = torch.get_rng_state()
    for seed in SEEDS:
        dsa(_batch(3), seed=seed)
    assert torch.equal(state, torch.get_rng_state())


def test_unseeded_calls_use_the_given_generator_reproducibly():
    x = _batch(8)
    state = torch.get_rng_state()
    a = dsa(x, generator=torch.Generator().manual_seed(9))
    b = dsa(x, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b) and torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("strategy", ["none", "None", ""])
def test_none_strategy_is_identity(strategy):
    x = _batch(2)
    assert dsa(x, seed=1, strategy=strategy) is x
    assert dsa(x, strategy=strategy) is x


def test_unknown_family_is_a_config_error():
    with pytest.raises(ConfigError, match="blur"):
        dsa(_batch(1), strategy="flip_blur")


def test_default_strategy_lists_all_families():
    assert DEFAULT_STRATEGY.split("_") == list(FAMILIES)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_matches_cpu(family):
    x = _batch(4)
    for seed in range(4):
        cpu = dsa(x, seed=seed, strategy=family)
        gpu = dsa(x.cuda().requires_grad_(True), seed=seed, strategy=family)
        gpu.sum().backward()
        torch.testing.assert_close(gpu.detach().cpu(), cpu, rtol=1e-4, atol=1e-4)

"""DSA: differentiable siamese augmentation (Zhao & Bilen, ICML 2021), single-family mode 'S'.

Each call draws ONE family from the strategy (color = brightness + saturation + contrast, crop,
cutout, flip, scale, rotate) and applies it to the whole batch, differentiably in ``x``.

Siamese mode (``seed`` given): the family and its parameters come from a local generator seeded
with ``seed`` and are shared by every image of the batch, so calling ``dsa(real, seed=s)`` and
``dsa(syn, seed=s)`` applies the identical transform to both batches, whatever their sizes. The
global RNG is never touched. Shared parameters are drawn once and expanded, never written with the
originals' ``X[:] = X[0]`` (overlapping memory, an error on current torch for a 1-image batch).

Per-sample mode (no seed): one family per call, per-image parameters from ``generator`` (or the
global RNG), as the originals do when training evaluation nets.

Random numbers are drawn on the generator's device (CPU by default) and then moved to ``x.device``.
Everything is batched: no Python loop over images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError


@dataclass
class DSAParams:
    """Augmentation strengths; defaults are the originals' ``ParamDiffAug`` (DC/DSA/DM/MTT)."""

    ratio_scale: float = 1.2  # scale factors uniform in [1/r, r], independently for x and y
    ratio_rotate: float = 15.0  # rotation angle uniform in [-r, r] degrees
    ratio_crop_pad: float = 0.125  # translation of up to round(r * size) pixels, zero fill
    ratio_cutout: float = 0.5  # a zeroed square of round(r * size) pixels per side
    brightness: float = 1.0  # x + (u - 0.5) * b
    saturation: float = 2.0  # channel-mean + (x - channel-mean) * u * s
    contrast: float = 0.5  # image-mean + (x - image-mean) * (u + c)
    prob_flip: float = 0.5  # horizontal flip probability


DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


def parse_strategy(strategy: str) -> list[str]:
    """Family names of ``strategy`` ('a_b_c'); [] for 'none' / ''; ConfigError on an unknown name."""
    if strategy is None or strategy.strip().lower() in ("", "none"):
        return []
    names = strategy.split("_")
    for name in names:
        if name not in FAMILIES:
            raise ConfigError(
                f"Unknown DSA augmentation {name!r} in strategy {strategy!r}; use names from {', '.join(FAMILIES)}."
            )
    return names


class _Draw:
    """Uniform random numbers for a batch: per-sample, or one value shared by the batch (siamese)."""

    def __init__(self, batch: int, shared: bool, generator: torch.Generator | None, device, dtype,
                 rows: Tensor | None = None, full_batch: int | None = None) -> None:
        self.batch, self.shared, self.generator = batch, shared, generator
        self.device, self.dtype = device, dtype
        self.source = generator.device if generator is not None else torch.device("cpu")
        # A shard of a larger batch: draw for all full_batch images, keep the shard's rows.
        self.rows = None if rows is None else rows.to(self.source)
        self.draws = full_batch if rows is not None else batch

    def _keep(self, v: Tensor) -> Tensor:
        return v if self.shared or self.rows is None else v[self.rows]

    def uniform(self) -> Tensor:
        """[B] floats in [0, 1) on x.device (float64 draws so siamese values never depend on B)."""
        n = 1 if self.shared else self.draws
        u = self._keep(torch.rand(n, generator=self.generator, device=self.source, dtype=torch.float64))
        return u.to(device=self.device, dtype=self.dtype).expand(self.batch)

    def integers(self, low: int, high: int) -> Tensor:
        """[B] int64 in [low, high) on x.device."""
        n = 1 if self.shared else self.draws
        v = self._keep(torch.randint(low, high, (n,), generator=self.generator, device=self.source))
        return v.to(self.device).expand(self.batch)

    def choice(self, k: int) -> int:
        """One index in [0, k): the family of this call."""
        return int(torch.randint(0, k, (1,), generator=self.generator, device=self.source).item())


def _color(x: Tensor, p: DSAParams, d: _Draw) -> Tensor:
    view = (-1, 1, 1, 1)
    x = x + (d.uniform().view(view) - 0.5) * p.brightness
    mean_c = x.mean(dim=1, keepdim=True)
    x = (x - mean_c) * (d.uniform().view(view) * p.saturation) + mean_c
    mean_all = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean_all) * (d.uniform().view(view) + p.contrast) + mean_all


def _crop(x: Tensor, p: DSAParams, d: _Draw) -> Tensor:
    """Translate by (ty, tx) pixels, filling with zeros: out[i, j] = x[i + ty, j + tx] (0 outside)."""
    b, c, h, w = x.shape
    sh, sw = int(h * p.ratio_crop_pad + 0.5), int(w * p.ratio_crop_pad + 0.5)
    ty, tx = d.integers(-sh, sh + 1), d.integers(-sw, sw + 1)
    # The originals pad by one zero pixel and clamp the source index into the padded image.
    rows = (torch.arange(h, device=x.device).view(1, h) + ty.view(b, 1) + 1).clamp(0, h + 1)
    cols = (torch.arange(w, device=x.device).view(1, w) + tx.view(b, 1) + 1).clamp(0, w + 1)
    xp = F.pad(x, (1, 1, 1, 1))
    xp = xp.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w + 2))
    return xp.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))


def _cutout(x: Tensor, p: DSAParams, d: _Draw) -> Tensor:
    """Zero a size_h x size_w square centred at a random (oy, ox), clipped to the image."""
    b, _, h, w = x.shape
    size_h, size_w = int(h * p.ratio_cutout + 0.5), int(w * p.ratio_cutout + 0.5)
    oy = d.integers(0, h + (1 - size_h % 2))
    ox = d.integers(0, w + (1 - size_w % 2))
    r = torch.arange(h, device=x.device).view(1, h)
    s = torch.arange(w, device=x.device).view(1, w)
    top, left = (oy - size_h // 2).view(b, 1), (ox - size_w // 2).view(b, 1)
    in_rows = (r >= top) & (r < top + size_h)
    in_cols = (s >= left) & (s < left + size_w)
    keep = ~(in_rows.view(b, h, 1) & in_cols.view(b, 1, w))
    return x * keep.unsqueeze(1).to(x.dtype)


def _flip(x: Tensor, p: DSAParams, d: _Draw) -> Tensor:
    flip = (d.uniform() < p.prob_flip).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _scale(x: Tensor, p: DSAParams, d: _Draw) -> Tensor:
    lo, hi = 1.0 / p.ratio_scale, p.ratio_scale
    sx = d.uniform() * (hi - lo) + lo
    sy = d.uniform() * (hi - lo) + lo
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)
    return _affine(x, theta)


def _rotate(x: Tensor, p: DSAParams, d: _Draw) -> Tensor:
    angle = (d.uniform() - 0.5) * 2 * p.ratio_rotate / 180 * math.pi
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return _affine(x, theta)


_FNS = {"color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip, "scale": _scale, "rotate": _rotate}


def dsa(
    x: Tensor,
    seed: int | None = None,
    strategy: str = DEFAULT_STRATEGY,
    params: DSAParams | None = None,
    generator: torch.Generator | None = None,
    rows: Tensor | None = None,
    full_batch: int | None = None,
) -> Tensor:
    """Apply one randomly chosen DSA family to the batch ``x`` [B, C, H, W] (differentiable in x).

    ``seed`` given: siamese mode, family and parameters from ``torch.Generator().manual_seed(seed)``,
    shared by the batch (``generator`` is ignored). Otherwise per-sample parameters from
    ``generator`` (or the global RNG).

    ``rows`` (with ``full_batch``): ``x`` is rows ``rows`` of a batch of ``full_batch`` images. The
    parameters are drawn for the whole batch and the rows' ones applied, so a data-parallel shard is
    augmented exactly as it would be inside the full batch.
    """
    families = parse_strategy(strategy)
    if not families:
        return x
    if x.dim() != 4:
        raise ValueError(f"dsa expects a [B, C, H, W] batch, got shape {tuple(x.shape)}")
    params = params or DSAParams()
    if seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    if rows is not None and (full_batch is None or rows.numel() != x.shape[0]):
        raise ValueError("dsa: rows needs full_batch and one index per image of x")
    draw = _Draw(x.shape[0], seed is not None, generator, x.device, x.dtype, rows, full_batch)
    family = families[draw.choice(len(families))]
    return _FNS[family](x, params, draw).contiguous()

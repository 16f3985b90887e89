"""The ConvNet family of DC/DSA/DM/MTT and a functional forward over one flat parameter vector.

Each block is [3x3 conv (bias) -> instance norm -> ReLU -> 2x2 avg pool]; instance norm is
GroupNorm(C, C, affine) exactly as the originals implement it. Trajectory matching differentiates
through parameter updates, so the network can also be run from a flat vector (``functional_forward``)
with ``torch.func.functional_call`` — module forward hooks still fire, which is what FeatureTap uses.

On CPU a big batch runs fastest in chunks (``chunks``): each layer's activation of a 256-image batch
(134 MB at 32x32, width 128) is above glibc's mmap threshold, so every op of it page-faults fresh
memory and streams through RAM; chunks of ~4 MiB activations stay in the heap and in cache and run
the same arithmetic 1.5-3x faster (docs/benchmarks.md). A chunked gradient is the sum of the chunks'
gradients of the summed loss divided by the batch size: the same function, rounded differently.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .errors import ConfigError


def default_depth(image_size: int) -> int:
    """Depth 3 at 32x32 and 4 at 64x64 as the originals; smaller inputs keep a final map >= 2x2."""
    size = 32 if image_size == 28 else image_size
    log = int(math.log2(max(size, 2)))
    return max(1, log - 2) if size >= 32 else max(1, min(3, log - 1))


class ConvNet(nn.Module):
    """ConvNet-D of width W: D conv blocks then one Linear classifier.

    ``tap_names`` lists the block outputs (after pooling) that MIM4DD taps, shallow to deep; each is
    the module ``blocks.<k>`` whose forward output is that layer's feature map.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: int,
        width: int = 128,
        depth: int | None = None,
        norm: str = "instancenorm",
    ) -> None:
        super().__init__()
        if width < 1 or num_classes < 1 or channels < 1:
            raise ConfigError("ConvNet width, channels and num_classes must all be at least 1.")
        depth = default_depth(image_size) if depth is None else depth
        size = 32 if image_size == 28 else image_size
        if depth < 1 or size // (2**depth) < 1:
            raise ConfigError(f"ConvNet depth {depth} is too deep for {image_size}x{image_size} inputs.")
        if norm not in ("instancenorm", "none"):
            raise ConfigError(f"Unknown norm {norm!r}; choose 'instancenorm' or 'none'.")
        self.channels, self.num_classes, self.image_size = channels, num_classes, image_size
        self.width, self.depth, self.norm = width, depth, norm
        blocks = []
        in_ch = channels
        for k in range(depth):
            # 28x28 (MNIST-like) inputs are padded to 32 in the first conv, as in the originals.
            pad = 3 if (k == 0 and image_size == 28) else 1
            layers: list[nn.Module] = [nn.Conv2d(in_ch, width, 3, padding=pad)]
            if norm == "instancenorm":
                layers.append(nn.GroupNorm(width, width, affine=True))
            # In place, as the originals: no extra activation; the norm's backward needs its input, not output.
            layers += [nn.ReLU(inplace=True), nn.AvgPool2d(2, 2)]
            blocks.append(nn.Sequential(*layers))
            in_ch = width
        self.blocks = nn.Sequential(*blocks)
        self.feature_hw = size // (2**depth)
        self.embed_dim = width * self.feature_hw * self.feature_hw
        self.classifier = nn.Linear(self.embed_dim, num_classes)

    @property
    def tap_names(self) -> list[str]:
        """Names (module paths) of the layer outputs MIM4DD can tap, shallow to deep."""
        return [f"blocks.{k}" for k in range(self.depth)]

    def layer_shapes(self) -> dict[str, tuple[int, int, int]]:
        """(C, H, W) of each tapped layer's output."""
        size = 32 if self.image_size == 28 else self.image_size
        return {f"blocks.{k}": (self.width, size >> (k + 1), size >> (k + 1)) for k in range(self.depth)}

    def activation_numel(self) -> int:
        """Elements of the largest activation one image makes (the first block's conv output): sizes chunks."""
        size = 32 if self.image_size == 28 else self.image_size
        return self.width * size * size

    def embed(self, x: Tensor) -> Tensor:
        """Flattened features before the classifier (what DM matches)."""
        return self.blocks(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))


def build_model(
    channels: int, num_classes: int, image_size: int, width: int = 128, depth: int | None = None,
    norm: str = "instancenorm",
) -> ConvNet:
    return ConvNet(channels, num_classes, image_size, width=width, depth=depth, norm=norm)


def flatten_params(model: nn.Module) -> Tensor:
    """All parameters as one detached flat vector, in ``named_parameters`` order."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def unflatten_params(model: nn.Module, flat: Tensor) -> dict[str, Tensor]:
    """Views of ``flat`` shaped like the model's parameters (keeps the autograd link to ``flat``).

    One ``split`` rather than a slice per parameter: its backward writes the parameters' gradients into
    one flat vector, where per-parameter slices would each add a zero-filled vector of the full length.
    """
    named = list(model.named_parameters())
    sizes = [p.numel() for _, p in named]
    if sum(sizes) != flat.numel():
        raise ValueError(f"flat parameter vector has {flat.numel()} entries, the model needs {sum(sizes)}")
    return {name: part.view_as(p) for (name, p), part in zip(named, flat.split(sizes), strict=True)}


def load_flat_params(model: nn.Module, flat: Tensor) -> None:
    """Copy a flat vector into the model's parameters in place."""
    with torch.no_grad():
        for name, value in unflatten_params(model, flat).items():
            model.get_parameter(name).copy_(value)


def functional_forward(model: nn.Module, flat: Tensor, x: Tensor) -> Tensor:
    """Run ``model`` on ``x`` with its parameters taken from ``flat`` (differentiable in both)."""
    return functional_call(model, unflatten_params(model, flat), (x,))


# Largest activation per chunk (bytes) on CPU: well under glibc's adaptive mmap threshold (at most
# 32 MiB) and near the L2 cache, where the chunked forward and backward measured fastest.
CHUNK_BYTES = 4 * 2**20


def chunks(model: nn.Module, x: Tensor, rows: int | None = None, budget: int | None = None) -> list[tuple[int, int]]:
    """[start, stop) rows of a batch like ``x`` (``rows`` images, default all of x) to run at a time: near-equal
    chunks whose largest activation is about ``budget`` (at least it, under twice it).

    One chunk (the whole batch) on accelerators, where big batches are what is fast, and for models that
    do not declare ``activation_numel``. ``budget`` defaults to ``CHUNK_BYTES`` (read at call time).
    """
    n = x.shape[0] if rows is None else rows
    budget = CHUNK_BYTES if budget is None else budget
    per_image = getattr(model, "activation_numel", None)
    if x.device.type != "cpu" or per_image is None or n <= 1:
        return [(0, n)]
    most = max(1, budget // (per_image() * x.element_size()))
    k = max(1, n // most)  # chunks of most to 2*most - 1 images: a batch under twice the budget stays whole
    bounds = [round(i * n / k) for i in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def embed_no_grad(model: nn.Module, x: Tensor) -> Tensor:
    """``model.embed(x)`` without a graph, chunk by chunk: the same function, rounded differently, faster on CPU.

    On CPU a ConvNet's blocks whose input is at least 32x32 run channels-last (oneDNN's convolution gains
    there) and the smaller ones in the plain layout (torch's channels-last group norm is several times slower
    than the plain one on 16x16 and smaller maps, most of all in bfloat16; measured, docs/benchmarks.md).
    """
    blocks = getattr(model, "blocks", None) if x.device.type == "cpu" and x.dim() == 4 else None
    with torch.no_grad():
        outs = []
        for a, b in chunks(model, x):
            if blocks is None:
                outs.append(model.embed(x[a:b]))
                continue
            h = x[a:b]
            for block in blocks:
                layout = torch.channels_last if min(h.shape[-2:]) >= 32 else torch.contiguous_format
                h = block(h.contiguous(memory_format=layout))
            outs.append(h.flatten(1))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

"""The networks: the ConvNet family of DC/DSA/DM/MTT (the default everywhere) and, for cross-architecture
evaluation, the originals' MLP, LeNet and ResNet-18 with BatchNorm; plus two ways to run them fast.

ConvNet: each block is [3x3 conv (bias) -> instance norm -> ReLU -> 2x2 avg pool]; instance norm is
GroupNorm(C, C, affine) exactly as the originals implement it (``layers.py``: the same modules with a
fast second derivative on CPU). Trajectory matching differentiates
through parameter updates, so a network can also be run from a flat vector (``functional_forward``)
with ``torch.func.functional_call`` — module forward hooks still fire, which is what FeatureTap uses.

On CPU a big batch runs fastest in chunks (``chunks``): each layer's activation of a 256-image batch
(134 MB at 32x32, width 128) is above glibc's mmap threshold, so every op of it page-faults fresh
memory and streams through RAM; chunks of ~4 MiB activations stay in the heap and in cache and run
the same arithmetic 1.5-3x faster (docs/benchmarks.md). A chunked gradient is the sum of the chunks'
gradients of the summed loss divided by the batch size: the same function, rounded differently.

``StackedNets`` trains n nets of one architecture at once as ONE n-times wider network with grouped
layers (each net's channels form one group), so each SGD step of all n nets is one forward/backward.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import skip_init

from .errors import ConfigError
from .layers import AvgPool2, InstanceNorm


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
        if depth < 1:
            raise ConfigError(f"ConvNet depth must be at least 1, got {depth}.")
        if size // (2**depth) < 1:
            raise ConfigError(f"ConvNet depth {depth} is too deep for {image_size}x{image_size} inputs (each block "
                              f"halves the side; at most {int(math.log2(size))} blocks fit).")
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
                layers.append(InstanceNorm(width))
            # In place, as the originals: no extra activation; the norm's backward needs its input, not output.
            layers += [nn.ReLU(inplace=True), AvgPool2()]
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


class MLP(nn.Module):
    """DC's MLP: flatten -> Linear(C*H*W, W) -> ReLU -> Linear(W, W) -> ReLU -> Linear(W, classes); W = 128."""

    def __init__(self, channels: int, num_classes: int, image_size: int, width: int = 128) -> None:
        super().__init__()
        if width < 1 or num_classes < 1 or channels < 1:
            raise ConfigError("MLP width, channels and num_classes must all be at least 1.")
        self.channels, self.num_classes, self.image_size = channels, num_classes, image_size
        self.fc_1 = nn.Linear(channels * image_size * image_size, width)
        self.fc_2 = nn.Linear(width, width)
        self.fc_3 = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.fc_1(x.flatten(1)))
        return self.fc_3(F.relu(self.fc_2(x)))


class LeNet(nn.Module):
    """DC's LeNet-5: [5x5 conv 6 -> ReLU -> 2x2 max pool] -> [5x5 conv 16 -> ReLU -> max pool] -> 120 -> 84 -> classes.

    As the originals, the first conv pads by 2 on one-channel inputs (28 -> 28) and not on colour ones
    (32 -> 28), so both reach 16 x 5 x 5 features. Inputs too small for an unpadded second conv (a map
    under 6 pixels after the first pool, e.g. digits at 8x8: 8 -> 4) pad it by 2 too (4 -> 4 -> 2).
    """

    def __init__(self, channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        if num_classes < 1 or channels < 1:
            raise ConfigError("LeNet channels and num_classes must both be at least 1.")
        self.channels, self.num_classes, self.image_size = channels, num_classes, image_size
        pad1 = 2 if channels == 1 else 0
        size = (image_size + 2 * pad1 - 4) // 2
        pad2 = 0 if size >= 6 else 2
        size = (size + 2 * pad2 - 4) // 2
        if size < 1:
            raise ConfigError(f"LeNet needs larger inputs than {image_size}x{image_size}.")
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=pad1), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, 5, padding=pad2), nn.ReLU(), nn.MaxPool2d(2, 2),
        )
        self.fc_1 = nn.Linear(16 * size * size, 120)
        self.fc_2 = nn.Linear(120, 84)
        self.fc_3 = nn.Linear(84, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.fc_1(self.features(x).flatten(1)))
        return self.fc_3(F.relu(self.fc_2(x)))


class BasicBlock(nn.Module):
    """ResNet basic block: 3x3 conv -> BN -> ReLU -> 3x3 conv -> BN, plus the (1x1 conv + BN) shortcut, ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return F.relu(out)


class ResNet18(nn.Module):
    """The originals' ResNet-18 with BatchNorm (``ResNet18BN``): the CIFAR form of ResNet-18.

    3x3 stem (64 channels, no max pool), four stages of two basic blocks (64, 128, 256, 512 channels;
    strides 1, 2, 2, 2), global average pooling, one Linear. The originals pool with a fixed 4x4
    window, which is the global average at 32x32 and 28x28; global pooling also works on smaller inputs.
    ``base_width`` scales every stage (64 = the originals'; 16 = a small ResNet-18 with 1/16 of the
    FLOPs, the same depth, blocks and BatchNorm).
    """

    def __init__(self, channels: int, num_classes: int, image_size: int, base_width: int = 64) -> None:
        super().__init__()
        if num_classes < 1 or channels < 1 or base_width < 1:
            raise ConfigError("ResNet-18 channels, num_classes and base width must all be at least 1.")
        self.channels, self.num_classes, self.image_size = channels, num_classes, image_size
        w = base_width
        self.conv1 = nn.Conv2d(channels, w, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        stages, in_planes = [], w
        for planes, stride in ((w, 1), (2 * w, 2), (4 * w, 2), (8 * w, 2)):
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(8 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.classifier(self.pool(out).flatten(1))


MODELS = ("convnet", "mlp", "lenet", "resnet18")


def build_model(
    channels: int, num_classes: int, image_size: int, width: int = 128, depth: int | None = None,
    norm: str = "instancenorm", *, kind: str = "convnet", resnet_width: int = 64,
) -> nn.Module:
    """A fresh network of architecture ``kind`` (one of MODELS; ConvNet by default).

    ``width`` is the ConvNet's width and the MLP's hidden units; ``depth`` and ``norm`` are the
    ConvNet's; ``resnet_width`` is ResNet-18's base width (64 = the originals'). LeNet has the
    originals' fixed widths.
    """
    if kind == "convnet":
        return ConvNet(channels, num_classes, image_size, width=width, depth=depth, norm=norm)
    if depth is not None or norm != "instancenorm":
        raise ConfigError(f"depth and norm are ConvNet settings; model {kind!r} has none.")
    if kind == "mlp":
        return MLP(channels, num_classes, image_size, width=width)
    if kind == "lenet":
        return LeNet(channels, num_classes, image_size)
    if kind == "resnet18":
        return ResNet18(channels, num_classes, image_size, base_width=resnet_width)
    raise ConfigError(f"Unknown model {kind!r}; choose one of {', '.join(MODELS)}.")


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


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


# ---------------------------------------------------------------------------------------------------
# n nets of one architecture as one grouped net


class NotStackable(ValueError):
    """The nets cannot be run as one grouped net (an unsupported layer); train them one by one instead."""


class GroupedLinear(nn.Module):
    """n independent Linear layers on a [B, n * in] input (net i's features at [i*in, (i+1)*in)): [B, n * out].

    Computed as one grouped 1x1 convolution, so every net's slice is computed by the same kernel
    whatever its position in the stack (a batched matmul's bias gradient, a broadcast sum, is not).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.n, self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight)  # [n, out, in]
        self.bias = None if bias is None else nn.Parameter(bias)  # [n, out]

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.view(self.n * self.out_features, self.in_features, 1, 1)
        bias = None if self.bias is None else self.bias.view(-1)
        return F.conv2d(x[:, :, None, None], weight, bias, groups=self.n).flatten(1)


def _grouped_layer(layers: list[nn.Module]) -> nn.Module | None:
    """The grouped equivalent of the same layer in n nets; None for a layer without parameters or buffers."""
    first, n = layers[0], len(layers)
    device = next(iter([*first.parameters(), *first.buffers()]), torch.empty(0)).device
    # skip_init: no random initialisation (the caller's RNG stays untouched); every tensor is copied below
    if isinstance(first, nn.Conv2d):
        g = skip_init(nn.Conv2d, n * first.in_channels, n * first.out_channels, first.kernel_size,
                      stride=first.stride, padding=first.padding, dilation=first.dilation, groups=n * first.groups,
                      bias=first.bias is not None, padding_mode=first.padding_mode, device=device)
    elif isinstance(first, nn.GroupNorm):
        g = skip_init(nn.GroupNorm, n * first.num_groups, n * first.num_channels, eps=first.eps, affine=first.affine,
                      device=device)
    elif isinstance(first, nn.BatchNorm2d):  # per-channel statistics over (B, H, W): per net, as one by one
        g = skip_init(nn.BatchNorm2d, n * first.num_features, eps=first.eps, momentum=first.momentum,
                      affine=first.affine, track_running_stats=first.track_running_stats, device=device)
    elif isinstance(first, nn.Linear):
        return GroupedLinear(torch.stack([m.weight.detach() for m in layers]),
                             None if first.bias is None else torch.stack([m.bias.detach() for m in layers]))
    elif not any(True for _ in first.parameters(recurse=False)) and not any(True for _ in first.buffers(False)):
        return None
    else:
        raise NotStackable(f"{type(first).__name__} layers cannot be grouped")
    with torch.no_grad():
        for name, value in g.named_parameters(recurse=False):
            value.copy_(torch.cat([getattr(m, name).detach() for m in layers]))
        for name, value in g.named_buffers(recurse=False):
            if value.dim() == 0:  # BatchNorm's num_batches_tracked: the same count in every net
                value.copy_(getattr(first, name))
            else:
                value.copy_(torch.cat([getattr(m, name).detach() for m in layers]))
    return g


class StackedNets(nn.Module):
    """n nets of one architecture trained at once as ONE wider net: the same result as n nets, one pass each step.

    Every Conv2d becomes one grouped conv (net i owns channels [i*C, (i+1)*C)), GroupNorm and
    BatchNorm2d become the same norm over n times the channels (their statistics are per channel or
    per group, so per net), Linear becomes a batched matmul, and parameter-free layers (ReLU, pools,
    flatten, residual adds) act on the wider tensor unchanged. The architecture's own ``forward`` runs
    as is, on inputs laid out [B, n*C, H, W]. Each stacked parameter is the n nets' parameters
    concatenated along dim 0, so the sum of the nets' losses has each net's own gradient in its slice,
    and an elementwise optimizer (SGD) steps every net exactly as it would alone. Only the order of
    float additions inside the kernels differs from one-by-one training.

    Construction checks one forward of the stack against the nets themselves (eval mode) and raises
    NotStackable on any mismatch or unsupported layer, so a new architecture falls back rather than
    silently mixing nets.
    """

    def __init__(self, nets: list[nn.Module]) -> None:
        super().__init__()
        shapes = [{k: v.shape for k, v in m.state_dict().items()} for m in nets]
        if not nets or any(type(m) is not type(nets[0]) or s != shapes[0] for m, s in zip(nets, shapes, strict=True)):
            raise NotStackable("stacking needs one or more nets of one architecture")
        self.n = len(nets)
        self._template = (copy.deepcopy(nets[0]),)  # a tuple: not registered as a submodule
        self.body = copy.deepcopy(nets[0])
        modules = [dict(m.named_modules()) for m in nets]
        for name in [name for name, _ in self.body.named_modules() if name]:
            layers = [mods.get(name) for mods in modules]
            if any(m is None or type(m) is not type(layers[0]) for m in layers):
                raise NotStackable("the nets do not share one architecture")
            grouped = _grouped_layer(layers)
            if grouped is not None:
                parent, _, leaf = name.rpartition(".")
                setattr(self.body.get_submodule(parent) if parent else self.body, leaf, grouped)
        self._check(nets)
        self.train(nets[0].training)

    @staticmethod
    def to_grouped(x: Tensor) -> Tensor:
        """[n, B, C, H, W] (net i's batch at x[i]) -> [B, n*C, H, W]."""
        n, b = x.shape[:2]
        return x.transpose(0, 1).reshape(b, n * x.shape[2], *x.shape[3:])

    def forward(self, x: Tensor) -> Tensor:
        """Net i's logits on its own batch x[i]: [n, B, C, H, W] -> [n, B, K]."""
        b = x.shape[1]
        return self.body(self.to_grouped(x)).view(b, self.n, -1).transpose(0, 1)

    def forward_shared(self, x: Tensor) -> Tensor:
        """Every net on the same batch: [B, C, H, W] -> [n, B, K]."""
        b = x.shape[0]
        return self.body(x.repeat(1, self.n, 1, 1)).view(b, self.n, -1).transpose(0, 1)

    def flat_params(self) -> Tensor:
        """[n, P]: row i is net i's ``flatten_params`` vector."""
        return torch.cat([p.detach().reshape(self.n, -1) for p in self.body.parameters()], 1)

    def net(self, i: int) -> nn.Module:
        """A standalone copy of net i (parameters and buffers), in this stack's train/eval mode."""
        net = copy.deepcopy(self._template[0]).to(next(self.body.parameters()).device)
        own = net.state_dict()
        state = {k: (v if own[k].dim() == 0 else v.reshape(self.n, -1)[i].view_as(own[k]))
                 for k, v in self.body.state_dict().items()}
        net.load_state_dict(state)
        return net.train(self.training)

    @torch.no_grad()
    def _check(self, nets: list[nn.Module]) -> None:
        template = self._template[0]
        shape = (getattr(template, "channels", None), getattr(template, "image_size", None))
        if None in shape:
            raise NotStackable("the net does not declare its input channels and image_size")
        modes = [m.training for m in nets]
        gen = torch.Generator().manual_seed(0)
        device = next(self.body.parameters()).device
        x = torch.randn(self.n, 2, shape[0], shape[1], shape[1], generator=gen).to(device)
        try:
            self.eval()
            for m in nets:
                m.eval()
            ref = torch.stack([m(x[i]) for i, m in enumerate(nets)])
            got = self(x)
        finally:
            for m, mode in zip(nets, modes, strict=True):
                m.train(mode)
        if got.shape != ref.shape or not bool(((got - ref).abs() <= 1e-4 * (1 + ref.abs().max())).all()):
            raise NotStackable("the grouped net does not reproduce the nets (a layer mixes channels)")

"""DC: dataset condensation by gradient matching (Zhao, Mopuri, Bilen, ICLR 2021), with DSA.

Faithful to VICO-UoE/DatasetCondensation ``main.py``: every iteration draws a fresh randomly
initialised ConvNet; for each of ``outer_loop`` rounds the synthetic images take one SGD step
(momentum 0.5) on the sum over classes of a distance between the gradient of the cross-entropy on a
real batch of class c and on the synthetic images of class c (same DSA transform for both); between
rounds the net trains ``inner_loop`` epochs on the synthetic set. What differs (never the maths):
each class's distance is backpropagated at once into the images only (the original keeps all
classes' double-backward graphs alive and also computes second-order gradients for the net's
weights, which it then discards), and all randomness comes from the method's own generator so a
resumed run is bit-identical. See docs/method.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import require
from ..models import chunks
from ..precision import autocast
from ..precision import check as check_precision
from .base import ConvNetSettings
from .fresh_net import FreshNetMethod
from .spec import MethodSpec

# (outer_loop, inner_loop) by IPC, DatasetCondensation utils.get_loops.
LOOP_TABLE: dict[int, tuple[int, int]] = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15),
                                          50: (50, 10)}
METRICS = ("ours", "mse", "cos")
_EPS = 1e-6  # the originals' denominator guard in the cosine distances


def default_loops(ipc: int) -> tuple[int, int]:
    """The original table; an IPC outside it takes the row of the nearest tabled IPC (ties: the smaller)."""
    if ipc in LOOP_TABLE:
        return LOOP_TABLE[ipc]
    nearest = min(LOOP_TABLE, key=lambda k: (abs(k - ipc), k))
    return LOOP_TABLE[nearest]


def _is_int(v: object, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_pos(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@dataclass
class DCConfig(ConvNetSettings):
    """DC settings; defaults are the original ``main.py`` (DSA variant)."""

    outer_loop: int | None = None  # None: LOOP_TABLE by IPC (see default_loops)
    inner_loop: int | None = None
    batch_real: int = 256  # real images per class per matching step
    batch_train: int = 256  # minibatch of the inner training on the synthetic set
    lr_img: float = 0.1
    lr_net: float = 0.01
    momentum_img: float = 0.5
    dsa: bool = True
    dis_metric: str = "ours"  # ours | mse | cos
    include_1d: bool = False  # "ours" only: also match bias / norm gradients (the original ignores them)
    # Synthetic side of all classes in one vmapped pass (torch.func) instead of one pass per class; same loss.
    class_batch: bool = False
    width: int = 128
    depth: int | None = None  # None: models.default_depth(image_size)
    precision: str = "fp32"  # "bf16": the real-side gradient under bfloat16 autocast (mim4dd_fast.precision)

    def validate(self) -> None:
        check_precision(self.precision, "DC")
        require(self.outer_loop is None or _is_int(self.outer_loop, 1),
                f"DC outer_loop must be at least 1 (or unset for the IPC table), got {self.outer_loop!r}.")
        require(self.inner_loop is None or _is_int(self.inner_loop, 0),
                f"DC inner_loop must be at least 0 (or unset for the IPC table), got {self.inner_loop!r}.")
        require(_is_int(self.batch_real, 1), f"DC batch_real must be at least 1, got {self.batch_real!r}.")
        require(_is_int(self.batch_train, 1), f"DC batch_train must be at least 1, got {self.batch_train!r}.")
        require(_is_pos(self.lr_img), f"DC lr_img must be a positive finite number, got {self.lr_img!r}.")
        require(_is_pos(self.lr_net), f"DC lr_net must be a positive finite number, got {self.lr_net!r}.")
        require(isinstance(self.momentum_img, (int, float)) and 0.0 <= self.momentum_img < 1.0,
                f"DC momentum_img must be in [0, 1), got {self.momentum_img!r}.")
        require(self.dis_metric in METRICS,
                f"Unknown DC dis_metric {self.dis_metric!r}; choose one of {', '.join(METRICS)}.")
        require(isinstance(self.class_batch, bool), f"DC class_batch must be true or false, got {self.class_batch!r}.")
        require(_is_int(self.width, 1), f"DC width must be at least 1, got {self.width!r}.")
        require(self.depth is None or _is_int(self.depth, 1),
                f"DC depth must be at least 1 (or unset for the default), got {self.depth!r}.")

    def loops(self, ipc: int) -> tuple[int, int]:
        outer, inner = default_loops(ipc)
        return (self.outer_loop or outer, inner if self.inner_loop is None else self.inner_loop)


def mean_ce_grad(net: nn.Module, params: list[Tensor], x: Tensor, y: Tensor, precision: str = "fp32") -> list[Tensor]:
    """d mean cross-entropy(net(x), y) / d params, in cache-sized chunks (``models.chunks``) with one chunk's
    graph alive at a time: the sum of the chunks' gradients of the summed loss, divided by the batch size.
    "bf16": each chunk's forward under bfloat16 autocast (loss and gradients float32)."""
    total: list[Tensor] | None = None
    for a, b in chunks(net, x):
        with autocast(precision, x.device):
            loss = F.cross_entropy(net(x[a:b]), y[a:b], reduction="sum")
        loss = loss / x.shape[0]  # cross-entropy is float32 under autocast
        grads = torch.autograd.grad(loss, params)
        total = list(grads) if total is None else [t.add_(g) for t, g in zip(total, grads, strict=True)]
    assert total is not None
    return total


def class_grads(net: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    """Per-class gradients of the mean cross-entropy for all classes in one pass: ``x`` [K, n, ...] and ``y`` [K, n]
    hold K classes' batches; returns each parameter's gradients stacked [K, *shape] (``named_parameters`` order).

    ``torch.func.vmap`` over ``grad`` of a ``functional_call``: the classes' forward and backward run as one
    batched computation, and the result stays differentiable in ``x`` (the matching loss backpropagates
    through it to the images) exactly as the per-class ``autograd.grad(..., create_graph=True)`` loop.
    """
    from torch.func import functional_call, grad, vmap

    names = [name for name, _ in net.named_parameters()]

    def mean_ce(params: dict[str, Tensor], xc: Tensor, yc: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(net, params, (xc,)), yc)

    grads = vmap(grad(mean_ce), in_dims=(None, 0, 0))(dict(net.named_parameters()), x, y)
    return [grads[name] for name in names]


def _layer_distance(gws: Tensor, gwr: Tensor) -> Tensor:
    """sum over output nodes of 1 - cos(gws_row, gwr_row), rows = first dimension."""
    gws, gwr = gws.reshape(gws.shape[0], -1), gwr.reshape(gwr.shape[0], -1)
    cos = (gws * gwr).sum(-1) / (gws.norm(dim=-1) * gwr.norm(dim=-1) + _EPS)
    return (1 - cos).sum()


def match_distance(gw_syn: Sequence[Tensor], gw_real: Sequence[Tensor], metric: str = "ours",
                   include_1d: bool = False) -> Tensor:
    """Distance between two lists of per-parameter gradients (DatasetCondensation ``match_loss``).

    "ours": sum over weight tensors of sum over output nodes (first dim) of 1 - cosine; 1-D tensors
    (bias, norm) count 0 unless ``include_1d``, then each is one row. "mse": squared Euclidean
    distance of the concatenated gradients. "cos": 1 - cosine of the concatenated gradients. mse and
    cos use every tensor, as the original does.
    """
    if len(gw_syn) != len(gw_real):
        raise ValueError(f"gradient lists differ in length: {len(gw_syn)} vs {len(gw_real)}")
    if metric == "ours":
        terms = [_layer_distance(s if s.dim() > 1 else s.reshape(1, -1), r if r.dim() > 1 else r.reshape(1, -1))
                 for s, r in zip(gw_syn, gw_real, strict=True) if s.dim() > 1 or include_1d]
        return torch.stack(terms).sum() if terms else gw_syn[0].new_zeros(())
    s = torch.cat([g.reshape(-1) for g in gw_syn])
    r = torch.cat([g.reshape(-1) for g in gw_real])
    if metric == "mse":
        return ((s - r) ** 2).sum()
    if metric == "cos":
        return 1 - (s * r).sum() / (s.norm() * r.norm() + _EPS)
    raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


class DC(FreshNetMethod):
    """Gradient matching; ``step()`` is one outer iteration of the original (fresh net, outer_loop rounds)."""

    name = "dc"
    config_class = DCConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.outer_loop, self.inner_loop = self.config.loops(self.ipc)

    # -- one iteration --------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        cfg = self.config
        net = self.fresh_net()
        params = list(net.parameters())
        net_opt = torch.optim.SGD(params, lr=cfg.lr_net)  # the original: plain SGD, no momentum
        logs: dict[str, float] = {}
        total = 0.0
        for ol in range(self.outer_loop):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.match(net, params)
            self.check_finite(loss, "The DC matching loss", f"lower lr_img (now {cfg.lr_img:g})")
            total += loss
            if ol == 0:  # the MIM term on this iteration's fresh net, before it trains
                logs = self.add_term_gradient(net, augment=self._dsa)
            self.optimizer.step()
            self.shard.share_rows(self.images, self.labels)  # the net trains on every class's new images
            if ol == self.outer_loop - 1:
                break
            self.train_net(net, net_opt)
        self.iteration += 1
        return {"loss": total / (self.dataset.num_classes * self.outer_loop), **logs}

    def match(self, net: nn.Module, params: list[Tensor]) -> float:
        """Accumulate d(sum_c distance_c)/d images into ``images.grad``; return the summed distance.

        Class by class as the original, but each class's double-backward graph is consumed and freed
        at once, and only the images' gradient is computed from it. Every rank draws every class's random
        numbers (identical streams); a class's work is done by the rank that owns it.
        """
        cfg, ipc = self.config, self.ipc
        total = torch.zeros((), dtype=self.images.dtype, device=self.device)
        batched: list[tuple[Tensor, Tensor, list[Tensor]]] = []  # class_batch: (x_syn, y_syn, gw_real) per class
        for c in range(self.dataset.num_classes):
            x_real, y_real = self.sample_real(cfg.batch_real, [c])
            seed = self.draw_seed() if self._dsa is not None else None
            if not self.shard.owns(c):
                continue
            x_syn = self.images[c * ipc : (c + 1) * ipc]
            if seed is not None:
                x_real, x_syn = self._dsa(x_real, seed=seed), self._dsa(x_syn, seed=seed)
            gw_real = mean_ce_grad(net, params, x_real, y_real, cfg.precision)
            y_syn = self.labels[c * ipc : (c + 1) * ipc]
            if cfg.class_batch:
                batched.append((x_syn, y_syn, gw_real))
                continue
            gw_syn = torch.autograd.grad(F.cross_entropy(net(x_syn), y_syn), params, create_graph=True)
            dist = match_distance(gw_syn, gw_real, cfg.dis_metric, cfg.include_1d)
            dist.backward(inputs=[self.images])
            total += dist.detach()
        if batched:  # every owned class's synthetic gradients in one vmapped pass, one backward into the images
            xs, ys, reals = zip(*batched, strict=True)
            gw_syn = class_grads(net, torch.stack(xs), torch.stack(ys))
            dist = sum(match_distance([g[i] for g in gw_syn], reals[i], cfg.dis_metric, cfg.include_1d)
                       for i in range(len(reals)))
            dist.backward(inputs=[self.images])
            total += dist.detach()
        return float(self.shard.sum(total, "the DC loss sum"))

    def train_net(self, net: nn.Module, net_opt: torch.optim.Optimizer) -> None:
        """``inner_loop`` epochs over a frozen copy of the synthetic set (the original's ``epoch('train')``)."""
        cfg = self.config
        x_all, y_all = self.images.detach().clone(), self.labels
        n = x_all.shape[0]
        for _ in range(self.inner_loop):
            order = torch.randperm(n, generator=self.generator).to(self.device)
            for start in range(0, n, cfg.batch_train):
                idx = order[start : start + cfg.batch_train]
                xb = x_all[idx]
                if self._dsa is not None:
                    xb = self._dsa(xb, generator=self.generator)  # per-image parameters, as the original
                net_opt.zero_grad(set_to_none=True)
                yb = y_all[idx]
                for a, b in chunks(net, xb):  # chunk gradients of the summed loss add up to the mean's
                    (F.cross_entropy(net(xb[a:b]), yb[a:b], reduction="sum") / xb.shape[0]).backward()
                net_opt.step()


SPEC = MethodSpec(name="dc", config_class=DCConfig, build=DC,
                  summary="gradient matching (Zhao, Mopuri, Bilen, ICLR 2021), with DSA")

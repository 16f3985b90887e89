"""DM: dataset condensation with distribution matching (Zhao & Bilen, WACV 2023), with DSA.

Faithful to VICO-UoE/DatasetCondensation ``main_DM.py`` (ConvNet branch): every iteration draws a
fresh randomly initialised, frozen ConvNet and takes one SGD step (momentum 0.5) on the synthetic
images for sum over classes of ||mean embedding of a real batch - mean embedding of the synthetic
images||^2, real and synthetic of a class under the same DSA transform. What differs (never the
maths): real embeddings are computed under no_grad, in cache-sized chunks and channels-last on CPU
(``models.embed_no_grad``: the same function, 2-3x faster there), the synthetic images of all classes
go through the net in one batch (instance norm is per sample, so this is the same function), and
all randomness comes from the method's own generator so a resumed run is bit-identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import require
from ..models import chunks, embed_no_grad
from ..precision import autocast
from ..precision import check as check_precision
from .base import ConvNetSettings
from .fresh_net import FreshNetMethod
from .spec import MethodSpec


@dataclass
class DMConfig(ConvNetSettings):
    """DM settings; defaults are the original ``main_DM.py``."""

    batch_real: int = 256  # real images per class per iteration
    lr_img: float = 1.0
    momentum_img: float = 0.5
    dsa: bool = True
    width: int = 128
    depth: int | None = None  # None: models.default_depth(image_size)
    precision: str = "fp32"  # "bf16": the real-side forward under bfloat16 autocast (mim4dd_fast.precision)

    def validate(self) -> None:
        check_precision(self.precision, "DM")
        def is_int(v: object, low: int) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= low

        require(is_int(self.batch_real, 1), f"DM batch_real must be at least 1, got {self.batch_real!r}.")
        require(isinstance(self.lr_img, (int, float)) and math.isfinite(self.lr_img) and self.lr_img > 0,
                f"DM lr_img must be a positive finite number, got {self.lr_img!r}.")
        require(isinstance(self.momentum_img, (int, float)) and 0.0 <= self.momentum_img < 1.0,
                f"DM momentum_img must be in [0, 1), got {self.momentum_img!r}.")
        require(is_int(self.width, 1), f"DM width must be at least 1, got {self.width!r}.")
        require(self.depth is None or is_int(self.depth, 1),
                f"DM depth must be at least 1 (or unset for the default), got {self.depth!r}.")


class DM(FreshNetMethod):
    """Distribution matching; ``step()`` is one iteration of the original (one image update)."""

    name = "dm"
    config_class = DMConfig

    def step(self) -> dict[str, float]:
        """Every rank draws every class's random numbers; a class's work is done by the rank that owns it."""
        cfg, ipc, k = self.config, self.ipc, self.dataset.num_classes
        net = self.fresh_net()
        for p in net.parameters():
            p.requires_grad_(False)
        real_means, syn = [], []
        for c in range(k):
            x_real, _ = self.sample_real(cfg.batch_real, [c])
            seed = self.draw_seed() if self._dsa is not None else None
            if not self.shard.owns(c):
                continue
            x_syn = self.images[c * ipc : (c + 1) * ipc]
            if seed is not None:
                x_real, x_syn = self._dsa(x_real, seed=seed), self._dsa(x_syn, seed=seed)
            with autocast(cfg.precision, x_real.device):
                real_embed = embed_no_grad(net, x_real)
            real_means.append(real_embed.to(x_real.dtype).mean(0))  # the mean in the images' precision
            syn.append(x_syn)
        x_syn = torch.cat(syn)
        syn_means = torch.cat([net.embed(x_syn[a:b]) for a, b in chunks(net, x_syn)]).view(len(syn), ipc, -1).mean(1)
        loss = ((torch.stack(real_means) - syn_means) ** 2).sum()
        value = float(self.shard.sum(loss.detach(), "the DM loss sum"))
        self.check_finite(value, "The DM matching loss", f"lower lr_img (now {cfg.lr_img:g})")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        logs = self.add_term_gradient(net, augment=self._dsa)
        self.optimizer.step()
        self.shard.share_rows(self.images, self.labels)
        self.iteration += 1
        return {"loss": value / k, **logs}


SPEC = MethodSpec(name="dm", config_class=DMConfig, build=DM,
                  summary="distribution matching (Zhao & Bilen, WACV 2023), with DSA")

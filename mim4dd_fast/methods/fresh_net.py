"""What DC and DM share: a freshly initialised network every iteration, and SGD on the images.

Both draw a new randomly initialised ConvNet per iteration from a seed of the method's own generator
(so a resumed run is bit-identical and the caller's RNG is untouched) and update the images with SGD
and momentum; under torchrun each rank's momentum rows of its own classes are assembled at checkpoint
time, so the saved state is the single-process one.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..data import Dataset
from ..distributed import SINGLE, Dist
from ..errors import NonFiniteError
from ..models import build_model
from .base import AuxTerm, DistillMethod


def load_dsa():
    """The DSA function (imported on use: augment pulls in its own machinery)."""
    from ..augment import dsa

    return dsa


class FreshNetMethod(DistillMethod):
    """A DistillMethod that trains its images with SGD against a fresh network each iteration.

    Its config has ``lr_img``, ``momentum_img`` and ``dsa``; it shards the classes over the ranks.
    """

    config_class: type  # the default settings when none are given

    def __init__(self, dataset: Dataset, ipc: int, config=None, *, init: str = "real",
                 device: str | torch.device = "cpu", seed: int = 0, term: AuxTerm | None = None,
                 dist: Dist = SINGLE) -> None:
        super().__init__(dataset, ipc, config or self.config_class(), init=init, device=device, seed=seed,
                         term=term, dist=dist)
        self.shard.check_classes(dataset.num_classes, self.name)
        self.optimizer = torch.optim.SGD([self.images], lr=self.config.lr_img, momentum=self.config.momentum_img)
        self._dsa = load_dsa() if self.config.dsa else None

    @contextmanager
    def _local_rng(self):
        """Global-RNG consumers (module init) inside run from a seed of our generator; caller's RNG untouched."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        seed = self.draw_seed()
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    def fresh_net(self) -> nn.Module:
        """A randomly initialised ConvNet, built on CPU (init independent of device), in train mode."""
        d = self.dataset
        with self._local_rng():
            net = build_model(d.channels, d.num_classes, d.image_size, **self.config.model_kwargs(d))
        return net.to(self.device).train()

    def check_finite(self, value: float, what: str, advice: str) -> None:
        if not math.isfinite(value):
            raise NonFiniteError(f"{what} became non-finite at iteration {self.iteration + 1}; {advice}.")

    def state_dict(self) -> dict[str, Any]:
        state = copy.deepcopy(self.optimizer.state_dict())
        for entry in state["state"].values():
            if entry.get("momentum_buffer") is not None:
                entry["momentum_buffer"] = self.shard.own_rows(entry["momentum_buffer"], self.labels,
                                                               "gathering the optimizer state")
        return {**super().state_dict(), "optimizer": state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        # Deep copy: torch may keep the given tensors as its own buffers and update them in place.
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))

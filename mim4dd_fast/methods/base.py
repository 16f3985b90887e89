"""The method interface every distillation method implements, and what they share.

A method owns the synthetic images (and any learnable extras such as MTT's step size) and exposes
``step()``: one distillation iteration returning a dict of float scalars. An optional auxiliary
``term`` (the MIM4DD mutual-information term) plugs into any method through ``term_loss``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..data import Dataset
from ..distributed import SINGLE, Dist
from ..errors import ConfigError


class AuxTerm(Protocol):
    """An extra loss added to a method's own loss (implemented by ``methods.mim.MIMTerm``)."""

    n_real: int  # real images per class the term needs each iteration

    def loss(
        self,
        model: nn.Module,
        forward_syn: Any,
        forward_real: Any,
        x_syn: Tensor,
        y_syn: Tensor,
        x_real: Tensor,
        y_real: Tensor,
    ) -> tuple[Tensor, dict[str, float]]:
        """Weighted term (lambda already applied) and its log scalars."""
        ...

    def zero_grad(self) -> None: ...

    def step(self) -> None: ...

    def parameters(self) -> list[Tensor]:
        """The term's own trainable tensors (heads); averaged over ranks under data parallelism."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def init_synthetic(
    dataset: Dataset, ipc: int, init: str, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Synthetic images (class-major: ipc images of class 0, then class 1, ...) and their labels."""
    dataset.class_index.check_ipc(ipc)
    c, h = dataset.channels, dataset.image_size
    labels = torch.arange(dataset.num_classes).repeat_interleave(ipc)
    if init == "real":
        images = torch.cat([dataset.class_index.sample(k, ipc, generator) for k in range(dataset.num_classes)])
    elif init == "noise":
        images = torch.randn(dataset.num_classes * ipc, c, h, h, generator=generator)
    else:
        raise ConfigError(f"Unknown init {init!r}; choose 'real' or 'noise'.")
    return images.clone().float(), labels


class DistillMethod:
    """Base class: synthetic images, RNG, optional term, and state save/restore."""

    name = "base"

    def __init__(
        self,
        dataset: Dataset,
        ipc: int,
        *,
        init: str = "real",
        device: str | torch.device = "cpu",
        seed: int = 0,
        term: AuxTerm | None = None,
        dist: Dist = SINGLE,
    ) -> None:
        self.dataset, self.ipc, self.device, self.seed = dataset, ipc, torch.device(device), seed
        self.dist = dist
        self.generator = torch.Generator().manual_seed(seed)
        images, labels = init_synthetic(dataset, ipc, init, self.generator)
        self.images = images.to(self.device).requires_grad_(True)
        self.labels = labels.to(self.device)
        self.term = term
        self.iteration = 0

    # -- shared helpers -------------------------------------------------------------------
    def sample_real(self, n_per_class: int, classes: list[int] | None = None) -> tuple[Tensor, Tensor]:
        """``n_per_class`` random real images of each class (all classes by default), on device."""
        classes = list(range(self.dataset.num_classes)) if classes is None else classes
        xs, ys = [], []
        for c in classes:
            x = self.dataset.class_index.sample(c, n_per_class, self.generator)
            xs.append(x)
            ys.append(torch.full((x.shape[0],), c, dtype=torch.int64))
        return torch.cat(xs).to(self.device), torch.cat(ys).to(self.device)

    def term_loss(self, model: nn.Module, forward_syn, forward_real, x_syn: Tensor, y_syn: Tensor,
                  augment=None) -> tuple[Tensor, dict[str, float]]:
        """The auxiliary term on (x_syn, y_syn) vs a fresh real batch; ``augment(x, seed)`` is DSA."""
        assert self.term is not None
        x_real, y_real = self.sample_real(self.term.n_real)
        if augment is not None:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator))
            x_syn, x_real = augment(x_syn, seed), augment(x_real, seed)
        return self.term.loss(model, forward_syn, forward_real, x_syn, y_syn, x_real, y_real)

    # -- data parallelism (every collective is a no-op on one process) --------------------------
    def owned_classes(self) -> set[int]:
        """Classes whose synthetic images this rank updates (round-robin; all of them on one process)."""
        return set(self.dist.owned(range(self.dataset.num_classes)))

    def _owned_rows(self) -> Tensor:
        """[N, 1, 1, 1] bool: rows of the (class-major) synthetic set that belong to this rank's classes."""
        owned = torch.tensor(sorted(self.owned_classes()), device=self.labels.device)
        return torch.isin(self.labels, owned).view(-1, 1, 1, 1)

    def gather_owned(self, local: Tensor, what: str) -> Tensor:
        """Every rank's own rows of ``local`` (shaped like the images) assembled on every rank (exact)."""
        if not self.dist.enabled:
            return local
        buf = torch.where(self._owned_rows(), local.detach(), torch.zeros((), dtype=local.dtype,
                                                                           device=local.device))
        return self.dist.all_reduce_(buf.contiguous(), what)

    def sync_owned_images(self) -> None:
        """After each rank stepped its own classes' images, give every rank all the new images."""
        if self.dist.enabled:
            with torch.no_grad():
                self.images.copy_(self.gather_owned(self.images, "exchanging the synthetic images"))

    def check_class_sharding(self) -> None:
        """Class-sharded methods (DC, DM) need at least one class per rank."""
        if self.dist.world_size > self.dataset.num_classes:
            raise ConfigError(f"{self.name.upper()} shards the classes over the ranks, but {self.dataset.num_classes} "
                              f"classes cannot feed {self.dist.world_size} ranks; use at most "
                              f"{self.dataset.num_classes} processes.")

    def average_term_grads(self, include_images: bool) -> None:
        """Every rank computed the same MIM term; averaging its gradients keeps the replicas identical
        even where GPU kernels are not bitwise deterministic (the mean of equal values is the value)."""
        if not self.dist.enabled or self.term is None:
            return
        tensors = list(self.term.parameters()) + ([self.images] if include_images else [])
        grads = [p.grad for p in tensors if p.grad is not None]
        self.dist.average_(grads, "averaging the MIM term's gradients")

    def synthetic_set(self) -> tuple[Tensor, Tensor]:
        """Detached copies of the synthetic images and labels (CPU)."""
        return self.images.detach().cpu().clone(), self.labels.detach().cpu().clone()

    # -- to implement ---------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        """One distillation iteration; returns float scalars (at least ``loss``)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically: images, optimizers, RNG, iteration, term."""
        state = {
            "images": self.images.detach().cpu().clone(),
            "labels": self.labels.cpu().clone(),
            "iteration": self.iteration,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        if self.term is not None:
            state["term"] = self.term.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"].to(self.device))
        self.labels = state["labels"].to(self.device)
        self.iteration = int(state["iteration"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if self.term is not None and "term" in state:
            self.term.load_state_dict(state["term"])

"""The one seam between a method's loop and data parallelism.

A method's loop asks its ``Shard`` which classes or minibatch rows are its own and hands it partial
results to combine. On one process every class and row is its own and every combine returns its input
unchanged, so the single-process loop reads top to bottom like the paper. Under torchrun:

* class-sharded methods (DC, DM) match and update only their own classes' images; ``share_rows``
  then gives every rank every class's new rows (each row comes from exactly one rank: exact);
* row-sharded methods (MTT) compute each student step on a contiguous share of its minibatch
  (``part``) and ``sum`` the partial gradients, so every rank walks the same unroll;
* replicated work (the MIM term: every rank computes the same value) is ``average``d, which keeps
  replicas identical even where GPU kernels are not bitwise deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..distributed import SINGLE, Dist
from ..errors import ConfigError

Part = tuple[int, int]  # [start, stop) positions of this rank's share of a minibatch


class Shard:
    """This process's share of a method's work, and how partial results combine."""

    def __init__(self, dist: Dist = SINGLE) -> None:
        self.dist = dist

    @property
    def enabled(self) -> bool:
        return self.dist.enabled

    # -- what is mine --------------------------------------------------------------------------
    def owns(self, c: int) -> bool:
        """True when class ``c`` is this rank's (round-robin; every class on one process)."""
        return c % self.dist.world_size == self.dist.rank

    def part(self, n: int) -> Part | None:
        """This rank's contiguous share of an n-item minibatch; None on one process (all of it)."""
        return self.dist.shard(n) if self.enabled else None

    def check_classes(self, num_classes: int, method: str) -> None:
        """Class-sharded methods need at least one class per rank."""
        if self.dist.world_size > num_classes:
            raise ConfigError(f"{method.upper()} shards the classes over the ranks, but {num_classes} classes "
                              f"cannot feed {self.dist.world_size} ranks; use at most {num_classes} processes.")

    # -- combining partial results ---------------------------------------------------------------
    def sum(self, t: Tensor, what: str) -> Tensor:
        """The sum of ``t`` over ranks (a new tensor); ``t`` itself on one process."""
        return self.dist.all_reduce_(t.detach().clone(), what) if self.enabled else t

    def average(self, tensors: Sequence[Tensor], what: str) -> None:
        """Replace each tensor by its mean over ranks, in place (nothing on one process)."""
        self.dist.average_([t for t in tensors if t is not None], what)

    def own_rows(self, local: Tensor, labels: Tensor, what: str) -> Tensor:
        """Every rank's own classes' rows of ``local`` (class-major like the images), on every rank."""
        if not self.enabled:
            return local
        mine = torch.tensor([c for c in range(int(labels.max()) + 1) if self.owns(c)], device=labels.device)
        rows = torch.isin(labels, mine).view(-1, *([1] * (local.dim() - 1)))
        buf = torch.where(rows, local.detach(), torch.zeros((), dtype=local.dtype, device=local.device))
        return self.dist.all_reduce_(buf.contiguous(), what)

    def share_rows(self, images: Tensor, labels: Tensor) -> None:
        """After each rank stepped its own classes' images, give every rank all the new rows (in place)."""
        if self.enabled:
            with torch.no_grad():
                images.copy_(self.own_rows(images, labels, "exchanging the synthetic images"))

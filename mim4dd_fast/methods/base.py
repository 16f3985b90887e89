"""The method interface every distillation method implements, and what they share.

A method owns the synthetic images (and any learnable extras such as MTT's step size) and exposes
``step()``: one distillation iteration returning a dict of float scalars. An optional auxiliary
``term`` (the MIM4DD mutual-information term) attaches to any method through one mechanism,
``add_term_gradient``, which the method calls once per iteration with the network it runs.
Data parallelism stays behind ``self.shard`` (methods/shard.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..config import Validated
from ..data import Dataset
from ..distributed import SINGLE, Dist
from ..errors import ConfigError, NonFiniteError
from ..models import build_model, default_depth
from .shard import Shard


class AuxTerm(Protocol):
    """An extra loss added to a method's own loss (implemented by ``methods.mim.MIMTerm``)."""

    n_real: int  # real images per class the term needs each iteration

    def __call__(self, model: nn.Module, x_syn: Tensor, y_syn: Tensor, x_real: Tensor, y_real: Tensor, *,
                 forward_syn: Any = None, forward_real: Any = None) -> tuple[Tensor, dict[str, float]]:
        """The weighted term for the images' backward (its own parameters are trained in the call)."""
        ...

    def parameters(self) -> list[Tensor]: ...

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


class ConvNetSettings(Validated):
    """Base of method configs with ``width`` and ``depth`` fields: the ConvNet the method distils with."""

    width: int
    depth: int | None

    def model_kwargs(self, dataset: Dataset) -> dict[str, Any]:
        """ConvNet kwargs with the depth resolved (None = the dataset's default depth)."""
        depth = default_depth(dataset.image_size) if self.depth is None else self.depth
        return {"width": self.width, "depth": depth}


@contextmanager
def frozen(model: nn.Module):
    """The model's parameters need no gradient inside (the term trains its heads and the images only)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


class DistillMethod:
    """Base class: synthetic images, settings, RNG, optional term, the shard, and state save/restore."""

    name = "base"

    def __init__(
        self,
        dataset: Dataset,
        ipc: int,
        config: Any,
        *,
        init: str = "real",
        device: str | torch.device = "cpu",
        seed: int = 0,
        term: AuxTerm | None = None,
        dist: Dist = SINGLE,
    ) -> None:
        self.dataset, self.ipc, self.config = dataset, ipc, config
        self.device, self.seed = torch.device(device), seed
        self.shard = Shard(dist)
        self.generator = torch.Generator().manual_seed(seed)
        images, labels = init_synthetic(dataset, ipc, init, self.generator)
        self.images = images.to(self.device).requires_grad_(True)
        self.labels = labels.to(self.device)
        self.term = term
        self.iteration = 0

    # -- shared helpers -------------------------------------------------------------------
    def draw_seed(self) -> int:
        """A seed from the method's own generator (DSA, fresh networks): resumes reproduce it."""
        return int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator))

    def sample_real(self, n_per_class: int, classes: list[int] | None = None) -> tuple[Tensor, Tensor]:
        """``n_per_class`` random real images of each class (all classes by default), on device."""
        classes = list(range(self.dataset.num_classes)) if classes is None else classes
        xs, ys = [], []
        for c in classes:
            x = self.dataset.class_index.sample(c, n_per_class, self.generator)
            xs.append(x)
            ys.append(torch.full((x.shape[0],), c, dtype=torch.int64))
        return torch.cat(xs).to(self.device), torch.cat(ys).to(self.device)

    def network_template(self) -> nn.Module:
        """A network of the architecture the method distils with (layer names and widths for the term);
        built without touching anyone's random stream."""
        d = self.dataset
        with torch.random.fork_rng(devices=[]):
            return build_model(d.channels, d.num_classes, d.image_size, **self.config.model_kwargs(d))

    def add_term_gradient(self, model: nn.Module, forward_syn=None, forward_real=None,
                          augment=None) -> dict[str, float]:
        """The one place where a method's iteration meets the auxiliary term.

        Draws a fresh real batch (``term.n_real`` per class), applies the same DSA draw to both sides
        when ``augment(x, seed)`` is given, evaluates the term on ``model`` (whose own parameters stay
        untouched; ``forward_syn``/``forward_real`` run it, e.g. from MTT's flat parameter vectors) and
        adds its image gradient to ``images.grad``. Every rank computes the same term, so its image
        gradient is averaged over ranks. Returns the term's log scalars ({} without a term).
        """
        if self.term is None:
            return {}
        x_real, y_real = self.sample_real(self.term.n_real)
        x_syn = self.images
        if augment is not None:
            seed = self.draw_seed()
            x_syn, x_real = augment(x_syn, seed), augment(x_real, seed)
        with frozen(model):
            loss, logs = self.term(model, x_syn, self.labels, x_real, y_real, forward_syn=forward_syn or model,
                                   forward_real=forward_real or model)
            if not bool(torch.isfinite(loss.detach()).all()):
                raise NonFiniteError(f"The MIM term became non-finite at iteration {self.iteration + 1}; lower its "
                                     "weight lambda or the images' learning rate lr_img.")
            if not loss.requires_grad:  # lambda = 0: the term only trained its heads
                return dict(logs)
            (grad,) = torch.autograd.grad(loss, self.images)
        self.shard.average([grad], "averaging the MIM term's image gradient")
        self.images.grad = grad if self.images.grad is None else self.images.grad + grad
        return dict(logs)

    def learned_lr(self) -> float | None:
        """The student learning rate the method learned (evaluation trains with it); None if it learns none."""
        return None

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

"""MTT: dataset distillation by matching training trajectories (Cazenavette et al., CVPR 2022).

One iteration: pick an expert trajectory and a start epoch t < max_start_epoch, start a student at
the expert's parameters theta*_t, train it ``syn_steps`` SGD steps on (DSA-augmented) minibatches of
the synthetic set with a learnable step size ``syn_lr``, and minimise

    ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2

with respect to the images and ``syn_lr`` (SGD, momentum 0.5, as the original).

The gradient flows back through the whole unroll. Two exact ways to get it (``auto``, the default,
picks ``full`` for a single process when the full graph is estimated under ``AUTO_FULL_MAX_BYTES``,
where the checkpointed unroll's recomputation would be pure overhead, and ``checkpointed`` otherwise):

* ``full`` (the original): keep every step's graph (``create_graph=True``) and backpropagate once.
  Memory grows linearly with syn_steps x images per step.
* ``checkpointed``: run the unroll without a graph, storing only theta_k (one flat vector
  per step) and each step's minibatch indices and DSA seed; then walk back one step at a time,
  recomputing step k's gradient g_k with a graph and applying the adjoint recursion of
  theta_{k+1} = theta_k - lr * g_k(theta_k, X):

      dL/dX  += -lr * (dg_k/dX)^T a_{k+1}
      dL/dlr += -<a_{k+1}, g_k>
      a_k     = a_{k+1} - lr * (dg_k/dtheta_k)^T a_{k+1}        (a vector-Hessian product)

  Only one step's graph is alive at a time, so activation memory is flat in syn_steps (the last
  step's graph is kept from the forward pass rather than recomputed); a recomputed step is walked in
  cache-sized chunks of its minibatch (``models.chunks``), one chunk's graph alive at a time. This is the exact gradient
  (equal to ``full`` up to rounding), not TESLA's approximation.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import require
from ..data import Dataset
from ..distributed import SINGLE, Dist
from ..errors import ConfigError, NonFiniteError
from ..experts import epochs_needed
from ..models import build_model, chunks, functional_forward
from ..precision import autocast
from ..precision import check as check_precision
from .base import AuxTerm, ConvNetSettings, DistillMethod
from .shard import Part, Shard
from .spec import ExpertPlan, MethodSpec

Batch = tuple[Tensor, "int | None"]  # (indices into the synthetic set, DSA seed or None)


@dataclass
class MTTConfig(ConvNetSettings):
    """MTT settings; names and defaults follow the original ``distill.py`` (see docs for presets)."""

    syn_steps: int = 20  # N: student SGD steps per iteration
    expert_epochs: int = 2  # M: the target is the expert M epochs after the start
    max_start_epoch: int = 20  # start epochs are drawn uniformly from [0, max_start_epoch)
    lr_img: float = 1000.0  # SGD learning rate of the pixels
    lr_lr: float = 1e-5  # SGD learning rate of the learnable student step size
    lr_teacher: float = 0.01  # initial student step size (syn_lr)
    batch_syn: int | None = None  # synthetic images per student step; None = all of them
    dsa: bool = True  # DSA on every student step (and siamese DSA for the MIM term)
    unroll: str = "auto"  # "checkpointed" (exact, memory flat in syn_steps), "full", or "auto" (see module doc)
    momentum: float = 0.5  # momentum of both outer optimizers
    width: int = 128  # ConvNet width (must match the experts)
    depth: int | None = None  # ConvNet depth; None = the dataset's default depth
    precision: str = "fp32"  # "bf16": the student unroll under bfloat16 autocast (mim4dd_fast.precision)

    def validate(self) -> None:
        check_precision(self.precision, "MTT")
        require(self.syn_steps >= 1, f"syn_steps must be at least 1, got {self.syn_steps}.")
        require(self.expert_epochs >= 1, f"expert_epochs must be at least 1, got {self.expert_epochs}.")
        require(self.max_start_epoch >= 1, f"max_start_epoch must be at least 1, got {self.max_start_epoch}.")
        for name in ("lr_img", "lr_lr", "lr_teacher"):
            require(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}.")
        require(self.batch_syn is None or self.batch_syn >= 1,
                f"batch_syn must be at least 1 (or unset for all images), got {self.batch_syn}.")
        require(self.unroll in ("auto", "checkpointed", "full"),
                f"unroll must be 'auto', 'checkpointed' or 'full', got {self.unroll!r}.")
        require(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}.")
        require(self.width >= 1, f"width must be at least 1, got {self.width}.")
        require(self.depth is None or self.depth >= 1, f"depth must be at least 1, got {self.depth}.")


# -- the unroll ------------------------------------------------------------------------------------


def augment_step(x: Tensor, seed: int | None, rows: Tensor | None = None, full_batch: int | None = None) -> Tensor:
    """DSA of one student step: per-image parameters from a generator seeded with ``seed``.

    Per-image parameters match the original's inner loop; the seed makes the step reproducible, so
    the checkpointed backward pass recomputes exactly the same augmentation. ``rows``/``full_batch``:
    ``x`` is a data-parallel shard of the step's minibatch, augmented as inside the full minibatch.
    """
    if seed is None:
        return x
    from ..augment import dsa

    return dsa(x, generator=torch.Generator().manual_seed(int(seed)), rows=rows, full_batch=full_batch)


def _chunk_losses(model: nn.Module, theta: Tensor, images: Tensor, labels: Tensor, batch: Batch,
                  part: Part | None = None, precision: str = "fp32") -> Iterator[Tensor]:
    """Step k's loss CE(student(theta; aug(X[idx])), y[idx]) in parts that sum to it, one at a time.

    The parts are cache-sized chunks of the minibatch (``models.chunks``; one chunk for a small
    minibatch or on GPU), each its summed cross-entropy divided by the full minibatch size, augmented
    exactly as inside the full minibatch. With ``part`` (data parallel), only that share of the minibatch
    is chunked; the ranks' parts sum to the full loss. ``precision`` "bf16": the forward under bfloat16
    autocast (the loss itself is float32, the backward passes follow the forward's dtypes).
    """
    idx, seed = batch
    n = idx.numel()
    start, stop = part if part is not None else (0, n)
    sub = idx[start:stop]
    for a, b in chunks(model, images, rows=stop - start):
        x = images[sub[a:b]]  # indexed per chunk: no graph node shared by the chunks
        if part is None and (a, b) == (0, n):
            x = augment_step(x, seed)
        else:
            x = augment_step(x, seed, rows=torch.arange(start + a, start + b), full_batch=n)
        with autocast(precision, x.device):
            loss = F.cross_entropy(functional_forward(model, theta, x), labels[sub[a:b]], reduction="sum")
        yield loss / n  # cross-entropy is float32 under autocast


def _step_grad(model: nn.Module, theta: Tensor, images: Tensor, labels: Tensor, batch: Batch,
               create_graph: bool, part: Part | None = None, precision: str = "fp32") -> Tensor:
    """g_k = d CE(student(theta; aug(X[idx])), y[idx]) / d theta, summed over ``_chunk_losses``.

    With ``part``, only that share of the minibatch contributes (the ranks' g_k parts sum to g_k).
    """
    g: Tensor | None = None
    for loss in _chunk_losses(model, theta, images, labels, batch, part, precision):
        gc = torch.autograd.grad(loss, theta, create_graph=create_graph)[0]
        g = gc if g is None else (g + gc if create_graph else g.add_(gc))
    assert g is not None
    return g


def match_loss(theta_n: Tensor, start: Tensor, target: Tensor) -> Tensor:
    """||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2 (the original's ratio)."""
    return (theta_n - target).pow(2).sum() / (start - target).pow(2).sum()


def unroll_full(model: nn.Module, start: Tensor, target: Tensor, images: Tensor, labels: Tensor,
                syn_lr: Tensor, batches: list[Batch], shard: Shard | None = None,
                precision: str = "fp32") -> tuple[Tensor, Tensor, Tensor]:
    """The original: one graph over all steps. Returns (loss, dL/dimages, dL/dsyn_lr).

    One process only (``shard`` is accepted for a uniform signature; data-parallel MTT is checkpointed).
    """
    with torch.enable_grad():
        theta = start.detach().requires_grad_(True)
        for batch in batches:
            theta = theta - syn_lr * _step_grad(model, theta, images, labels, batch, create_graph=True,
                                                precision=precision)
        loss = match_loss(theta, start, target)
        g_img, g_lr = torch.autograd.grad(loss, [images, syn_lr], allow_unused=True)
    g_img = torch.zeros_like(images) if g_img is None else g_img
    g_lr = torch.zeros_like(syn_lr) if g_lr is None else g_lr
    return loss.detach(), g_img, g_lr


def unroll_checkpointed(model: nn.Module, start: Tensor, target: Tensor, images: Tensor, labels: Tensor,
                        syn_lr: Tensor, batches: list[Batch], shard: Shard | None = None, precision: str = "fp32"
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """Exact gradient with one step's graph alive at a time (see the module docstring).

    Data-parallel (``shard`` of N > 1 ranks): each rank computes g_k, and in the backward pass
    (dg_k/dtheta)^T a and (dg_k/dX)^T a, on its share of step k's minibatch only. g_k and the
    vector-Hessian product are summed over ranks every step (two all-reduces of P floats), so every
    rank walks the same theta_k and adjoint a_k; the image and step-size gradients are summed once at
    the end. The result equals the single-process one up to float rounding.
    """
    shard = shard or Shard()
    n = len(batches)
    parts = [shard.part(idx.numel()) for idx, _ in batches]
    lr = syn_lr.detach()
    x = images.detach().requires_grad_(True)
    # theta_0 .. theta_{N-1} in ONE buffer: many long-lived per-step vectors interleaved with each
    # step's short-lived activations fragment the heap and the process RSS grows with syn_steps.
    thetas = torch.empty((n, start.numel()), dtype=start.dtype, device=start.device)
    thetas[0] = start.detach()
    with torch.enable_grad():
        for k, batch in enumerate(batches):  # forward: store theta_k only
            theta = thetas[k].detach().requires_grad_(True)
            last = k == n - 1  # the last step keeps its graph: the backward pass starts with it
            g = _step_grad(model, theta, x, labels, batch, create_graph=last, part=parts[k], precision=precision)
            theta_n = theta.detach() - lr * shard.sum(g.detach(), "the unroll's gradient sum")
            if not last:
                thetas[k + 1] = theta_n
        theta_n.requires_grad_(True)
        loss = match_loss(theta_n, start, target)
        (adj,) = torch.autograd.grad(loss, theta_n)
        g_img = torch.zeros_like(x)
        g_lr = torch.zeros((), dtype=lr.dtype, device=lr.device)
        for k in range(n - 1, -1, -1):  # backward: one step at a time, newest first
            if k == n - 1:  # the last step's graph is still alive
                g_lr -= torch.dot(adj, g.detach())
                h_theta, h_x = torch.autograd.grad(g, [theta, x], grad_outputs=adj)
                g = None
            else:  # recompute step k chunk by chunk: one chunk's graph alive at a time
                theta = thetas[k].detach().requires_grad_(True)
                h_theta = torch.zeros_like(adj)
                h_x = torch.zeros_like(x)
                for part_loss in _chunk_losses(model, theta, x, labels, batches[k], parts[k], precision):
                    gc = torch.autograd.grad(part_loss, theta, create_graph=True)[0]
                    g_lr -= torch.dot(adj, gc.detach())
                    ht, hx = torch.autograd.grad(gc, [theta, x], grad_outputs=adj)
                    h_theta += ht
                    h_x += hx
                    gc = ht = hx = None
            g_img -= lr * h_x
            adj = adj - lr * shard.sum(h_theta, "the unroll's adjoint sum")
            h_theta = h_x = None
    if shard.enabled:  # the image and step-size gradients: one all-reduce for both
        flat = shard.sum(torch.cat([g_img.reshape(-1), g_lr.reshape(1)]), "the image gradient sum")
        g_img, g_lr = flat[:-1].view_as(g_img), flat[-1]
    return loss.detach(), g_img, g_lr.reshape(syn_lr.shape)


UNROLLS = {"full": unroll_full, "checkpointed": unroll_checkpointed}

# ``unroll = "auto"`` keeps the full graph up to this estimate: small problems (the digits presets: a few
# MiB) skip the checkpointed unroll's recomputation (a quarter of a digits iteration), while any
# CIFAR-sized one (hundreds of MiB) keeps memory flat in syn_steps.
AUTO_FULL_MAX_BYTES = 64 * 2**20
# Bytes the full unroll keeps per image and step, in units of the model's largest activation per image:
# measured 6.2 at CIFAR shapes (bench/baselines.py mtt1_s10_full: 311.6 MiB for 10 steps x 10 images of
# 0.5 MiB); 8 leaves a margin.
FULL_BYTES_PER_ACTIVATION = 8


def full_unroll_bytes(model: nn.Module, syn_steps: int, images_per_step: int, element_size: int = 4) -> int | None:
    """Estimated bytes the full unroll's graph holds (None: the model does not declare its activation size)."""
    per_image = getattr(model, "activation_numel", None)
    if per_image is None:
        return None
    return syn_steps * images_per_step * FULL_BYTES_PER_ACTIVATION * per_image() * element_size


def choose_unroll(setting: str, model: nn.Module, syn_steps: int, images_per_step: int, world_size: int) -> str:
    """The unroll a setting means here: ``auto`` -> ``full`` for one process and a small graph, else checkpointed."""
    if setting != "auto":
        return setting
    if world_size > 1:
        return "checkpointed"  # data-parallel MTT shards the checkpointed unroll
    est = full_unroll_bytes(model, syn_steps, images_per_step)
    return "full" if est is not None and est <= AUTO_FULL_MAX_BYTES else "checkpointed"


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all())


# -- the method -------------------------------------------------------------------------------------


class MTT(DistillMethod):
    """Trajectory matching over a list of expert trajectories ([epochs + 1, P] each, on CPU)."""

    name = "mtt"

    def __init__(
        self,
        dataset: Dataset,
        ipc: int,
        config: MTTConfig | None = None,
        *,
        experts: list[Tensor],
        init: str = "real",
        device: str | torch.device = "cpu",
        seed: int = 0,
        term: AuxTerm | None = None,
        dist: Dist = SINGLE,
    ) -> None:
        super().__init__(dataset, ipc, config or MTTConfig(), init=init, device=device, seed=seed, term=term,
                         dist=dist)
        cfg = self.config
        self._check_data_parallel()
        kwargs = cfg.model_kwargs(dataset)
        self.model = build_model(dataset.channels, dataset.num_classes, dataset.image_size, **kwargs)
        self.model = self.model.to(self.device).requires_grad_(False)  # weights come from the flat vectors
        self.experts = self._check_experts(experts, kwargs)
        self.unroll = choose_unroll(cfg.unroll, self.model, cfg.syn_steps, self._images_per_step(),
                                    self.shard.dist.world_size)
        self.syn_lr = torch.tensor(cfg.lr_teacher, dtype=self.images.dtype, device=self.device).requires_grad_(True)
        self.opt_img = torch.optim.SGD([self.images], lr=cfg.lr_img, momentum=cfg.momentum)
        self.opt_lr = torch.optim.SGD([self.syn_lr], lr=cfg.lr_lr, momentum=cfg.momentum)
        self._good = self._snapshot()

    def _check_data_parallel(self) -> None:
        """Data-parallel MTT shards each student step's minibatch: every rank needs at least one image."""
        world = self.shard.dist.world_size
        if world == 1:
            return
        if self.config.unroll == "full":
            raise ConfigError(f"Data-parallel MTT ({world} processes) needs unroll = 'checkpointed', got "
                              f"{self.config.unroll!r}.")
        per_step = self._images_per_step()
        if per_step < world:
            raise ConfigError(f"Data-parallel MTT splits each student step's {per_step} synthetic images over "
                              f"{world} processes; use at most {per_step} processes or a larger batch_syn.")

    def _check_experts(self, experts: list[Tensor], kwargs: dict[str, Any]) -> list[Tensor]:
        if not experts:
            raise ConfigError("MTT needs at least one expert trajectory; train experts first (mim4dd-fast experts).")
        n_params = sum(p.numel() for p in self.model.parameters())
        need = epochs_needed(self.config)
        for traj in experts:
            if traj.dim() != 2:
                raise ConfigError(f"Expert trajectories must be [epochs + 1, parameters] matrices, got shape "
                                  f"{list(traj.shape)}; use experts written by mim4dd-fast experts.")
            if traj.shape[1] != n_params:
                raise ConfigError(
                    f"Expert trajectories hold {traj.shape[-1]} parameters but a ConvNet of width {kwargs['width']} "
                    f"and depth {kwargs['depth']} has {n_params}; use experts trained with the same model."
                )
            if traj.shape[0] - 1 < need:
                raise ConfigError(
                    f"Expert trajectories cover {traj.shape[0] - 1} epochs but max_start_epoch - 1 + expert_epochs "
                    f"= {need} are needed; train longer experts or lower max_start_epoch."
                )
        return [t.detach().cpu() for t in experts]

    # -- helpers ------------------------------------------------------------------------------
    def _images_per_step(self) -> int:
        """Synthetic images in each student step's minibatch (``batch_syn``, at most all of them)."""
        return min(self.config.batch_syn or self.images.shape[0], self.images.shape[0])

    def _plan(self) -> list[Batch]:
        """Minibatch indices (the original's shuffled chunks) and one DSA seed per student step."""
        n = self.images.shape[0]
        size = self._images_per_step()
        chunks: list[Tensor] = []
        batches: list[Batch] = []
        for _ in range(self.config.syn_steps):
            if not chunks:
                chunks = list(torch.randperm(n, generator=self.generator).split(size))
            idx = chunks.pop(0).to(self.device)
            seed = self.draw_seed() if self.config.dsa else None
            batches.append((idx, seed))
        return batches

    def _snapshot(self) -> dict[str, Any]:
        return {
            "images": self.images.detach().clone(),
            "syn_lr": self.syn_lr.detach().clone(),
            "opt_img": copy.deepcopy(self.opt_img.state_dict()),
            "opt_lr": copy.deepcopy(self.opt_lr.state_dict()),
            "iteration": self.iteration,
        }

    def _restore(self, snap: dict[str, Any]) -> None:
        with torch.no_grad():
            self.images.copy_(snap["images"])
            self.syn_lr.copy_(snap["syn_lr"])
        self.opt_img.load_state_dict(copy.deepcopy(snap["opt_img"]))
        self.opt_lr.load_state_dict(copy.deepcopy(snap["opt_lr"]))
        self.iteration = snap["iteration"]

    def _diverged(self, snap: dict[str, Any], what: str, blame_lr: bool) -> NonFiniteError:
        self._restore(snap)
        cfg = self.config
        hint = f"lower lr_lr (now {cfg.lr_lr:g})" if blame_lr else f"lower lr_img (now {cfg.lr_img:g})"
        return NonFiniteError(
            f"MTT produced a non-finite {what} at iteration {self.iteration + 1}; the last good synthetic images "
            f"were restored, {hint}."
        )

    # -- the iteration ------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        cfg = self.config
        at_start = self._snapshot()
        e = int(torch.randint(len(self.experts), (1,), generator=self.generator))
        t = int(torch.randint(cfg.max_start_epoch, (1,), generator=self.generator))
        traj = self.experts[e]
        # A copy, not a view: a view would make the unroll's graph hold the whole trajectory buffer alive.
        start = traj[t].to(self.device, self.images.dtype, copy=True)
        target = traj[t + cfg.expert_epochs].to(self.device, self.images.dtype)
        loss, g_img, g_lr = UNROLLS[self.unroll](self.model, start, target, self.images, self.labels, self.syn_lr,
                                                self._plan(), shard=self.shard, precision=cfg.precision)
        if not math.isfinite(float(loss)):
            raise self._diverged(self._good, "loss", blame_lr=not _finite(self.syn_lr.detach()))
        self.opt_img.zero_grad(set_to_none=True)
        self.opt_lr.zero_grad(set_to_none=True)
        self.images.grad, self.syn_lr.grad = g_img, g_lr
        real_theta = target if self.term is not None and self.term.config.real_side == "target" else start
        try:
            logs = self.add_term_gradient(self.model, partial(functional_forward, self.model, start),
                                          partial(functional_forward, self.model, real_theta),
                                          augment=_siamese_dsa if cfg.dsa else None)
        except NonFiniteError:
            raise self._diverged(self._good, "loss", blame_lr=False) from None
        self._good = at_start  # these images gave a finite loss
        if not (_finite(self.images.grad) and _finite(self.syn_lr.grad)):
            raise self._diverged(at_start, "gradient", blame_lr=not _finite(self.syn_lr.grad))
        self.opt_img.step()
        self.opt_lr.step()
        if not (_finite(self.images.detach()) and _finite(self.syn_lr.detach())):
            raise self._diverged(at_start, "update", blame_lr=not _finite(self.syn_lr.detach()))
        self.iteration += 1
        return {"loss": float(loss), "syn_lr": self.learned_lr(), "start_epoch": float(t), **logs}

    # -- outputs and state --------------------------------------------------------------------
    def learned_lr(self) -> float:
        """The learned student step size (evaluation trains fresh nets with it, as the original)."""
        return float(self.syn_lr.detach())

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["syn_lr"] = self.syn_lr.detach().cpu().clone()
        state["opt_img"] = copy.deepcopy(self.opt_img.state_dict())
        state["opt_lr"] = copy.deepcopy(self.opt_lr.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            self.syn_lr.copy_(state["syn_lr"].to(self.device))
        self.opt_img.load_state_dict(state["opt_img"])
        self.opt_lr.load_state_dict(state["opt_lr"])
        self._good = self._snapshot()


def _siamese_dsa(x: Tensor, seed: int) -> Tensor:
    from ..augment import dsa

    return dsa(x, seed=seed)


def _expert_plan(config: MTTConfig, dataset: Dataset) -> ExpertPlan:
    # The run's expert_epochs setting may ask for longer trajectories; this is the least MTT can use.
    return ExpertPlan(epochs=config.max_start_epoch + config.expert_epochs, model_kwargs=config.model_kwargs(dataset))


SPEC = MethodSpec(name="mtt", config_class=MTTConfig, build=MTT, expert_plan=_expert_plan, learns_step_size=True,
                  preset_prefix="mtt", aliases={"mim4dd": "mtt+mim"},
                  # lambda = 3: the study's choice on validation (docs/results.md section 2, lambda)
                  mim_defaults={"lam": 3.0},
                  summary="trajectory matching (Cazenavette et al., CVPR 2022); mim4dd = mtt+mim (the paper)")

"""The MIM4DD term: a layer-wise contrastive estimate of I(real; synthetic), added to any method.

For each tapped layer k (shallow to deep) the pooled feature f_k (FeatureTap) of the synthetic and
of a fresh real batch is embedded by a head g_k, and the contrastive loss (docs/method.md) compares
synthetic anchors with real keys (positive pair = same label). The term is

    lambda * sum_k beta_k * contrastive_loss(g_k(f_k(x_syn)), g_k'(f_k(x_real)), y_syn, y_real)

where g_k' = g_k ("shared" heads) or a second head ("separate"). The real side runs the network
under ``torch.no_grad()``: real features are constants, only the heads see gradients from them.
Every choice the paper leaves open is a field of ``MIMConfig`` (defaults and reasons in
docs/method.md).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import Validated, require
from ..distributed import SINGLE, Dist
from ..errors import ConfigError
from ..hooks import FeatureTap, resolve_layers
from ..kernels import contrastive_loss
from ..kernels.contrastive import IMPLS as CONTRASTIVE_IMPLS
from .shard import Shard

FEATURE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_CHOICES = {
    "critic": ("infonce", "nce"),
    "feature_dtype": tuple(FEATURE_DTYPES),
    "head": ("identity", "linear", "mlp"),
    "head_sharing": ("shared", "separate"),
    "head_train": ("joint", "frozen"),
    "head_optimizer": ("adam", "sgd"),
    "beta": ("uniform", "geometric", "list"),
    "real_side": ("start", "target"),
    "impl": CONTRASTIVE_IMPLS,
    "tap": ("fused", "naive"),
}


@dataclass
class MIMConfig(Validated):
    """Settings of the MIM4DD term (see docs/method.md for why each default)."""

    lam: float = 0.1  # lambda: weight of the term next to the method's own loss
    tau: float = 0.1  # temperature of the normalised similarity
    critic: str = "infonce"  # "infonce" | "nce" (binary NCE, sigmoid critic)
    noise_ratio: float = 1.0  # k of the NCE critic
    neg_weight: float = 1.0  # weight of the negative part of the NCE critic
    layers: list[str] | None = None  # layers to tap; None = every block output of the ConvNet
    pool: int = 2  # features are adaptive-average-pooled to pool x pool before the heads
    feature_dtype: str = "float32"  # dtype the tap stores features in ("float32" | "bfloat16")
    head: str = "linear"  # "identity" | "linear" | "mlp" (Linear-ReLU-Linear)
    head_width: int = 128  # output (and mlp hidden) width of the heads
    head_sharing: str = "shared"  # "shared" | "separate" (a second set of heads for the real side)
    head_train: str = "joint"  # "joint" (own optimizer) | "frozen" (random init, no training)
    head_optimizer: str = "adam"  # "adam" | "sgd" (momentum 0.9)
    lr_head: float = 1e-3
    beta: str = "uniform"  # "uniform" | "geometric" | "list" (beta_list)
    beta_value: float = 0.5  # geometric ratio: beta_k ~ beta_value^(K-k), < 1 favours deep layers
    beta_list: list[float] | None = None  # explicit layer weights, normalised to sum 1
    n_real: int = 32  # real images per class drawn each iteration for the term
    symmetric: bool = False  # also real anchors vs synthetic keys (mean of both directions)
    real_side: str = "start"  # MTT only: real features at the student ("start") or expert target
    impl: str = "auto"  # contrastive_loss implementation
    real_chunk: int = 128  # real images per forward pass of the real side (bounds peak memory)
    tap: str = "fused"  # "fused": keep only pooled features; "naive": keep full maps (for comparison)
    seed: int | None = None  # head initialisation seed; None = the run's seed (never touches the global RNG)

    def validate(self) -> None:
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            require(value in choices, f"Unknown MIM {name} {value!r}; choose one of: {', '.join(choices)}.")
        for name in ("lam", "tau", "noise_ratio", "neg_weight", "lr_head", "beta_value"):
            require(math.isfinite(float(getattr(self, name))), f"MIM {name} must be a finite number.")
        require(self.lam >= 0, f"MIM lam (lambda) must be at least 0, got {self.lam}.")
        require(self.tau > 0, f"MIM tau must be greater than 0, got {self.tau}.")
        require(self.noise_ratio > 0, f"MIM noise_ratio must be greater than 0, got {self.noise_ratio}.")
        require(self.neg_weight >= 0, f"MIM neg_weight must be at least 0, got {self.neg_weight}.")
        require(self.lr_head > 0, f"MIM lr_head must be greater than 0, got {self.lr_head}.")
        require(self.beta_value > 0, f"MIM beta_value must be greater than 0, got {self.beta_value}.")
        require(self.pool >= 1, f"MIM pool must be at least 1, got {self.pool}.")
        require(self.head_width >= 1, f"MIM head_width must be at least 1, got {self.head_width}.")
        require(self.n_real >= 1, f"MIM n_real must be at least 1, got {self.n_real}.")
        require(self.real_chunk >= 1, f"MIM real_chunk must be at least 1, got {self.real_chunk}.")
        if self.layers is not None:
            require(len(self.layers) > 0, "MIM layers must name at least one layer (or be left unset for all).")
        if self.beta_list is not None:
            require(self.beta in ("uniform", "list"),
                    f"MIM beta {self.beta!r} conflicts with an explicit beta_list; set beta to 'list'.")
            require(all(math.isfinite(b) and b >= 0 for b in self.beta_list),
                    "MIM beta_list entries must be finite and at least 0.")
            require(sum(self.beta_list) > 0, "MIM beta_list must have a positive sum.")
            if self.layers is not None:
                require(len(self.beta_list) == len(self.layers),
                        f"MIM beta_list has {len(self.beta_list)} entries but {len(self.layers)} layers are tapped.")
        else:
            require(self.beta != "list", "MIM beta 'list' needs beta_list, one weight per tapped layer.")


def beta_weights(n_layers: int, beta: str = "uniform", beta_value: float = 0.5,
                 beta_list: list[float] | None = None) -> list[float]:
    """Layer weights beta_1..beta_K (shallow to deep), normalised to sum 1."""
    if beta_list is not None:
        if len(beta_list) != n_layers:
            raise ConfigError(f"MIM beta_list has {len(beta_list)} entries but {n_layers} layers are tapped.")
        raw = [float(b) for b in beta_list]
    elif beta == "uniform":
        raw = [1.0] * n_layers
    elif beta == "geometric":
        raw = [float(beta_value) ** (n_layers - k) for k in range(1, n_layers + 1)]
    else:
        raise ConfigError(f"Unknown MIM beta {beta!r}; choose uniform, geometric or list (with beta_list).")
    total = sum(raw)
    if not (total > 0 and math.isfinite(total)):
        raise ConfigError("MIM layer weights must have a positive, finite sum.")
    return [b / total for b in raw]


def build_head(kind: str, in_dim: int, width: int) -> nn.Module:
    """A projection head g_phi: identity, linear (in -> width) or mlp (in -> width -> ReLU -> width)."""
    if kind == "identity":
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(in_dim, width)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Linear(width, width))
    raise ConfigError(f"Unknown MIM head {kind!r}; choose identity, linear or mlp.")


class MIMTerm:
    """The MIM4DD term (implements ``methods.base.AuxTerm``): also a plug-in for anyone's training loop.

    ``MIMTerm(config, model, num_classes)``: ``model`` is the network the features come from (for our
    methods a template of the ConvNet they run: layer names and feature widths). Any ``nn.Module``
    works when ``config.layers`` names the modules to tap; heads are then built at the first call,
    from the widths of the pooled features (``[B, C*pool*pool]`` for conv maps, ``[B, D]`` otherwise).

    ``term(model, x_syn, y_syn, x_real, y_real)`` returns ``(loss, logs)``: ``loss`` is the weighted term
    for the caller's backward (its graph reaches ``x_syn`` through the model, not the heads) and the
    heads have already taken their optimizer step (averaged over ranks under torchrun).
    """

    def __init__(self, config: MIMConfig, model: nn.Module, num_classes: int,
                 device: str | torch.device = "cpu", dist: Dist = SINGLE, seed: int = 0) -> None:
        self.config = config
        self.head_seed = seed if config.seed is None else config.seed  # the run's seed unless pinned
        self.num_classes = num_classes
        self.device = torch.device(device)
        self.shard = Shard(dist)
        self.layers = resolve_layers(model, config.layers)
        self.beta = beta_weights(len(self.layers), config.beta, config.beta_value, config.beta_list)
        self.n_real = config.n_real
        self.feature_dtype = FEATURE_DTYPES[config.feature_dtype]
        self.heads = self.heads_real = self.head_modules = None
        self.optimizer: torch.optim.Optimizer | None = None
        shapes = getattr(model, "layer_shapes", None)
        if shapes is not None:  # a ConvNet knows its widths: build the heads now
            shapes = shapes()
            self._build_heads([shapes[name][0] * config.pool * config.pool for name in self.layers])

    def _build_heads(self, dims: list[int]) -> None:
        config = self.config
        self.dims = list(dims)  # input width of each layer's head
        n_sets = 2 if config.head_sharing == "separate" else 1
        # Heads are initialised from their own seed so adding the term does not shift the
        # method's random stream (fork_rng restores the global CPU RNG afterwards).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.head_seed)
            sets = [nn.ModuleList([build_head(config.head, d, config.head_width) for d in dims])
                    for _ in range(n_sets)]
        self.heads = sets[0].to(self.device)
        self.heads_real = sets[1].to(self.device) if n_sets == 2 else self.heads
        self.head_modules = nn.ModuleList(sets).to(self.device)
        params = list(self.head_modules.parameters())
        if config.head_train == "frozen":
            for p in params:
                p.requires_grad_(False)
        elif params:
            if config.head_optimizer == "adam":
                self.optimizer = torch.optim.Adam(params, lr=config.lr_head)
            else:
                self.optimizer = torch.optim.SGD(params, lr=config.lr_head, momentum=0.9)

    # -- checks -----------------------------------------------------------------------------
    def check_dataset(self, dataset) -> None:
        """ConfigError if a class has fewer training images than ``n_real`` (call before distilling)."""
        smallest = dataset.class_index.smallest_class()
        if self.n_real > smallest:
            raise ConfigError(
                f"MIM n_real {self.n_real} is larger than the smallest class, which has {smallest} "
                f"training images; lower n_real."
            )

    def _check_real_batch(self, y_real: Tensor) -> None:
        counts = torch.bincount(y_real.detach().flatten().cpu())
        present = counts[counts > 0]
        if present.numel() and int(present.min()) < self.n_real:
            raise ConfigError(
                f"MIM n_real {self.n_real} is larger than the smallest class, which has "
                f"{int(present.min())} training images; lower n_real."
            )

    # -- the term ---------------------------------------------------------------------------
    def features(self, model: nn.Module, forward_syn, forward_real, x_syn: Tensor,
                 x_real: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Pooled features of each tapped layer: synthetic (with graph) and real (no graph)."""
        if x_syn.is_leaf and x_syn.requires_grad:
            # a view, not the leaf itself: module hooks (e.g. FlopCounterMode's) cannot run under autograd.grad
            # when a module's input is a leaf
            x_syn = x_syn.view_as(x_syn)
        with FeatureTap(model, self.layers, self.config.pool, self.feature_dtype, mode=self.config.tap) as tap:
            forward_syn(x_syn)
            f_syn = tap.features
            tap.clear()
            # Real images in chunks: the network is per-sample (instance norm), so this is exact, and
            # only one chunk's full activations exist at a time (the tap keeps pooled features only).
            parts = []
            with torch.no_grad():
                for chunk in x_real.split(self.config.real_chunk):
                    forward_real(chunk)
                    parts.append(tap.features)
                    tap.clear()
            f_real = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
        return f_syn, f_real

    def _contrast(self, a: Tensor, b: Tensor, ya: Tensor, yb: Tensor, critic: str) -> Tensor:
        c = self.config
        return contrastive_loss(a, b, ya, yb, tau=c.tau, critic=critic, noise_ratio=c.noise_ratio,
                                neg_weight=c.neg_weight, reduction="mean", impl=c.impl)

    def _objective(self, f_syn: dict[str, Tensor], f_real: dict[str, Tensor], y_syn: Tensor, y_real: Tensor,
                   n_keys: int) -> tuple[Tensor, dict[str, float]]:
        """sum_k beta_k L_k over the tapped layers (unweighted) and the per-layer logs."""
        c = self.config
        if self.heads is None:
            self._build_heads([f_syn[name].shape[1] for name in self.layers])
        total: Tensor | None = None
        logs: dict[str, float] = {}
        log_m = math.log(n_keys)
        for k, name in enumerate(self.layers):
            # Heads and the loss run in float32 whatever dtype the tap stored features in.
            z_syn = self.heads[k](f_syn[name].float())
            z_real = self.heads_real[k](f_real[name].float())
            forward = self._contrast(z_syn, z_real, y_syn, y_real, c.critic)
            layer_loss = forward
            if c.symmetric:
                layer_loss = 0.5 * (forward + self._contrast(z_real, z_syn, y_real, y_syn, c.critic))
            total = self.beta[k] * layer_loss if total is None else total + self.beta[k] * layer_loss
            with torch.no_grad():
                infonce = forward if c.critic == "infonce" else self._contrast(
                    z_syn.detach(), z_real.detach(), y_syn, y_real, "infonce")
                logs[f"mim/{name}"] = float(layer_loss.detach())
                logs[f"mi_est/{name}"] = log_m - float(infonce.detach())
        assert total is not None
        return total, logs

    def loss(self, model: nn.Module, forward_syn, forward_real, x_syn: Tensor, y_syn: Tensor,
             x_real: Tensor, y_real: Tensor) -> tuple[Tensor, dict[str, float]]:
        """lambda * sum_k beta_k L_k with its full graph (heads included) and logs: mim_loss, mim/<layer>,
        mi_est/<layer> (log M - InfoNCE in nats; docs/theory.md says what it estimates). The building
        block of ``__call__``; tests and analyses use it directly."""
        self._check_real_batch(y_real)
        f_syn, f_real = self.features(model, forward_syn, forward_real, x_syn, x_real)
        total, logs = self._objective(f_syn, f_real, y_syn, y_real, x_real.shape[0])
        weighted = self.config.lam * total
        logs["mim_loss"] = float(weighted.detach())
        return weighted, logs

    def __call__(self, model: nn.Module, x_syn: Tensor, y_syn: Tensor, x_real: Tensor, y_real: Tensor, *,
                 forward_syn=None, forward_real=None) -> tuple[Tensor, dict[str, float]]:
        """The weighted term for the caller's backward; the heads are trained here (see the class doc).

        The heads maximise the estimate itself: their gradient is that of the unweighted sum_k beta_k L_k,
        at every lambda (lambda = 0 included), so the logged estimate means the same across lambda. lambda
        weighs the term in the images' loss only. One backward pass through the heads and the
        contrastive loss gives the heads' gradient and the gradient at the synthetic features; the
        returned tensor carries lambda times the latter into the model (value: the weighted term;
        gradient: lambda * features . grad), so the caller's backward never reaches the heads, which
        have already stepped.
        """
        self._check_real_batch(y_real)
        f_syn, f_real = self.features(model, forward_syn or model, forward_real or model, x_syn, x_real)
        total, logs = self._objective(f_syn, f_real, y_syn, y_real, x_real.shape[0])
        lam = self.config.lam
        logs["mim_loss"] = float(lam * total.detach())
        params = self.parameters()
        feats = [f_syn[name] for name in self.layers if f_syn[name].requires_grad and lam != 0]
        grads = torch.autograd.grad(total, params + feats, allow_unused=True) if params or feats else ()
        head_grads, feat_grads = grads[: len(params)], grads[len(params):]
        if self.optimizer is not None:
            for p, g in zip(params, head_grads, strict=True):
                p.grad = torch.zeros_like(p) if g is None else g
            self.shard.average([p.grad for p in params], "averaging the MIM heads' gradients")
            self.step()
        value = lam * total.detach()
        carried = [(f * g).sum() for f, g in zip(feats, feat_grads, strict=True) if g is not None]
        if not carried:
            return value, logs
        surrogate = lam * torch.stack(carried).sum()
        return surrogate - surrogate.detach() + value, logs

    # -- head optimisation and state ---------------------------------------------------------
    def zero_grad(self) -> None:
        """For the manual path (``loss`` + your own backward + ``step``)."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        """One optimizer step of the heads (``__call__`` takes it itself)."""
        if self.optimizer is not None:
            self.optimizer.step()

    def parameters(self) -> list[Tensor]:
        if self.head_modules is None:
            return []
        return [p for p in self.head_modules.parameters() if p.requires_grad]

    def state_dict(self) -> dict[str, Any]:
        if self.head_modules is None:
            return {}
        state: dict[str, Any] = {
            "heads": {k: v.detach().cpu().clone() for k, v in self.head_modules.state_dict().items()},
            "dims": list(self.dims),
        }
        if self.optimizer is not None:
            # deepcopy: the optimizer's state_dict shares its moment tensors with the live optimizer.
            state["optimizer"] = copy.deepcopy(self.optimizer.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.head_modules is None:  # a generic model's heads are built at the first call: widths saved
            self._build_heads([int(d) for d in state["dims"]])
        self.head_modules.load_state_dict(state["heads"])
        if self.optimizer is not None and "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])

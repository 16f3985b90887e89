"""Method names -> configured method objects: "dc", "dm", "mtt", each optionally "+mim".

``build_method`` is the one place that turns a name and plain settings dicts (from TOML or the
CLI) into a ``DistillMethod``; "mim4dd" is the paper's method, an alias of "mtt+mim".
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import from_mapping
from ..data import Dataset
from ..distributed import SINGLE, Dist
from ..errors import ConfigError
from ..models import build_model
from .base import DistillMethod
from .dc import DC, DCConfig
from .dm import DM, DMConfig

METHOD_NAMES = ["dc", "dm", "mtt", "dc+mim", "dm+mim", "mtt+mim", "mim4dd"]
ALIASES = {"mim4dd": "mtt+mim"}


def canonical_name(name: str) -> str:
    """Lower-cased, alias-resolved method name; ConfigError listing the valid names otherwise."""
    key = str(name).strip().lower().replace(" ", "")
    if key not in METHOD_NAMES:
        raise ConfigError(f"Unknown method {name!r}; choose one of {', '.join(METHOD_NAMES)}.")
    return ALIASES.get(key, key)


def config_class(name: str) -> type:
    """The settings dataclass of the method's base (DCConfig, DMConfig or MTTConfig)."""
    base = canonical_name(name).split("+")[0]
    if base == "dc":
        return DCConfig
    if base == "dm":
        return DMConfig
    from .mtt import MTTConfig  # imported on use: MTT pulls in the expert machinery

    return MTTConfig


def build_method(
    name: str,
    dataset: Dataset,
    ipc: int,
    *,
    config: dict[str, Any] | None = None,
    mim: dict[str, Any] | None = None,
    experts=None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    init: str = "real",
    dist: Dist = SINGLE,
) -> DistillMethod:
    """Build method ``name`` on ``dataset``; ``config`` holds the base's settings, ``mim`` the term's."""
    canon = canonical_name(name)
    base, _, extra = canon.partition("+")
    cfg = from_mapping(config_class(base), config, what=f"{base.upper()} settings")
    if base == "mtt" and (experts is None or len(experts) == 0):
        raise ConfigError("Method 'mtt' needs expert trajectories; train them with `mim4dd-fast experts` first.")
    term = None
    if extra == "mim":
        from .mim import MIMConfig, MIMTerm

        with torch.random.fork_rng(devices=[]):  # the template's random init must not shift anyone's RNG
            template = build_model(dataset.channels, dataset.num_classes, dataset.image_size,
                                   width=getattr(cfg, "width", 128), depth=getattr(cfg, "depth", None))
        term = MIMTerm(from_mapping(MIMConfig, mim, what="MIM settings"), template, dataset.num_classes, device)
        check = getattr(term, "check_dataset", None)
        if callable(check):
            check(dataset)
    elif mim:
        raise ConfigError(f"MIM settings were given but method {canon!r} has no MIM term; use '{base}+mim'.")
    if base == "dc":
        return DC(dataset, ipc, cfg, init=init, device=device, seed=seed, term=term, dist=dist)
    if base == "dm":
        return DM(dataset, ipc, cfg, init=init, device=device, seed=seed, term=term, dist=dist)
    from .mtt import MTT

    return MTT(dataset, ipc, config=cfg, experts=list(experts), device=device, seed=seed, init=init, term=term,
               dist=dist)

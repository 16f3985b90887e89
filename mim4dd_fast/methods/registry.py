"""Method names -> specs -> configured method objects.

``METHODS`` maps each base method's name to its ``MethodSpec``; ``"<base>+mim"`` attaches the MIM4DD
term to any of them, and specs may declare aliases ("mim4dd" = "mtt+mim", the paper's method).
``build_method`` is the one place that turns a name and settings into a ``DistillMethod``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import from_mapping
from ..data import Dataset
from ..distributed import SINGLE, Dist
from ..errors import ConfigError
from . import dc, dm, mtt
from .base import DistillMethod
from .spec import MethodSpec

TERM = "mim"  # the auxiliary term "<base>+mim" attaches

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (dc.SPEC, dm.SPEC, mtt.SPEC)}


def register(spec: MethodSpec) -> None:
    """Add a method (a plug-in or a test's toy); its name and aliases must be new."""
    taken = set(METHODS) | {a for s in METHODS.values() for a in s.aliases}
    for name in (spec.name, *spec.aliases):
        if name in taken or "+" in name:
            raise ConfigError(f"Method name {name!r} is taken or contains '+'.")
    METHODS[spec.name] = spec


def unregister(name: str) -> None:
    METHODS.pop(name, None)


def method_names() -> list[str]:
    """Every valid name: the bases, each with the term, then the aliases."""
    bases = list(METHODS)
    return bases + [f"{b}+{TERM}" for b in bases] + [a for s in METHODS.values() for a in s.aliases]


@dataclass(frozen=True)
class MethodChoice:
    """A resolved method name: the base's spec and whether the MIM term is attached."""

    spec: MethodSpec
    with_term: bool

    @property
    def name(self) -> str:
        return f"{self.spec.name}+{TERM}" if self.with_term else self.spec.name


def resolve(name: str) -> MethodChoice:
    """Lower-cased, alias-resolved method; ConfigError listing the valid names otherwise."""
    key = str(name).strip().lower().replace(" ", "")
    for spec in METHODS.values():
        key = spec.aliases.get(key, key)
    base, plus, extra = key.partition("+")
    if base not in METHODS or (plus and extra != TERM):
        raise ConfigError(f"Unknown method {name!r}; choose one of {', '.join(method_names())}.")
    return MethodChoice(METHODS[base], bool(plus))


def canonical_name(name: str) -> str:
    return resolve(name).name


def config_class(name: str) -> type:
    """The settings dataclass of the method's base."""
    return resolve(name).spec.config_class


def build_method(
    name: str,
    dataset: Dataset,
    ipc: int,
    *,
    config: Any = None,
    mim: Any = None,
    experts=None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    init: str = "real",
    dist: Dist = SINGLE,
) -> DistillMethod:
    """Build method ``name`` on ``dataset``; ``config`` holds the base's settings, ``mim`` the term's
    (typed configs, or plain mappings validated here)."""
    from .mim import MIMConfig, MIMTerm

    choice = resolve(name)
    spec = choice.spec
    if not isinstance(config, spec.config_class):
        config = from_mapping(spec.config_class, config, what=f"{spec.name} setting")
    if mim is not None and not choice.with_term:
        raise ConfigError(f"MIM settings were given but method {choice.name!r} has no MIM term; "
                          f"use '{spec.name}+{TERM}'.")
    kwargs: dict[str, Any] = {"init": init, "device": device, "seed": seed, "dist": dist}
    if spec.needs_experts:
        if not experts:
            raise ConfigError(f"Method {spec.name!r} needs expert trajectories; train them with "
                              "`mim4dd-fast experts` first.")
        kwargs["experts"] = list(experts)
    method = spec.build(dataset, ipc, config, **kwargs)
    if choice.with_term:
        if not isinstance(mim, MIMConfig):
            mim = from_mapping(MIMConfig, mim, what="mim setting")
        method.term = MIMTerm(mim, method.network_template(), dataset.num_classes, device, dist=dist, seed=seed)
        method.term.check_dataset(dataset)
    return method

"""What the rest of the library knows about a method: one ``MethodSpec`` per method module.

The registry is a dict of specs; the run builder, the CLI, the presets and the bench scripts ask the
spec (does it need experts? does it learn a step size? which presets?) instead of testing names.
Adding a method = one module that defines its config, its class and its SPEC, plus one registry line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ExpertPlan:
    """What a method needs of expert trajectories: epochs per trajectory and the network they train."""

    epochs: int
    model_kwargs: dict[str, Any]


@dataclass(frozen=True)
class MethodSpec:
    """One distillation method as the registry sees it.

    ``build(dataset, ipc, config, *, init, device, seed, term, dist[, experts])`` constructs the method
    (``experts`` is passed only when ``expert_plan`` is set). ``expert_plan(config, dataset)`` says which
    experts to train; ``None`` means the method needs none. ``learns_step_size``: the method learns the
    student's learning rate, so evaluation trains with it (``DistillMethod.learned_lr``). Presets are
    packaged TOML files named ``<preset_prefix>-<dataset>-ipc<N>``.
    """

    name: str
    config_class: type
    build: Callable[..., Any]
    summary: str
    expert_plan: Callable[[Any, Any], ExpertPlan] | None = None
    learns_step_size: bool = False
    preset_prefix: str | None = None
    aliases: dict[str, str] = field(default_factory=dict)  # e.g. {"mim4dd": "mtt+mim"}
    # The MIM term's defaults for this method where the study chose them on validation (docs/results.md);
    # below a preset, --config and flags, above MIMConfig's own defaults.
    mim_defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_experts(self) -> bool:
        return self.expert_plan is not None

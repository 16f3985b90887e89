"""Run settings for `mim4dd-fast distill`: defaults < preset < config file < command-line flags.

The resolved settings (every value, defaults included) are written to RUN_DIR/config.toml so a run
can be reproduced exactly with ``--config RUN_DIR/config.toml``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import from_mapping, require, to_mapping
from .errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


@dataclass
class RunSettings:
    """Top-level scalars of a distillation run (method-specific settings live in the tables)."""

    method: str = "mim4dd"
    dataset: str = "digits"
    data_dir: str = ""
    ipc: int = 1
    iterations: int = 200
    seed: int = 0
    zca: bool = False
    image_size: int = 0  # 0 = the dataset's own size (imagefolder: 32)
    init: str = "real"
    device: str = "auto"
    eval_every: int = 0  # 0 = evaluate only at the end
    checkpoint_every: int = 10
    evals: int = 5  # evaluation nets at the end
    num_experts: int = 5  # MTT only
    expert_epochs: int = 0  # MTT only; 0 = max_start_epoch + expert_epochs (all that is needed)

    def validate(self) -> None:
        from .methods.registry import canonical_name

        canonical_name(self.method)
        require(self.ipc >= 1, f"ipc must be at least 1, got {self.ipc}.")
        require(self.iterations >= 1, f"iterations must be at least 1, got {self.iterations}.")
        require(self.image_size >= 0, f"image_size must be 0 (native) or positive, got {self.image_size}.")
        require(self.eval_every >= 0, f"eval_every must be 0 or positive, got {self.eval_every}.")
        require(self.checkpoint_every >= 1, f"checkpoint_every must be at least 1, got {self.checkpoint_every}.")
        require(self.evals >= 1, f"evals must be at least 1, got {self.evals}.")
        require(self.num_experts >= 1, f"num_experts must be at least 1, got {self.num_experts}.")
        require(self.expert_epochs >= 0, f"expert_epochs must be 0 or positive, got {self.expert_epochs}.")
        require(self.init in ("real", "noise"), f"init must be 'real' or 'noise', got {self.init!r}.")
        require(self.seed >= 0, f"seed must be non-negative, got {self.seed}.")


@dataclass
class Settings:
    """Everything a run needs: scalars plus the base method, MIM and evaluation tables."""

    run: RunSettings
    method: dict[str, Any] = field(default_factory=dict)
    mim: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)

    def to_toml_dict(self) -> dict[str, Any]:
        return {**to_mapping(self.run), "method_config": dict(self.method), "mim": dict(self.mim),
                "eval": dict(self.eval)}


TABLES = ("method_config", "mim", "eval")


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML settings file; a missing or malformed file is one clear sentence."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist.") from None
    except IsADirectoryError:
        raise ConfigError(f"Config file {path} is a directory, not a TOML file.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Config file {path} is not valid TOML ({exc}).") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Config file {path} cannot be read ({exc}).") from None


def _check_finite(mapping: dict[str, Any], where: str) -> None:
    for key, value in mapping.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"Setting {where}{key} must be a finite number, got {value}.")
        if isinstance(value, dict):
            _check_finite(value, f"{where}{key}.")


def merge_layers(*layers: dict[str, Any]) -> dict[str, Any]:
    """Later layers override earlier ones; tables merge key by key."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if key in TABLES:
                if not isinstance(value, dict):
                    raise ConfigError(f"Setting {key!r} must be a table of settings, got {value!r}.")
                out[key] = {**out.get(key, {}), **value}
            else:
                out[key] = value
    return out


def build_settings(mapping: dict[str, Any]) -> Settings:
    """Validate a merged mapping into Settings (method tables are validated by their classes)."""
    _check_finite(mapping, "")
    scalars = {k: v for k, v in mapping.items() if k not in TABLES}
    run = from_mapping(RunSettings, scalars, what="run setting")
    method_table = dict(mapping.get("method_config", {}))
    mim_table = dict(mapping.get("mim", {}))
    eval_table = dict(mapping.get("eval", {}))
    # validate each table now, before any work starts
    from .evaluate import EvalConfig
    from .methods.registry import canonical_name, config_class

    name = canonical_name(run.method)
    from_mapping(config_class(name), method_table, what=f"{name.split('+')[0]} setting")
    if name.endswith("+mim"):
        from .methods.mim import MIMConfig

        from_mapping(MIMConfig, mim_table, what="mim setting")
    elif mim_table:
        raise ConfigError(f"A [mim] table was given but method {run.method!r} has no MIM term.")
    from_mapping(EvalConfig, eval_table, what="eval setting")
    return Settings(run=run, method=method_table, mim=mim_table, eval=eval_table)


def preset_layer(name: str) -> dict[str, Any]:
    """A preset as a settings layer (same keys as config.toml)."""
    from .presets import load_preset

    return load_preset(name)

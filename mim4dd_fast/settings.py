"""Run settings for `mim4dd-fast distill`: defaults < preset < config file < command-line flags.

The resolved settings (every value, defaults included) are written to RUN_DIR/config.toml so a run
can be reproduced exactly with ``--config RUN_DIR/config.toml``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bounds import check_float32, check_seed, short
from .config import Validated, from_mapping, require, to_mapping
from .errors import ConfigError
from .io import read_limited

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


@dataclass
class RunSettings(Validated):
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
    expert_seed: int | None = None  # seed of the expert trajectories; unset = the run's seed (studies share one buffer)

    def validate(self) -> None:
        run_choice(self)
        require(self.ipc >= 1, f"ipc must be at least 1, got {self.ipc}.")
        require(self.iterations >= 1, f"iterations must be at least 1, got {self.iterations}.")
        require(self.image_size >= 0, f"image_size must be 0 (native) or positive, got {self.image_size}.")
        require(self.eval_every >= 0, f"eval_every must be 0 or positive, got {self.eval_every}.")
        require(self.checkpoint_every >= 1, f"checkpoint_every must be at least 1, got {self.checkpoint_every}.")
        require(self.evals >= 1, f"evals must be at least 1, got {self.evals}.")
        require(self.num_experts >= 1, f"num_experts must be at least 1, got {self.num_experts}.")
        require(self.expert_epochs >= 0, f"expert_epochs must be 0 or positive, got {self.expert_epochs}.")
        require(self.init in ("real", "noise"), f"init must be 'real' or 'noise', got {self.init!r}.")
        check_seed(self.seed)
        if self.expert_seed is not None:
            check_seed(self.expert_seed, "expert_seed")


@dataclass
class Settings:
    """Everything a run needs, parsed once into typed objects.

    ``run`` holds the scalars (``run.method`` is the method's name); ``method_config`` is the typed
    settings of that method's base (e.g. ``MTTConfig``), ``mim`` the term's (``None`` when the method
    carries no term) and ``eval`` the evaluation protocol. Built by ``build_settings``.
    """

    run: RunSettings
    method_config: Any
    mim: Any | None
    eval: Any

    @property
    def choice(self):
        """The resolved method (its spec and whether the MIM term is attached)."""
        from .methods.registry import resolve

        return resolve(self.run.method)

    def to_toml_dict(self) -> dict[str, Any]:
        """Every setting, defaults included, in config.toml's shape."""
        out = {**to_mapping(self.run), "method_config": to_mapping(self.method_config), "eval": to_mapping(self.eval)}
        if self.mim is not None:
            out["mim"] = to_mapping(self.mim)
        return out


TABLES = ("method_config", "mim", "eval")


TOML_MAX_BYTES = 1 << 20  # a settings file is a few hundred bytes; anything this large is not one
TOML_MAX_DEPTH = 6  # tables, lists and inline tables nested deeper than any setting needs


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def read_toml(path: str | Path, what: str = "Config file") -> dict[str, Any]:
    """Parse a TOML settings file; a missing, malformed, huge or deeply nested file is one clear sentence."""
    path = Path(path)
    data = read_limited(path, what, TOML_MAX_BYTES, ConfigError)
    try:
        parsed = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid TOML ({_short(str(exc), 200)}).") from None
    except RecursionError:
        raise ConfigError(f"{what} {path} nests tables or lists too deeply.") from None
    if _depth(parsed) > TOML_MAX_DEPTH:
        raise ConfigError(f"{what} {path} nests tables or lists deeper than {TOML_MAX_DEPTH} levels; no setting "
                          "needs that.")
    return parsed


def _check_finite(mapping: dict[str, Any], where: str) -> None:
    """Every number finite and representable in float32 (the precision of every tensor)."""
    for key, value in mapping.items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, float):
                if not math.isfinite(v):
                    raise ConfigError(f"Setting {where}{key} must be a finite number, got {v}.")
                check_float32(v, f"{where}{key}")
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
    """Validate a merged mapping (defaults < preset < config file < flags) into typed Settings, once."""
    from .evaluation import EvalConfig
    from .methods.mim import MIMConfig

    for table in TABLES:
        if table in mapping and mapping[table] is not None and not isinstance(mapping[table], dict):
            raise ConfigError(f"Setting {table!r} must be a table of settings, got {short(repr(mapping[table]))}.")
    _check_finite(mapping, "")
    scalars = {k: v for k, v in mapping.items() if k not in TABLES}
    run = from_mapping(RunSettings, scalars, what="run setting")
    choice = run_choice(run)
    method_config = from_mapping(choice.spec.config_class, mapping.get("method_config"),
                                 what=f"{choice.spec.name} setting")
    mim = None
    if choice.with_term:
        mim = from_mapping(MIMConfig, {**choice.spec.mim_defaults, **(mapping.get("mim") or {})}, what="mim setting")
    elif mapping.get("mim"):
        raise ConfigError(f"A [mim] table was given but method {run.method!r} has no MIM term; "
                          f"use '{choice.spec.name}+mim'.")
    return Settings(run=run, method_config=method_config, mim=mim,
                    eval=from_mapping(EvalConfig, mapping.get("eval"), what="eval setting"))


def run_choice(run: RunSettings):
    from .methods.registry import resolve

    return resolve(run.method)


# Table names a --set item may use; "method" is short for the [method_config] table, "run" for the top level.
_SET_TABLES = {"method": "method_config", "method_config": "method_config", "mim": "mim", "eval": "eval", "run": ""}


def _parse_value(text: str) -> Any:
    """JSON when it parses (numbers, true/false, lists, quoted strings), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(items: list[str], method: str | None = None, methods: list[str] | None = None
                    ) -> dict[str, Any]:
    """``--set`` items (``mim.tau=0.2``, ``method.lr_img=100``, ``iterations=50``) as a settings layer.

    A ``METHOD:`` prefix (``dm:method.batch_real=64``) limits an item to that method (by resolved name,
    or exactly when the prefix is one of ``methods``, so aliases can differ side by side); items for
    another method are skipped. A bad item is a ConfigError; keys and values are checked when the
    layer is built into Settings.
    """
    from .methods.registry import canonical_name

    layer: dict[str, Any] = {}
    for item in items:
        scope, colon, rest = item.partition(":")
        if colon and "=" not in scope:
            if method is not None:
                exact = methods is not None and scope in methods
                if (exact and scope != method) or (not exact and canonical_name(scope) != canonical_name(method)):
                    continue
            item = rest
        key, sep, value = item.partition("=")
        table, dot, name = key.strip().rpartition(".")
        if not sep or not name:
            raise ConfigError(f"--set expects TABLE.KEY=VALUE or KEY=VALUE, got {_short(item)!r}.")
        if dot and table not in _SET_TABLES:
            raise ConfigError(f"--set table {_short(table)!r} is unknown; use one of "
                              f"{', '.join(sorted(_SET_TABLES))} (e.g. mim.tau=0.2).")
        where = _SET_TABLES[table] if dot else ""
        if where:
            layer.setdefault(where, {})[name] = _parse_value(value)
        else:
            layer[name] = _parse_value(value)
    return layer


def _short(text: str, limit: int = 60) -> str:
    return short(text, limit)


def resolve_settings(*layers: dict[str, Any], preset: str | None = None) -> tuple[str | None, Settings]:
    """Settings from ``layers`` (lowest first) on top of a preset; returns (preset name, Settings).

    Without ``preset`` the method/dataset/IPC's own preset applies when one ships (see presets.py);
    a preset's method tables apply only to the method it was written for.
    """
    from .presets import default_preset, preset_layer_for

    merged = merge_layers(*layers)
    probe = from_mapping(RunSettings, {k: v for k, v in merged.items() if k not in TABLES}, what="run setting")
    choice = run_choice(probe)
    name = preset if preset is not None else default_preset(choice, probe.dataset, probe.ipc)
    base = preset_layer_for(name, choice) if name else {}
    return name, build_settings(merge_layers(base, merged))


def preset_layer(name: str) -> dict[str, Any]:
    """A preset as a settings layer (same keys as config.toml)."""
    from .presets import load_preset

    return load_preset(name)


def settings_on(base: Settings, *layers: dict[str, Any], preset: str | None = None) -> Settings:
    """``base`` (a run's own settings) with ``layers`` on top, and a named preset's layer beneath them.

    Used on resume: repeating the command that started a run gives back exactly its settings. When the
    layers name another method, the base's method tables are dropped (they belong to the old method) so
    the settings still build and the caller can name every key that differs.
    """
    merged = merge_layers(*layers)
    base_layer = base.to_toml_dict()
    method = merged.get("method")
    if isinstance(method, str):
        from .methods.registry import resolve

        if resolve(method) != base.choice:
            base_layer = {k: v for k, v in base_layer.items() if k not in TABLES}
    under = []
    if preset is not None:
        from .presets import preset_layer_for

        scalars = {k: v for k, v in merge_layers(base_layer, merged).items() if k not in TABLES}
        under.append(preset_layer_for(preset, run_choice(from_mapping(RunSettings, scalars, what="run setting"))))
    return build_settings(merge_layers(base_layer, *under, merged))

"""Typed, validated settings: dataclass configs built from dicts/TOML with one-sentence errors.

Every method and the MIM term keep their settings in a dataclass; ``from_mapping`` rejects unknown
keys, wrong types and non-finite or out-of-range numbers with a ConfigError (exit code 2 in the CLI).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"Setting {name!r} has an invalid value {value!r}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"Setting {name!r} must be a list, got {type(value).__name__}.")
        inner = args[0] if args else Any
        return [_coerce(name, v, inner) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"Setting {name!r} must be true or false, got {value!r}.")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"Setting {name!r} must be an integer, got {value!r}.")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"Setting {name!r} must be a number, got {value!r}.")
        if not math.isfinite(float(value)):
            raise ConfigError(f"Setting {name!r} must be a finite number, got {value!r}.")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"Setting {name!r} must be a string, got {value!r}.")
        return value
    return value


class Validated:
    """Base of every settings dataclass: ``validate()`` (ranges, choices) runs once, on construction,
    so a settings object that exists is valid (``dataclasses.replace`` re-validates the new one)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError (one sentence) when a value is out of range; subclasses override."""


def from_mapping(cls: type[T], mapping: dict[str, Any] | None, *, what: str = "settings") -> T:
    """Build settings dataclass ``cls`` from ``mapping``; unknown keys and bad types or values raise
    ConfigError (types are checked here, ranges by the class's own ``validate()`` on construction)."""
    mapping = dict(mapping or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(mapping) - fields)
    if unknown:
        raise ConfigError(f"Unknown {what} key {unknown[0]!r}; valid keys are: {', '.join(sorted(fields))}.")
    kwargs = {k: _coerce(k, v, hints[k]) for k, v in mapping.items()}
    return cls(**kwargs)


def to_mapping(obj: Any) -> dict[str, Any]:
    """Every field, defaults included, as plain TOML-serialisable values (None fields dropped)."""
    return {k: v for k, v in dataclasses.asdict(obj).items() if v is not None}


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``condition`` holds (for ``validate`` methods)."""
    if not condition:
        raise ConfigError(message)

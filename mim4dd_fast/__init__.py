"""mim4dd_fast: fast, measured dataset distillation built around MIM4DD.

The public API (docs/api.md): ``load_dataset``, ``distill``, ``evaluate`` and ``MIMTerm`` (with its
``MIMConfig``), imported on first use so that ``import mim4dd_fast.<module>`` stays light.
"""

__version__ = "0.1.0"

__all__ = ["Distilled", "MIMConfig", "MIMTerm", "distill", "evaluate", "load_dataset"]

_HOMES = {"distill": "api", "evaluate": "api", "Distilled": "api", "load_dataset": "data",
          "MIMTerm": "methods.mim", "MIMConfig": "methods.mim"}


def __getattr__(name: str):
    if name in _HOMES:
        from importlib import import_module

        return getattr(import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module 'mim4dd_fast' has no attribute {name!r}")

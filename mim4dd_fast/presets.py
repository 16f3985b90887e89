"""Named hyperparameter presets, stored as TOML files shipped inside the package (``presets/*.toml``).

A preset is a settings layer in the same shape as a run's ``config.toml``: top-level run settings
(dataset, ipc, zca, iterations, num_experts, expert_epochs = epochs each expert is trained) and the
tables ``[method_config]`` (the method's own settings, e.g. MTTConfig), ``[eval]`` (EvalConfig) and,
when a preset carries one, ``[mim]``. The original MTT presets transcribe the paper's table; the
digits presets are tuned here for a fast CPU run (docs/method.md says which is which).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from .errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

_DATASETS = ("cifar10", "cifar100", "tinyimagenet", "digits", "mnist5k")


def _folder():
    # data files of the package "mim4dd_fast" (this module shadows the folder's name as a package)
    return resources.files("mim4dd_fast").joinpath("presets")


def list_presets() -> list[str]:
    """Names of all packaged presets, sorted."""
    files = _folder().iterdir()
    return sorted(f.name[: -len(".toml")] for f in files if f.name.endswith(".toml"))


def load_preset(name: str) -> dict[str, Any]:
    """The preset ``name`` as a settings mapping; an unknown name is a ConfigError listing the valid ones."""
    names = list_presets()
    if name not in names:
        raise ConfigError(f"Unknown preset {name!r}; valid presets are: {', '.join(names)}.")
    text = _folder().joinpath(f"{name}.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def default_preset(choice, dataset: str, ipc: int) -> str | None:
    """The preset a run of the resolved method ``choice`` on ``dataset`` at ``ipc`` starts from, or None.

    A method's presets are named ``<spec.preset_prefix>-<dataset>-ipc<N>`` (MTT's serve mtt, mtt+mim and
    mim4dd); ``imagefolder`` datasets map to the Tiny ImageNet presets only when named ``tinyimagenet``.
    """
    if isinstance(choice, str):
        from .methods.registry import resolve

        choice = resolve(choice)
    prefix = choice.spec.preset_prefix
    key = dataset.lower().replace("-", "").replace("_", "")
    if prefix is None or key not in _DATASETS:
        return None
    name = f"{prefix}-{key}-ipc{int(ipc)}"
    return name if name in list_presets() else None


def preset_layer_for(name: str, choice) -> dict[str, Any]:
    """Preset ``name`` as a settings layer for ``choice``: its method tables only apply to the method it
    was written for (its ``method`` key, else its name's prefix), its [mim] table only to a +mim method."""
    from .methods.registry import METHODS, resolve

    layer = dict(load_preset(name))
    if "method" in layer:
        written_for = resolve(layer["method"]).spec
    else:
        written_for = next((s for s in METHODS.values() if s.preset_prefix == name.split("-")[0]), None)
    if written_for is not choice.spec:
        layer.pop("method_config", None)
    if not choice.with_term:
        layer.pop("mim", None)
    return layer

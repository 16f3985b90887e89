"""Import the user's own checkout of the original MTT or DatasetCondensation code, unedited, on a current CPU torch.

``bench/baselines.py --mtt-repo PATH --dc-repo PATH`` times the original code beside ours. Their code
is never copied into this repository: this module imports ``networks.py``, ``utils.py`` and (MTT)
``reparam_module.py`` from the folder the user names, and fixes the two things that stop them running
on a current CPU-only torch WITHOUT editing a line of them:

1. **Imports one iteration never uses.** Their ``utils.py`` imports torchvision (datasets, transforms),
   kornia, tqdm and ``scipy.ndimage.interpolation`` at module level for dataset loading, DC-style
   augmentation and progress bars. torchvision's CUDA wheel does not import beside a CPU torch, kornia
   and tqdm may be missing, and ``scipy.ndimage.interpolation`` is deprecated (gone in SciPy 2). While
   their modules are imported, those names are served from ``sys.modules`` shims (``StubModule``):
   any attribute resolves to a placeholder that raises a clear error if it is ever *called*, so a
   shim can never change a measured number silently. The shims are removed again after the import.

2. **DSA's overlapping copy at batch size 1.** In siamese mode (DC/DM pass a seed) every augmentation
   function of DatasetCondensation shares the first image's random parameters with the batch by
   ``X[:] = X[0]``. For a one-image batch (IPC 1: one synthetic image per class) source and
   destination are the same memory, which torch >= 2.x refuses ("some elements of the input tensor
   and the written-to tensor refer to a single memory location"). For one image that copy does
   nothing, so ``allow_one_image_siamese`` wraps each function in their ``AUGMENT_FNS`` table (looked
   up at call time by their ``DiffAugment``) to run with the siamese flag off for a one-image batch.
   The random draws are identical (their seeding does not read the flag) and so is the output; only
   the no-op copy is skipped. MTT's ``DiffAugment`` (per-image parameters, flag off) never copies.

Both repositories name their modules ``networks`` and ``utils``: they are imported under those names
with the checkout first on ``sys.path``, then taken out of ``sys.modules`` again (whatever was there
before is put back), so the two checkouts (and any other ``utils`` module) never clash.
"""

from __future__ import annotations

import functools
import importlib
import subprocess
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import _common  # noqa: F401  (puts this checkout on sys.path when run without installing)

from mim4dd_fast.errors import UserError

# Which original each flag names, and the files of it we import.
REPOSITORIES = {"mtt": "GeorgeCazenavette/mtt-distillation", "dc": "VICO-UoE/DatasetCondensation"}
MODULES = {"mtt": ("networks", "utils", "reparam_module"), "dc": ("networks", "utils")}
# Imported at module level by their utils.py / distill.py, never used by one distillation iteration.
STUBBED = ("torchvision", "torchvision.datasets", "torchvision.transforms", "torchvision.utils", "kornia", "tqdm",
           "wandb", "scipy.ndimage.interpolation")


class _Unused:
    """What a shimmed name resolves to: fine to import and to look up, an error to call."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> _Unused:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unused(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} is a bench stub: the original code used it during one iteration, which the "
                           f"side-by-side bench does not expect; run the original outside the bench.")


class StubModule(types.ModuleType):
    """A module whose every (non-dunder) attribute is an ``_Unused`` placeholder."""

    def __getattr__(self, attr: str) -> _Unused:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unused(f"{self.__name__}.{attr}")


@contextmanager
def _swapped_modules(names: dict[str, types.ModuleType | None]) -> Iterator[None]:
    """Set ``sys.modules[name]`` for each name (None: absent) for the block, then restore what was there."""
    missing = object()
    saved = {name: sys.modules.get(name, missing) for name in names}
    try:
        for name, module in names.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        yield
    finally:
        for name, old in saved.items():
            if old is missing:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old  # type: ignore[assignment]


def _stubs() -> dict[str, types.ModuleType]:
    stubs: dict[str, types.ModuleType] = {name: StubModule(name) for name in STUBBED}
    try:  # their `from scipy.ndimage.interpolation import rotate` needs the parents; stub them only if absent
        importlib.import_module("scipy.ndimage")
    except ImportError:
        stubs |= {"scipy": StubModule("scipy"), "scipy.ndimage": StubModule("scipy.ndimage")}
    for name, module in stubs.items():  # `import torchvision.utils` also reads the attribute of the parent
        parent, _, child = name.rpartition(".")
        if parent in stubs:
            setattr(stubs[parent], child, module)
    return stubs


def allow_one_image_siamese(utils: types.ModuleType) -> None:
    """Make their siamese DSA run on a one-image batch on torch >= 2.x (see the module docstring, point 2).

    Wraps every function of ``utils.AUGMENT_FNS`` in place; calling it twice wraps once.
    """
    table = getattr(utils, "AUGMENT_FNS", None)
    if not isinstance(table, dict):
        return
    for family, fns in table.items():
        table[family] = [fn if getattr(fn, "_one_image_siamese", False) else _one_image_siamese(fn) for fn in fns]


def _one_image_siamese(fn):
    @functools.wraps(fn)
    def wrapped(x, param):
        flags = [f for f in ("Siamese", "batchmode") if getattr(param, f, False)]  # DC: Siamese, MTT: batchmode
        if x.shape[0] != 1 or not flags:
            return fn(x, param)
        for f in flags:
            setattr(param, f, False)
        try:
            return fn(x, param)  # same draws; only the (no-op) copy of row 0 onto itself is skipped
        finally:
            for f in flags:
                setattr(param, f, True)

    wrapped._one_image_siamese = True  # type: ignore[attr-defined]
    return wrapped


@dataclass
class Originals:
    """The imported modules of one checkout (``reparam_module`` only for MTT) and its git commit, if known."""

    kind: str
    repo: Path
    commit: str | None
    networks: types.ModuleType
    utils: types.ModuleType
    reparam_module: types.ModuleType | None = None


def git_commit(repo: Path) -> str | None:
    """HEAD of the checkout (None when it is not a git work tree or git is missing)."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def check_repo(path: str | Path, kind: str) -> Path:
    """The checkout folder, or UserError in one sentence when it lacks a file we import."""
    repo = Path(path).expanduser()
    flag = "--mtt-repo" if kind == "mtt" else "--dc-repo"
    if not repo.is_dir():
        raise UserError(f"{flag} {path} is not a folder; give the root of a checkout of {REPOSITORIES[kind]}.")
    for name in MODULES[kind]:
        if not (repo / f"{name}.py").is_file():
            raise UserError(f"{flag} {path} has no {name}.py; give the root of a checkout of {REPOSITORIES[kind]}.")
    return repo


def load(path: str | Path, kind: str) -> Originals:
    """Import the original ``kind`` ("mtt" or "dc") from the checkout at ``path``, unedited (see module docstring)."""
    if kind not in MODULES:
        raise ValueError(f"kind must be one of {', '.join(MODULES)}, got {kind!r}")
    repo = check_repo(path, kind).resolve()
    names = MODULES[kind]
    with _swapped_modules({**_stubs(), **dict.fromkeys(names)}):
        sys.path.insert(0, str(repo))
        write_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # leave their folder as it was
        try:
            modules = {name: importlib.import_module(name) for name in names}
        except Exception as exc:  # their import failed: say which checkout, keep the cause
            raise UserError(f"Importing the original code from {repo} failed: {type(exc).__name__}: {exc}.") from exc
        finally:
            sys.path.remove(str(repo))
            sys.dont_write_bytecode = write_bytecode
    allow_one_image_siamese(modules["utils"])
    return Originals(kind, repo, git_commit(repo), modules["networks"], modules["utils"], modules.get("reparam_module"))

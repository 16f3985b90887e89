"""Checkpoints of arbitrary nested method state: tensors in safetensors, structure in JSON.

A checkpoint is ``ckpt-<iteration>.safetensors`` plus ``ckpt-<iteration>.json``: the structure with
tensor placeholders, the iteration, the sha256 of the tensor file, what the checkpoint belongs to
(``run``: the run's settings that shape its state, e.g. method, dataset, IPC) and a checksum of all of
that. Both files are written atomically, tensors first, so a checkpoint exists only once its JSON does.
Loading verifies both checksums and falls back to the newest older checkpoint that verifies (naming
the bad one); when none verifies it refuses rather than start over. A checkpoint that verifies but
belongs to another run (``run`` differs) or whose state does not fit the method (``check_state``) is
refused, naming the file. The previous good checkpoint is kept.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from .errors import DataError
from .io import atomic_write_json, load_tensors, save_tensors

KEEP = 2  # checkpoints kept on disk: the newest and the previous good one
FORMAT = 2
_NAME = re.compile(r"^ckpt-(\d{8})\.json$")


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """JSON skeleton of ``obj``; tensors move into ``tensors`` under their path."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[_encode_key(k), _encode(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        kind = "__list__" if isinstance(obj, list) else "__tuple__"
        return {kind: [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at {path}")


def _encode_key(key: Any) -> Any:
    if isinstance(key, (str, int)) and not isinstance(key, bool):
        return key
    raise TypeError(f"cannot checkpoint a dict key of type {type(key).__name__}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The state from its skeleton; KeyError/TypeError/ValueError on a skeleton we did not write."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__dict__"}:
            return {_key(k): _decode(v, tensors) for k, v in obj["__dict__"]}
        if set(obj) == {"__list__"}:
            return [_decode(v, tensors) for v in obj["__list__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        raise ValueError("unknown node")
    if isinstance(obj, list):
        raise ValueError("bare list")
    return obj


def _key(key: Any) -> Any:
    if isinstance(key, (str, int)) and not isinstance(key, bool):
        return key
    raise TypeError("bad key")


def checkpoint_path(directory: str | Path, iteration: int) -> Path:
    return Path(directory) / f"ckpt-{iteration:08d}.json"


def save_checkpoint(directory: str | Path, iteration: int, state: dict[str, Any],
                    run: dict[str, Any] | None = None) -> Path:
    """Write checkpoint ``iteration`` atomically and prune all but the newest ``KEEP``.

    ``run`` records what the state belongs to (JSON values); loading with another ``run`` is refused.
    """
    from .rundir import with_checksum

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(state, tensors, "")
    meta_path = checkpoint_path(directory, iteration)
    digest = save_tensors(meta_path.with_suffix(".safetensors"), tensors)
    atomic_write_json(meta_path, with_checksum({"format": FORMAT, "iteration": iteration, "sha256": digest,
                                                "state": skeleton, "run": dict(run or {})}))
    for old in list_checkpoints(directory)[:-KEEP]:
        for suffix in (".json", ".safetensors"):
            old.with_suffix(suffix).unlink(missing_ok=True)
    return meta_path


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint JSON files, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def read_checkpoint(meta_path: Path, run: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """Load one checkpoint, verifying both checksums; DataError names the file when it is bad.

    With ``run``, a checkpoint written for other run settings is refused, naming the keys that differ.
    """
    from .rundir import read_checked_json

    meta_path = Path(meta_path)
    meta = read_checked_json(meta_path, "Checkpoint")
    match = _NAME.match(meta_path.name)
    iteration, digest = meta.get("iteration"), meta.get("sha256")
    if meta.get("format") != FORMAT or not isinstance(iteration, int) or not isinstance(digest, str) \
            or not isinstance(meta.get("run"), dict) or "state" not in meta \
            or (match is not None and int(match.group(1)) != iteration):
        raise DataError(f"Checkpoint {meta_path} has the wrong structure (written by another version?).")
    if run is not None and meta["run"] != run:
        keys = sorted(k for k in set(run) | set(meta["run"]) if run.get(k) != meta["run"].get(k))
        shown = ", ".join(f"{k} = {meta['run'].get(k)!r} (this run: {run.get(k)!r})" for k in keys[:4])
        raise DataError(f"Checkpoint {meta_path} belongs to another run: {shown}; it cannot be resumed here.")
    tensors = load_tensors(meta_path.with_suffix(".safetensors"), expected_sha256=digest)
    try:
        state = _decode(meta["state"], tensors)
    except (KeyError, TypeError, ValueError):
        raise DataError(f"Checkpoint {meta_path} has the wrong structure (its state does not decode).") from None
    if not isinstance(state, dict):
        raise DataError(f"Checkpoint {meta_path} has the wrong structure (its state is not a mapping).")
    return iteration, state


def load_latest_checkpoint(directory: str | Path, warn=None,
                           run: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]] | None:
    """The newest checkpoint that verifies (None when there is none at all).

    Corrupted newer ones are reported through ``warn``; when every checkpoint is corrupted this is a
    DataError (never a silent restart). One that belongs to another run is refused at once.
    """
    found = list_checkpoints(directory)
    problems = []
    for meta_path in reversed(found):
        try:
            return read_checkpoint(meta_path, run)
        except DataError as exc:
            if "belongs to another run" in str(exc):
                raise
            problems.append(str(exc))
            if warn is not None:
                warn(f"{exc} Falling back to the previous checkpoint.")
    if found:
        raise DataError(f"Every checkpoint in {directory} is damaged ({problems[-1]}); the run cannot be resumed. "
                        "Nothing was changed.")
    return None


def inspect_checkpoints(directory: Path) -> int | None:
    """The newest checkpoint iteration that verifies (for ``show``); DataError naming a damaged one."""
    found = list_checkpoints(directory)
    for meta_path in reversed(found):
        iteration, _ = read_checkpoint(meta_path)
        return iteration
    return None


def check_state(loaded: Any, reference: Any, path: Path, where: str = "state") -> None:
    """DataError unless ``loaded`` fits ``reference`` (a freshly built method's state_dict): the same keys,
    list lengths, and tensor shapes and dtypes. An empty mapping in the reference (an optimizer that has
    not stepped yet) accepts any content."""
    def fail(why: str) -> DataError:
        return DataError(f"Checkpoint {path} does not fit this run: {where} {why}.")

    if isinstance(reference, torch.Tensor):
        if not isinstance(loaded, torch.Tensor):
            raise fail("should be a tensor")
        if loaded.shape != reference.shape or loaded.dtype != reference.dtype:
            raise fail(f"has shape {list(loaded.shape)} {loaded.dtype}, expected {list(reference.shape)} "
                       f"{reference.dtype}")
    elif isinstance(reference, dict):
        if not isinstance(loaded, dict):
            raise fail("should be a mapping")
        if reference and set(loaded) != set(reference):
            diff = sorted(map(str, set(loaded) ^ set(reference)))
            raise fail(f"has other entries ({', '.join(diff[:4])} differ)")
        for key in reference:
            check_state(loaded[key], reference[key], path, f"{where}/{key}")
    elif isinstance(reference, (list, tuple)):
        if not isinstance(loaded, (list, tuple)) or len(loaded) != len(reference):
            raise fail(f"should hold {len(reference)} entries")
        for i, (a, b) in enumerate(zip(loaded, reference, strict=True)):
            check_state(a, b, path, f"{where}/{i}")
    elif isinstance(reference, (bool, int, float, str)) and not isinstance(loaded, type(reference)) \
            and not (isinstance(reference, float) and isinstance(loaded, int)):
        raise fail(f"should be a {type(reference).__name__}")

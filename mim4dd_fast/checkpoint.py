"""Checkpoints of arbitrary nested method state: tensors in safetensors, structure in JSON.

A checkpoint is ``ckpt-<iteration>.safetensors`` plus ``ckpt-<iteration>.json`` (the structure with tensor
placeholders, the iteration and the sha256 of the tensor file). Both are written atomically, tensors
first, so a checkpoint exists only once its JSON does; loading verifies the checksum and falls back to
the newest older checkpoint that verifies. The previous good checkpoint is kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import DataError
from .io import atomic_write_json, load_tensors, save_tensors

KEEP = 2  # checkpoints kept on disk: the newest and the previous good one


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
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_decode(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    return obj


def save_checkpoint(directory: str | Path, iteration: int, state: dict[str, Any]) -> Path:
    """Write checkpoint ``iteration`` atomically and prune all but the newest ``KEEP``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(state, tensors, "")
    stem = f"ckpt-{iteration:08d}"
    digest = save_tensors(directory / f"{stem}.safetensors", tensors)
    atomic_write_json(directory / f"{stem}.json", {"iteration": iteration, "sha256": digest, "state": skeleton})
    for old in list_checkpoints(directory)[:-KEEP]:
        for suffix in (".json", ".safetensors"):
            old.with_suffix(suffix).unlink(missing_ok=True)
    return directory / f"{stem}.json"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint JSON files, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("ckpt-*.json") if not p.name.startswith("."))


def read_checkpoint(meta_path: Path) -> tuple[int, dict[str, Any]]:
    """Load one checkpoint, verifying its checksum; DataError names the file when it is bad."""
    try:
        meta = json.loads(meta_path.read_text())
        iteration, digest, skeleton = int(meta["iteration"]), meta["sha256"], meta["state"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"Checkpoint {meta_path} is corrupted (unreadable metadata).") from None
    tensors = load_tensors(meta_path.with_suffix(".safetensors"), expected_sha256=digest)
    return iteration, _decode(skeleton, tensors)


def load_latest_checkpoint(directory: str | Path, warn=None) -> tuple[int, dict[str, Any]] | None:
    """The newest checkpoint that verifies; corrupted newer ones are reported through ``warn``."""
    for meta_path in reversed(list_checkpoints(directory)):
        try:
            return read_checkpoint(meta_path)
        except DataError as exc:
            if warn is not None:
                warn(f"{exc} Falling back to the previous checkpoint.")
    return None

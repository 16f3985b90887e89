"""Atomic, checksummed file I/O: nothing is ever left half-written, and nothing untrusted executes.

Writes go to a temp file in the same directory, are fsynced, then renamed over the target (and the
directory fsynced), so a crash leaves either the old file or the new one. Tensors are stored as
safetensors; ``torch.load`` is only ever called with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import DataError

_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename + directory fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header keys sorted, so equal content gives equal bytes.

    safetensors keeps ``__metadata__`` in a Rust HashMap, whose order changes from call to call; the
    data section and its offsets do not depend on the header's key order, so only the header is
    rewritten (compact JSON, space-padded to a multiple of 8 bytes as safetensors writes it).
    """
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> str:
    """Save tensors as safetensors atomically; returns the file's sha256.

    The bytes depend only on the tensors and the metadata, never on dict order or the process, so
    equal content gives an equal checksum (a resumed run can be compared with an uninterrupted one).
    """
    data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    data = _canonical_safetensors(data)
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def load_tensors(path: str | os.PathLike, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load a safetensors file, checking its sha256 first when given; DataError names the bad file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"Tensor file {path} does not exist.") from None
    except OSError as exc:
        raise DataError(f"Tensor file {path} cannot be read ({exc.strerror}).") from None
    if expected_sha256 is not None and sha256_bytes(data) != expected_sha256:
        raise DataError(f"Tensor file {path} is corrupted (its checksum does not match the manifest).")
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise DataError(f"Tensor file {path} is not a valid safetensors file ({exc}).") from None


def load_torch_weights_only(path: str | os.PathLike) -> Any:
    """``torch.load`` restricted to tensors and plain containers; any pickled code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"File {path} does not exist.") from None
    except Exception as exc:  # UnpicklingError, RuntimeError: the payload is not plain weights
        raise DataError(f"File {path} was refused: it is not a plain-tensor file ({type(exc).__name__}).") from None


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and prove it is writable (before any long work starts)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as exc:
        raise DataError(f"Output directory {path} is not writable ({exc.strerror}).") from None
    return path

"""A restricted unpickler for dataset files: builds plain containers and numpy arrays, runs no code.

``pickle.load`` on an untrusted file can call any importable function (``os.system`` through
``__reduce__``). Here every global a pickle asks for goes through ``find_class``, which resolves
only a fixed table of numpy array-reconstruction helpers and refuses everything else before it is
imported, let alone called. Dicts, lists, tuples, str, bytes, int and float need no globals at all.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError

_LATIN1 = {"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"}


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as Python-3 protocol-2 pickles use it for bytes, limited to latin-1."""
    if not isinstance(obj, str) or encoding.lower() not in _LATIN1:
        raise pickle.UnpicklingError(f"_codecs.encode is only allowed for latin-1 text, not {encoding!r}")
    return codecs.encode(obj, "latin1", errors)


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The allowed (module, name) pairs, resolved here once, never imported by name from a file.

    Pickles written by numpy 1.x name ``numpy.core``, those written by numpy 2.x ``numpy._core``;
    protocol-5 pickles use ``_frombuffer`` instead of ``_reconstruct``.
    """
    core = getattr(np, "_core", None) or np.core  # numpy 2.x / numpy 1.x
    reconstruct = core.multiarray._reconstruct
    frombuffer = core.numeric._frombuffer
    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for package in ("numpy.core", "numpy._core"):
        table[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        table[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return table


_ALLOWED = _numpy_globals()


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle asked for a global outside the allow-list."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualified = f"{module}.{name}"


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise RefusedGlobal(module, name) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def safe_load(path: str | Path, encoding: str = "bytes") -> Any:
    """Unpickle ``path`` allowing only containers, scalars and numpy arrays; DataError otherwise.

    ``encoding="bytes"`` matches the official CIFAR loader: Python-2 ``str`` objects (keys, names,
    array buffers) come back as ``bytes``.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            obj = _RestrictedUnpickler(f, encoding=encoding).load()
    except FileNotFoundError:
        raise DataError(f"Dataset file {path} does not exist.") from None
    except RefusedGlobal as e:
        raise DataError(
            f"Refused to load {path}: it asks for {e.qualified}, which a dataset file never needs "
            "(the file may be malicious)."
        ) from None
    except (EOFError, pickle.UnpicklingError) as e:
        reason = "truncated" if isinstance(e, EOFError) or "truncated" in str(e) else "not a valid pickle"
        raise DataError(f"Dataset file {path} is {reason} ({e}); download it again.") from None
    except (OSError, MemoryError) as e:
        raise DataError(f"Dataset file {path} could not be read ({type(e).__name__}: {e}).") from None
    except (ValueError, TypeError, AttributeError, IndexError, KeyError, UnicodeError) as e:
        # Malformed opcodes or bad arguments to the numpy helpers.
        raise DataError(f"Dataset file {path} is corrupt ({type(e).__name__}: {e}).") from None
    return obj

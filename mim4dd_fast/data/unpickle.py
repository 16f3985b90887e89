"""A restricted unpickler for dataset files: builds plain containers and numpy arrays, runs no code.

``pickle.load`` on an untrusted file can call any importable function (``os.system`` through
``__reduce__``). Here every global a pickle asks for goes through ``find_class``, which resolves
only a fixed table of numpy array-reconstruction helpers and refuses everything else before it is
imported, let alone called. Dicts, lists, tuples, str, bytes, int and float need no globals at all.

A pickle can also be small and still expensive: memo references let a 92 KB file describe a list
that expands to billions of entries (a "billion laughs"), and numpy's helpers would allocate any
array size a header asks for. So before anything is built, ``check_structure`` walks the opcode
stream (``pickletools.genops``, which constructs nothing) and refuses a structure whose expanded
size is out of proportion to the file, that contains itself, or that nests deeper than any dataset
file; and the numpy helpers allowed here accept only plain numeric arrays whose sizes match the
bytes the file actually holds.
"""

from __future__ import annotations

import codecs
import math
import pickle
import pickletools
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..errors import DataError

_LATIN1 = {"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"}
MAX_DEPTH = 32  # a CIFAR batch nests about 6 levels (dict, array, state tuple, dtype, dtype state)
EXPANSION = 4  # expanded objects allowed per pickle opcode; plain (unshared) data stays below 2
EXPANSION_SLACK = 4096


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as Python-3 protocol-2 pickles use it for bytes, limited to latin-1."""
    if not isinstance(obj, str) or encoding.lower() not in _LATIN1:
        raise pickle.UnpicklingError(f"_codecs.encode is only allowed for latin-1 text, not {encoding!r}")
    return codecs.encode(obj, "latin1", errors)


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()`` as Python-3 protocol-2 pickles write ``b""``; any argument (``bytes(10**12)``) is refused."""
    if args:
        raise Refused("it calls bytes() with arguments, which could allocate any size")
    return b""


def _plain_dtype(dtype: Any) -> np.dtype:
    """Only plain numbers: an object dtype (also one faked through a dtype's pickled flags) would let
    numpy allocate a pointer per element or read the file's bytes as pointers."""
    if (not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or dtype.fields is not None
            or dtype.subdtype is not None):
        raise Refused(f"it holds an array of dtype {dtype}; dataset arrays are plain numbers")
    if dtype.flags != np.dtype(dtype.str).flags:
        raise Refused(f"it holds a {dtype} array whose pickled dtype flags ({dtype.flags}) are not numpy's own "
                      f"({np.dtype(dtype.str).flags}), e.g. claiming to hold Python objects")
    return dtype


class _NdarrayToken:
    """What ``numpy.ndarray`` resolves to: an argument for ``_reconstruct``, never called itself
    (``ndarray((10**6, 10**6))`` would allocate whatever a file asks for)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        raise Refused("it calls numpy.ndarray directly, which would allocate whatever size the file names")


class _CheckedArray(np.ndarray):
    """The array ``_reconstruct`` hands to the pickle's BUILD step: the state is checked first."""

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise Refused("it holds an array with a malformed state")
        _, shape, dtype, _, raw = state
        if not (isinstance(shape, tuple) and all(type(d) is int and d >= 0 for d in shape)):
            raise Refused(f"it holds an array of shape {shape!r}")
        dtype = _plain_dtype(dtype)
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != math.prod(shape) * dtype.itemsize:
            raise Refused(f"it holds an array of shape {shape} whose data is not the "
                          f"{math.prod(shape) * dtype.itemsize} bytes that shape needs")
        super().__setstate__(state)


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The allowed (module, name) pairs, resolved here once, never imported by name from a file.

    Pickles written by numpy 1.x name ``numpy.core``, those written by numpy 2.x ``numpy._core``;
    protocol-5 pickles use ``_frombuffer`` instead of ``_reconstruct``. Each helper is wrapped so it
    can only build a plain numeric array from bytes the file holds.
    """

    def reconstruct(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
        # numpy pickles an array as an empty placeholder, then fills it from the state (BUILD).
        if subtype is not _NdarrayToken or shape != (0,):
            raise Refused("it asks numpy for an array other than the empty placeholder numpy pickles write")
        return _CheckedArray((0,), dtype=np.uint8)

    def frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
        if not isinstance(buf, (bytes, bytearray)):
            raise Refused("it asks numpy for an array over something that is not bytes")
        return np.frombuffer(buf, dtype=_plain_dtype(dtype)).reshape(shape, order=order)

    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): _NdarrayToken,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("__builtin__", "bytes"): _empty_bytes,
        ("builtins", "bytes"): _empty_bytes,
    }
    for package in ("numpy.core", "numpy._core"):
        table[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        table[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return table


class Refused(pickle.UnpicklingError):
    """The file is well-formed but builds something a dataset file never needs; the message says what."""


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


class _Node:
    """One object the pickle would build: what it contains, and its expanded size and depth so far."""

    __slots__ = ("children", "size", "depth")

    def __init__(self, children: list[_Node]) -> None:
        self.children = children
        self.size = 1 + sum([c.size for c in children])
        self.depth = 1 + max([c.depth for c in children], default=0)


_ATOM = _Node([])  # every scalar, string and global: a leaf whose content cannot grow
_MARK = object()
_IN_PLACE = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}
_MEMO_PUT = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}
_CONTAINERS = {"EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET"}
# name -> (pops down to a MARK, items popped below the mark or without one, pushes a result)
_EFFECTS = {
    op.name: (pickletools.markobject in op.stack_before,
              op.stack_before.index(pickletools.markobject) if pickletools.markobject in op.stack_before
              else len(op.stack_before),
              bool(op.stack_after))
    for op in pickletools.opcodes
}


def _too_big(size: int, ops: int) -> Refused:
    return Refused(f"its shared references would expand to more than {EXPANSION * ops + EXPANSION_SLACK:,} "
                   f"objects from {ops:,} pickle operations (a 'billion laughs' structure)")


def _too_deep() -> Refused:
    return Refused(f"it nests containers more than {MAX_DEPTH} levels deep, which a dataset file never does")


def _expanded_size(root: _Node, limit: int) -> tuple[int, int]:
    """(objects, depth) of ``root`` written out as a tree, counting shared parts at every use.

    Iterative, memoised per node (linear in the pickle), stops once ``limit`` or ``MAX_DEPTH`` is
    passed; a container that contains itself raises ``Refused``.
    """
    done: dict[int, tuple[int, int]] = {}
    open_: set[int] = set()
    todo: list[tuple[_Node, bool]] = [(root, False)]
    while todo:
        node, children_done = todo.pop()
        key = id(node)
        if children_done:
            open_.discard(key)
            sizes = [done[id(c)] for c in node.children]
            done[key] = (1 + sum(s for s, _ in sizes), 1 + max((d for _, d in sizes), default=0))
            if done[key][0] > limit or done[key][1] > MAX_DEPTH:
                return done[key]
            continue
        if key in done:
            continue
        if key in open_:
            raise Refused("it holds a container that contains itself, which a dataset file never does")
        open_.add(key)
        todo.append((node, True))
        todo.extend((c, False) for c in node.children if id(c) not in done)
    return done[id(root)]


def check_structure(f: BinaryIO) -> None:
    """Walk the opcode stream, building nothing, and refuse what would expand or nest out of proportion.

    Each opcode's stack effect comes from ``pickletools`` (``stack_before`` / ``stack_after``).
    Every object's size is checked as it is made: the real unpickler hashes dict keys and set members
    as it adds them, and a key of nested shared tuples would hash for hours (tuples cannot change
    after they are made, so their size is exact then). Without shared containers every object is
    made by its own opcodes, so the structure cannot outgrow the file; when a container is fetched
    again from the memo, the finished structure is measured once more, so a list filled after it was
    referenced is counted in full.
    """
    stack: list[Any] = []
    memo: dict[int, _Node] = {}
    ops, shared, root = 0, False, _ATOM
    for op, arg, _ in pickletools.genops(f):
        ops += 1
        name = op.name
        mark, fixed, pushes = _EFFECTS[name]
        if not mark and not fixed:  # pushes a new scalar / empty container, or touches only the memo
            if name in _MEMO_GET:
                node = memo[arg]
                shared |= node is not _ATOM
                stack.append(node)
            elif name in _MEMO_PUT:
                memo[arg] = stack[-1]
            elif name == "MARK":
                stack.append(_MARK)
            elif pushes:
                stack.append(_Node([]) if name in _CONTAINERS else _ATOM)
            continue
        if name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
            continue
        if name == "DUP":
            shared |= stack[-1] is not _ATOM
            stack.append(stack[-1])
            continue
        items: list[Any] = []
        if mark:
            at = len(stack) - 1 - stack[::-1].index(_MARK)
            items = stack[at + 1 :]
            del stack[at:]
        if fixed:
            if len(stack) < fixed:
                raise ValueError(f"{name} finds too few items on the stack")
            items = stack[-fixed:] + items
            del stack[-fixed:]
        if any(i is _MARK for i in items):
            raise ValueError(f"{name} finds a MARK among its arguments")
        if name == "STOP":
            root = items[0]
            continue
        if name in _IN_PLACE and items[0] is not _ATOM:
            node = items[0]
            node.children.extend(items[1:])
            node.size += sum(i.size for i in items[1:])
            node.depth = max([node.depth] + [1 + i.depth for i in items[1:]])
        elif pushes:
            node = _Node(items)
        else:  # POP, POP_MARK
            continue
        stack.append(node)
        if node.size > EXPANSION * ops + EXPANSION_SLACK:
            raise _too_big(node.size, ops)
        if node.depth > MAX_DEPTH:
            raise _too_deep()
    if shared:
        size, depth = _expanded_size(root, EXPANSION * ops + EXPANSION_SLACK)
        if size > EXPANSION * ops + EXPANSION_SLACK:
            raise _too_big(size, ops)
        if depth > MAX_DEPTH:
            raise _too_deep()


def _plain(obj: Any, seen: dict[int, Any]) -> Any:
    """The loaded object with every checked array turned back into a plain ``numpy.ndarray``."""
    key = id(obj)
    if key in seen:
        return seen[key]
    if isinstance(obj, _CheckedArray):
        out: Any = obj.view(np.ndarray)
    elif type(obj) is dict:
        out = obj
        for k, v in obj.items():
            obj[k] = _plain(v, seen)
    elif type(obj) is list:
        out = obj
        obj[:] = [_plain(v, seen) for v in obj]
    elif type(obj) is tuple:
        out = tuple(_plain(v, seen) for v in obj)
    else:
        return obj
    seen[key] = out
    return out


def safe_load(path: str | Path, encoding: str = "bytes") -> Any:
    """Unpickle ``path`` allowing only containers, scalars and numpy arrays; DataError otherwise.

    The opcode stream is checked first (``check_structure``), so a small file cannot make the loader
    allocate or hash out of proportion to its size. ``encoding="bytes"`` matches the official CIFAR
    loader: Python-2 ``str`` objects (keys, names, array buffers) come back as ``bytes``.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            try:
                check_structure(f)
            except (ValueError, IndexError, KeyError) as e:  # what genops and the stack walk raise
                at_end = f.tell() >= path.stat().st_size
                reason = "truncated" if at_end else "not a valid pickle"
                raise DataError(f"Dataset file {path} is {reason} ({e}); download it again.") from None
            f.seek(0)
            obj = _plain(_RestrictedUnpickler(f, encoding=encoding).load(), {})
    except FileNotFoundError:
        raise DataError(f"Dataset file {path} does not exist.") from None
    except RefusedGlobal as e:
        raise DataError(
            f"Refused to load {path}: it asks for {e.qualified}, which a dataset file never needs "
            "(the file may be malicious)."
        ) from None
    except Refused as e:
        raise DataError(f"Refused to load {path}: {e}.") from None
    except (EOFError, pickle.UnpicklingError) as e:
        reason = "truncated" if isinstance(e, EOFError) or "truncated" in str(e) else "not a valid pickle"
        raise DataError(f"Dataset file {path} is {reason} ({e}); download it again.") from None
    except (OSError, MemoryError) as e:
        raise DataError(f"Dataset file {path} could not be read ({type(e).__name__}: {e}).") from None
    except (ValueError, TypeError, AttributeError, IndexError, KeyError, UnicodeError) as e:
        # Malformed opcodes or bad arguments to the numpy helpers.
        raise DataError(f"Dataset file {path} is corrupt ({type(e).__name__}: {e}).") from None
    return obj

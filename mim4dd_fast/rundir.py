"""A run directory is ours or refused, and every file in it has one reader.

Ownership: ``.mim4dd-run`` (the marker, written first, checksummed; it also holds the sha256 of
config.toml and the history of resumes) says a directory is a run of ours. Any other existing,
non-empty directory is refused as ``--out`` before anything is written in it. ``.mim4dd-run.lock`` is
held (``flock``) by the one process working in the run; it records that process's pid and host, so a
second process is told who holds it. The kernel releases the lock when its holder dies, so a lock
left by a killed run (a dead pid on this host) is stale and taken over. A lock recorded by another
host cannot be checked from here and is refused with the advice to remove it. On a filesystem without
``flock`` the record alone decides: a live pid on this host (or any other host's) holds the run.

Readers: one function per file (marker, config.toml, metrics.jsonl, eval.json, manifest.json,
synthetic.safetensors; checkpoints in checkpoint.py, experts in experts.py). Each checks the file's
schema, and its checksum where we wrote one, and reports any problem as one DataError sentence that
names the file. ``inspect_run`` runs them all for ``mim4dd-fast show``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError, UserError
from .io import atomic_write_json, load_tensors, read_limited, sha256_bytes, sha256_file

MARKER = ".mim4dd-run"
LOCK = ".mim4dd-run.lock"
FORMAT = 1
# Files a finished run holds (manifest.json records the sha256 of each; it is written last).
RESULT_FILES = ("config.toml", "metrics.jsonl", "synthetic.safetensors", "synthetic.png", "eval.json")
MAX_JSON_BYTES = 64 << 20  # our JSON files are kilobytes; refuse to read anything absurdly larger
_TMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # io.atomic_write_bytes' temp files
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# -- checksummed JSON --------------------------------------------------------------------------------


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def with_checksum(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` plus ``checksum``: the sha256 of its canonical JSON (the other keys, sorted, compact)."""
    body = {k: v for k, v in obj.items() if k != "checksum"}
    return {**body, "checksum": sha256_bytes(_canonical(body))}


def read_json(path: Path, what: str) -> Any:
    """A JSON file's value; a missing file, a folder, bad bytes or bad JSON is one sentence naming it."""
    try:
        text = read_limited(path, what, MAX_JSON_BYTES).decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{what} {path} is not UTF-8 text.") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise DataError(f"{what} {path} is not valid JSON (truncated or overwritten?).") from None


def read_checked_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object written by ``with_checksum``, its checksum verified; returned without it."""
    obj = read_json(path, what)
    if not isinstance(obj, dict) or not isinstance(obj.get("checksum"), str):
        raise DataError(f"{what} {path} is not one of ours (a JSON object with a checksum).")
    body = {k: v for k, v in obj.items() if k != "checksum"}
    if sha256_bytes(_canonical(body)) != obj["checksum"]:
        raise DataError(f"{what} {path} was modified or damaged (its checksum does not match its content).")
    return body


# -- output paths ------------------------------------------------------------------------------------


def _nearest_existing(path: Path) -> Path:
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def check_output_file(path: str | os.PathLike | None, flag: str) -> Path | None:
    """Refuse an output file path that cannot be written, before any work (None passes through)."""
    if path is None:
        return None
    if str(path).strip() == "":
        raise UserError(f"{flag} is empty; give a file path.")
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {p} is a folder; give a file path.")
    if p.exists() and not os.access(p, os.W_OK):
        raise UserError(f"{flag} {p} exists and is not writable.")
    base = _nearest_existing(p.parent)
    if not base.is_dir():
        raise UserError(f"{flag} {p} cannot be created: {base} is a file, not a folder.")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {p} cannot be created: {base} is not writable.")
    return p


def check_output_dir(path: str | os.PathLike | None, flag: str) -> Path:
    """Refuse an output folder that cannot be created or written, before any work."""
    if path is None or str(path).strip() == "":
        raise UserError(f"{flag} is empty; give a folder path.")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p} exists and is not a folder.")
    base = _nearest_existing(p)
    if not base.is_dir():
        raise UserError(f"{flag} {p} cannot be created: {base} is a file, not a folder.")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {p} is not writable.")
    return p


# -- ownership: marker and lock ----------------------------------------------------------------------


def _entries(out: Path) -> list[str]:
    return [name for name in os.listdir(out) if name != LOCK and not _TMP.match(name)]


def is_run(out: Path) -> bool:
    return (out / MARKER).is_file()


def check_run_target(out: str | os.PathLike, resume: bool, marker: str = MARKER, kind: str = "run") -> Path:
    """Where a run (or a sweep: ``marker``/``kind``) may go; touches nothing.

    Fresh: a new or empty folder, or one of ours that never wrote a checkpoint. Resume: one of ours.
    Anything else, in particular a folder holding someone's files, is refused.
    """
    if str(out).strip() == "":
        raise UserError("--out is empty; give the run directory's path.")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder.")
    exists = out.is_dir()
    try:
        entries = _entries(out) if exists else []
    except OSError as exc:
        raise UserError(f"--out {out} cannot be listed ({exc.strerror}).") from None
    ours = marker in entries
    if resume:
        if not exists:
            raise UserError(f"Run directory {out} does not exist; nothing to resume.")
        if not ours:
            raise UserError(f"{out} is not a mim4dd-fast {kind} directory (no {marker} marker); nothing to resume.")
        return out
    if entries and not ours:
        raise UserError(f"--out {out} already exists and holds files that are not a mim4dd-fast {kind} "
                        f"({', '.join(sorted(entries)[:3])}{', ...' if len(entries) > 3 else ''}); choose a new or "
                        "empty folder.")
    if ours and kind == "run" and _has_progress(out):
        raise UserError(f"Run directory {out} already holds a run; pass --resume to continue it or choose another "
                        "directory.")
    check_output_dir(out, "--out")
    return out


def _has_progress(out: Path) -> bool:
    """A checkpoint or a manifest: the run got going (a run that failed before its first checkpoint, e.g. on a
    bad setting found while building it, may be started again in place)."""
    checkpoints = out / "checkpoints"
    return (out / "manifest.json").exists() or (checkpoints.is_dir() and any(checkpoints.glob("ckpt-*.json")))


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks (Linux), so a reused pid is not taken for its holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or _proc_start(pid) in (None, start)


class RunLock:
    """The lock of one run directory, held by this process until ``release()``."""

    def __init__(self, out: Path, what: str = "Run directory") -> None:
        import fcntl

        self.path = out / LOCK
        self.note = ""
        for _ in range(10):  # retry if the file we locked was replaced in between
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                record = self._record(fd) or {}
                if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    # no flock on this filesystem: the record decides (a dead pid on this host is stale)
                    if not self._recorded_alive(record):
                        self.fd = fd
                        break
                os.close(fd)
                raise UserError(f"{what} {out} is in use by pid {record.get('pid', '?')} on host "
                                f"{record.get('host', '?')}; wait for it to finish (or stop it) before starting "
                                "another process there.") from None
            same = os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino
            if not same:
                os.close(fd)
                continue
            self.fd = fd
            break
        else:
            raise UserError(f"{what} {out}: could not take its lock {self.path}; is another process starting there?")
        previous = self._record(fd)
        host = socket.gethostname()
        if previous and previous.get("host") not in (None, host):
            self.release(remove=False)
            raise UserError(f"{what} {out} is locked by pid {previous.get('pid')} on host {previous.get('host')}, "
                            f"which cannot be checked from {host}; if no process there uses it, delete {self.path}.")
        if previous:
            self.note = (f"took over the stale lock of pid {previous.get('pid')} (no longer running), "
                         "left by a run that was killed")
        info = {"pid": os.getpid(), "host": host, "started": time.time(), "proc_start": _proc_start(os.getpid())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)

    @staticmethod
    def _record(fd: int) -> dict[str, Any] | None:
        try:
            data = os.pread(fd, 4096, 0)
            record = json.loads(data) if data.strip() else None
        except (OSError, ValueError):
            return {"pid": "?"}  # a torn record: its writer died while writing it
        return record if isinstance(record, dict) else {"pid": "?"}

    @staticmethod
    def _recorded_alive(record: dict[str, Any]) -> bool:
        """Whether the process a lock record names may still run (another host's cannot be checked: yes)."""
        if not record:
            return False
        if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
            return True
        return _alive(record["pid"], record.get("proc_start"))

    def release(self, remove: bool = True) -> None:
        fd = getattr(self, "fd", None)
        if fd is None:
            return
        if remove:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        os.close(fd)
        self.fd = None


ORPHAN_DIRS = ("", "checkpoints", "experts", "experts/pending")


def clean_orphans(out: Path, subdirs: tuple[str, ...] = ORPHAN_DIRS) -> list[Path]:
    """Remove the temp files of atomic writes a killed process left behind (ours only: we hold the lock)."""
    removed = []
    for sub in subdirs:
        folder = out / sub if sub else out
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if (_TMP.match(entry.name) or entry.name.startswith(".write-probe-")) and entry.is_file():
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def write_marker(out: Path, config_text: str, history: list[dict[str, Any]] | None = None,
                 also_accept: str | None = None) -> None:
    """The marker: this folder is a run, its config.toml has this sha256 (``also_accept``: the previous one,
    while a resume rewrites config.toml), and the resumes so far."""
    from . import __version__

    atomic_write_json(out / MARKER, with_checksum({
        "format": FORMAT, "kind": "mim4dd-fast run", "version": __version__,
        "config_sha256": sha256_bytes(config_text.encode("utf-8")),
        "also_accept": [also_accept] if also_accept else [], "resumes": list(history or [])}))


def read_marker(out: Path) -> dict[str, Any]:
    marker = read_checked_json(out / MARKER, "Run marker")
    if marker.get("format") != FORMAT or not isinstance(marker.get("config_sha256"), str) \
            or not isinstance(marker.get("resumes"), list) or not isinstance(marker.get("also_accept"), list):
        raise DataError(f"Run marker {out / MARKER} has an unknown format (written by another version?).")
    return marker


# -- readers -----------------------------------------------------------------------------------------


def read_config(out: Path, marker: dict[str, Any] | None = None):
    """The run's Settings from config.toml, checked against the sha256 the marker recorded."""
    from .errors import ConfigError
    from .settings import build_settings, read_toml

    path = out / "config.toml"
    marker = read_marker(out) if marker is None else marker
    if not path.is_file():
        raise DataError(f"{path} is missing{' (it is a folder)' if path.is_dir() else ''}; the run's settings are "
                        "lost, so it cannot be resumed or evaluated.")
    try:
        digest = sha256_file(path)
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror}).") from None
    if digest != marker["config_sha256"] and digest not in marker["also_accept"]:
        raise DataError(f"{path} was modified after the run started (its sha256 differs from the one in {MARKER}); "
                        "restore it, or change settings with flags on --resume (iterations, eval_every, ...).")
    try:
        return build_settings(read_toml(path))
    except ConfigError as exc:
        raise DataError(f"{path}: {exc}") from None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """(records, torn): the metric lines in order; a torn last line (a kill mid-write) is dropped and
    reported through ``torn``; any other bad line is a DataError naming the file and line."""
    if not path.exists():
        return [], False
    if not path.is_file():
        raise DataError(f"Metrics file {path} is not a file.")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"Metrics file {path} is not UTF-8 text.") from None
    except OSError as exc:
        raise DataError(f"Metrics file {path} cannot be read ({exc.strerror}).") from None
    lines = text.split("\n")
    torn = lines[-1] != ""  # every line we write ends with a newline: a last line without one is torn
    records = []
    for number, line in enumerate(lines[:-1], start=1):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if not isinstance(record, dict) or not all(_number(v) for v in record.values()) \
                or not isinstance(record.get("iteration"), int):
            raise DataError(f"Metrics file {path} line {number} is not a metrics record (a JSON object of numbers "
                            "with an integer iteration).")
        if record["iteration"] != number:
            raise DataError(f"Metrics file {path} line {number} records iteration {record['iteration']}; lines must "
                            "count iterations 1, 2, 3, ...")
        records.append(record)
    return records, torn


def read_manifest(out: Path) -> dict[str, Any] | None:
    """The finished run's manifest (None when the run is not finished)."""
    path = out / "manifest.json"
    if not path.exists():
        return None
    manifest = read_json(path, "Run manifest")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(name in RESULT_FILES and isinstance(digest, str) and _HEX64.match(digest)
                                              for name, digest in files.items()):
        raise DataError(f"Run manifest {path} has the wrong structure (it needs 'files': {{file name: sha256}} for "
                        "the run's own files).")
    return manifest


def verify_listed(out: Path, manifest: dict[str, Any] | None, name: str) -> None:
    """DataError when ``name`` is listed in the manifest but missing or no longer matches its sha256."""
    if manifest is None or name not in manifest["files"]:
        return
    path = out / name
    if not path.is_file():
        raise DataError(f"{path} is {'a folder' if path.is_dir() else 'missing'} although manifest.json lists it.")
    try:
        digest = sha256_file(path)
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror}).") from None
    if digest != manifest["files"][name]:
        raise DataError(f"{path} was modified or damaged (its sha256 does not match manifest.json).")


def read_eval(out: Path, manifest: dict[str, Any] | None) -> dict[str, Any]:
    path = out / "eval.json"
    verify_listed(out, manifest, "eval.json")
    ev = read_json(path, "Evaluation file")
    accs = ev.get("accuracies") if isinstance(ev, dict) else None
    ok = (isinstance(accs, list) and accs and all(_number(a) and 0 <= a <= 1 for a in accs)
          and _number(ev.get("mean")) and 0 <= ev["mean"] <= 1 and _number(ev.get("std")) and ev["std"] >= 0)
    if not ok:
        raise DataError(f"Evaluation file {path} has the wrong structure (it needs mean, std and accuracies, "
                        "fractions in [0, 1]).")
    return ev


def read_synthetic(out: Path, manifest: dict[str, Any] | None) -> dict[str, Any]:
    """images [N, C, H, W] (finite floats), labels [N] (integers >= 0) and optionally syn_lr (one finite
    positive number), verified against the manifest's sha256 when the run finished."""
    import torch

    path = out / "synthetic.safetensors"
    verify_listed(out, manifest, "synthetic.safetensors")
    if path.is_dir():
        raise DataError(f"Synthetic set {path} is a folder, not a file.")
    if not path.exists():
        raise DataError(f"Synthetic set {path} is missing; the run has not finished (resume it with --resume).")
    tensors = load_tensors(path)
    images, labels, lr = tensors.get("images"), tensors.get("labels"), tensors.get("syn_lr")
    extra = sorted(set(tensors) - {"images", "labels", "syn_lr"})
    problem = None
    if images is None or labels is None:
        problem = "it needs 'images' and 'labels'"
    elif extra:
        problem = f"unexpected tensors {extra}"
    elif images.dim() != 4 or not images.dtype.is_floating_point or images.shape[0] < 1:
        problem = f"images must be floats [N, C, H, W], got {images.dtype} {list(images.shape)}"
    elif labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool \
            or labels.shape[0] != images.shape[0]:
        problem = f"labels must be {images.shape[0]} integers, got {labels.dtype} {list(labels.shape)}"
    elif int(labels.min()) < 0:
        problem = "labels must be at least 0"
    elif not bool(torch.isfinite(images).all()):
        problem = "images hold NaN or Inf values"
    elif lr is not None and (lr.numel() != 1 or not bool(torch.isfinite(lr).all()) or float(lr.flatten()[0]) <= 0):
        problem = "syn_lr must be one finite positive number"
    if problem:
        raise DataError(f"Synthetic set {path} has the wrong content ({problem}).")
    return tensors


# -- the whole directory, for `show` -----------------------------------------------------------------


@dataclass
class RunReport:
    """What ``show`` prints: (what, value) rows it could read, and one sentence per file it could not."""

    rows: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def attempt(self, fn, *args):
        try:
            return fn(*args)
        except (DataError, UserError) as exc:
            self.problems.append(str(exc))
            return None


def inspect_run(out: Path) -> RunReport:
    """Read every file of run ``out`` with its reader; never raises for a damaged file (see RunReport)."""
    from .checkpoint import inspect_checkpoints

    report = RunReport()
    if not out.is_dir():
        raise UserError(f"{out} is not a run directory (it does not exist or is not a folder).")
    if not (out / MARKER).exists():
        raise UserError(f"{out} is not a mim4dd-fast run directory (no {MARKER} marker).")
    marker = report.attempt(read_marker, out)
    settings = report.attempt(read_config, out, marker) if marker is not None else None
    if settings is not None:
        run = settings.run
        for key in ("method", "dataset", "ipc", "iterations", "seed"):
            report.rows.append((key, str(getattr(run, key))))
    manifest = report.attempt(read_manifest, out)
    if manifest is not None:
        report.attempt(verify_listed, out, manifest, "config.toml")
    found = report.attempt(read_metrics, out / "metrics.jsonl")
    if found is not None:
        report.attempt(verify_listed, out, manifest, "metrics.jsonl")
        records, torn = found
        if records:
            last = records[-1]
            report.rows.append(("iterations done", str(last["iteration"])))
            for k, v in sorted(last.items()):
                if k.startswith(("loss", "mim", "mi_est", "syn_lr")):
                    report.rows.append((f"last {k}", f"{v:.4g}"))
        if torn:
            report.rows.append(("metrics.jsonl", "last line torn (a killed run); --resume drops it"))
    newest = report.attempt(inspect_checkpoints, out / "checkpoints")
    if newest is not None:
        report.rows.append(("checkpoint", f"iteration {newest} (verified)"))
    def present(name: str) -> bool:  # on disk, or listed by the manifest (then its absence is a problem)
        return (out / name).exists() or (manifest is not None and name in manifest["files"])

    if present("eval.json"):
        ev = report.attempt(read_eval, out, manifest)
        if ev is not None:
            report.rows.append(("accuracy", f"{100 * ev['mean']:.2f}% ± {100 * ev['std']:.2f}% "
                                            f"({len(ev['accuracies'])} nets)"))
    if present("synthetic.safetensors"):
        tensors = report.attempt(read_synthetic, out, manifest)
        if tensors is not None:
            report.rows.append(("synthetic images", "x".join(map(str, tensors["images"].shape))))
    if present("synthetic.png"):
        before = len(report.problems)
        report.attempt(verify_listed, out, manifest, "synthetic.png")
        if len(report.problems) == before and (out / "synthetic.png").is_file():
            report.rows.append(("picture", "synthetic.png (in the run directory)"))
    complete = manifest is not None
    report.rows.append(("complete", "yes" if complete else "no (continue it with --resume)"))
    if marker is not None and marker["resumes"]:
        report.rows.append(("resumed", f"{len(marker['resumes'])} time(s)"))
    return report

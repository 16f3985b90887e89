"""Production distillation (`mim4dd-fast distill`): one run directory that survives crashes and can
always be resumed. The run itself comes from the run builder (runner.py); the files' readers and the
directory's ownership (marker, lock) live in rundir.py.

RUN_DIR layout (everything written atomically; ``manifest.json`` last, so a run without it is not
complete):
  .mim4dd-run          the marker, written first: this folder is a run (sha256 of config.toml, resumes)
  .mim4dd-run.lock     held by the process working in the run (pid, host); removed when it stops
  config.toml          every setting, defaults included (reproduce with --config RUN_DIR/config.toml)
  checkpoints/         ckpt-<iter>.safetensors + .json (the newest two that verify)
  experts/             MTT expert trajectories (resumable, checksummed)
  metrics.jsonl        one line per iteration: losses, MI estimates, seconds
  synthetic.safetensors  images, labels (and MTT's learned step size)
  synthetic.png        the images per class, de-normalised (ZCA inverted where used)
  eval.json            evaluation of the distilled set (mean ± std over fresh nets)
  manifest.json        versions, the resumes, and the sha256 of every file above

Resume rules (docs/reliability.md): the run's settings are its config.toml; a resume may change only
SAFE_KEYS (recorded in config.toml, the marker and the manifest), never the settings that shape the
state; it never restarts silently (every checkpoint damaged: refused, nothing changed) and never
undoes iterations (``iterations`` below the newest checkpoint: refused).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import check_state, checkpoint_path, load_latest_checkpoint, read_checkpoint, save_checkpoint
from .distributed import SINGLE, Dist
from .errors import DataError, NonFiniteError, UserError
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text, save_tensors, sha256_file
from .rundir import (
    MARKER,
    RESULT_FILES,
    RunLock,
    check_run_target,
    clean_orphans,
    read_config,
    read_manifest,
    read_marker,
    read_metrics,
    write_marker,
)
from .runner import Run, build_run, resolve_device
from .settings import Settings

MIN_FREE_BYTES = 64 * 2**20  # refuse to start with less free disk than this

RUN_FILES = RESULT_FILES
# Settings a resume may change: they decide how long and how often, never what the state is.
SAFE_KEYS = ("iterations", "eval_every", "checkpoint_every", "evals", "device")


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the run checkpointed and stopped cleanly."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def _stop_on_signals(flag: dict[str, int]):
    """Record SIGINT/SIGTERM instead of dying mid-write; the loop checkpoints and stops."""
    def handler(signum, _frame):
        flag["signum"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def to_toml(settings: Settings) -> str:
    import tomli_w

    return tomli_w.dumps(settings.to_toml_dict())


def flat_settings(settings: Settings) -> dict[str, Any]:
    """Every setting as ``{"ipc": 1, "method_config.lr_img": 100.0, ...}``."""
    out: dict[str, Any] = {}
    for key, value in settings.to_toml_dict().items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def run_identity(settings: Settings) -> dict[str, Any]:
    """What a checkpoint belongs to: every setting a resume may not change."""
    return {k: v for k, v in sorted(flat_settings(settings).items()) if k not in SAFE_KEYS}


def _shown(value: Any) -> str:
    from .bounds import short

    return short(repr(value), 40)


def settings_changes(stored: Settings, requested: Settings, out: Path) -> dict[str, list[Any]]:
    """{key: [old, new]} for the safe keys ``requested`` changes; UserError naming any other key it changes."""
    a, b = flat_settings(stored), flat_settings(requested)
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    unsafe = [k for k in differ if k not in SAFE_KEYS]
    if unsafe:
        shown = "; ".join(f"{k}: {_shown(a.get(k))} in the run, {_shown(b.get(k))} requested" for k in unsafe[:5])
        more = f" (and {len(unsafe) - 5} more)" if len(unsafe) > 5 else ""
        raise UserError(f"--resume cannot change {', '.join(unsafe[:5])}{more} of run {out} ({shown}); only "
                        f"{', '.join(SAFE_KEYS)} may change, so start a new run (another --out) for other settings.")
    return {k: [a.get(k), b.get(k)] for k in differ}


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    import json

    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_grid(images: torch.Tensor, labels: torch.Tensor, dataset, path: Path) -> None:
    """PNG grid, one row per class, de-normalised (ZCA inverted where used)."""
    import io as _io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pixels = dataset.denormalize(images.float()).cpu()
    classes = sorted(set(labels.tolist()))
    per_class = max(int((labels == c).sum()) for c in classes)
    fig, axes = plt.subplots(len(classes), per_class, figsize=(per_class * 0.9 + 1.2, len(classes) * 0.9),
                             squeeze=False)
    for row, c in enumerate(classes):
        members = pixels[labels == c]
        for col in range(per_class):
            ax = axes[row][col]
            ax.axis("off")
            if col < members.shape[0]:
                img = members[col].permute(1, 2, 0).numpy()
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                          vmin=0, vmax=1)
        axes[row][0].text(-0.6, 0.5, dataset.class_names[c][:12], transform=axes[row][0].transAxes,
                          ha="right", va="center", fontsize=8)
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_manifest(out: Path, settings: Settings, extra: dict[str, Any]) -> None:
    files = {}
    for name in RUN_FILES:
        if (out / name).exists():
            files[name] = sha256_file(out / name)
    from .profiling import environment

    env = {"mim4dd_fast": __version__, **environment(resolve_device(settings.run.device))}
    atomic_write_json(out / "manifest.json", {"environment": env, "files": files, **extra})


def _finite_logs(logs: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}


OUTLIER = 1e6  # a float setting this many times above or below its default is named as the likely cause


def outlying_settings(settings: Settings) -> list[str]:
    """Float settings over OUTLIER times away from their defaults (for the method), e.g. tau = 1e-37."""
    from .settings import build_settings

    defaults = flat_settings(build_settings({"method": settings.run.method}))
    found = []
    for key, value in flat_settings(settings).items():
        default = defaults.get(key)
        if isinstance(value, float) and isinstance(default, float) and default != 0 and value != 0:
            ratio = abs(value / default)
            if ratio > OUTLIER or ratio < 1 / OUTLIER:
                found.append(f"{key} = {value:g} (default {default:g})")
    return found


def _explain_nonfinite(settings: Settings, method, iteration: int, first: bool, message: str) -> str:
    """The NaN/Inf message, naming the likely cause: a setting far from its default, else what was still
    finite says it (a blow-up on finite images before this process updated them is not lr_img's doing)."""
    outliers = outlying_settings(settings)
    if outliers:
        return (f"{message.split(';')[0].rstrip('.')}. The likely cause is {'; '.join(outliers)}, over {OUTLIER:g} "
                "times away from the default; bring it back towards the default and start again (or resume from the "
                "last checkpoint).")
    if not bool(torch.isfinite(method.images.detach()).all()):
        return message
    mim = settings.mim
    if mim is not None and "MIM term" in message:
        return (f"The MIM term became NaN/Inf at iteration {iteration} on finite synthetic images, so the term "
                f"itself overflowed float32: its similarities are divided by tau = {mim.tau:g} (x {1 / mim.tau:.3g}) "
                f"and it is weighted by lam = {mim.lam:g}; raise tau or lower lam (or lr_head = {mim.lr_head:g}), "
                "then resume from the last checkpoint.")
    if first:
        experts = " and the expert trajectories (the learning rate they were trained with) and lr_teacher" \
            if settings.choice.spec.needs_experts else ""
        return (f"The loss became NaN/Inf at iteration {iteration}, the first step from finite synthetic images, "
                f"so the image learning rate is not the cause: check the data{experts}.")
    return message


def _check_finite(method, logs: dict[str, Any], settings: Settings, iteration: int) -> None:
    """Stop before a NaN/Inf state can be checkpointed; the last checkpoint stays the good one."""
    loss = logs.get("loss", 0.0)
    if math.isfinite(float(loss)) and bool(torch.isfinite(method.images).all()):
        return
    lr_img = getattr(settings.method_config, "lr_img", None)
    now = f" (now {lr_img:g})" if lr_img is not None else ""
    message = (f"The loss or the synthetic images became NaN/Inf at iteration {iteration}; lower lr_img{now} in "
               "[method_config] (and lr_lr for MTT), then resume from the last checkpoint.")
    raise NonFiniteError(_explain_nonfinite(settings, method, iteration, False, message))


@dataclass
class _Opened:
    """What rank 0 found when it opened the run directory (sent to every rank)."""

    settings: Settings
    start: int = 0
    changes: dict[str, list[Any]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _check_free_space(out: Path) -> None:
    probe = out if out.exists() else out.absolute().parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < MIN_FREE_BYTES:
        raise UserError(f"Run directory {out} has only {free // 2**20} MiB free; at least "
                        f"{MIN_FREE_BYTES // 2**20} MiB are needed.")


def _open_resume(requested: Settings, out: Path, held: dict[str, Any]) -> _Opened:
    """Rank 0, under the lock: read and check everything a resume needs; writes nothing."""
    marker = read_marker(out)
    stored = read_config(out, marker)
    changes = settings_changes(stored, requested, out)
    notes: list[str] = []
    found = load_latest_checkpoint(out / "checkpoints", warn=notes.append, run=run_identity(stored))
    records, torn = read_metrics(out / "metrics.jsonl")
    if torn:
        notes.append("metrics.jsonl ended in a torn line (the run was killed while writing it); it is dropped.")
    if found is None:
        if records:
            raise DataError(f"{out / 'checkpoints'} holds no checkpoint although metrics.jsonl records "
                            f"{len(records)} iterations; the checkpoints were removed, so the run cannot continue.")
        start = 0
        notes.append("no checkpoint was written yet: starting from iteration 0.")
    else:
        start, held["state"] = found
        if len(records) < start:
            raise DataError(f"{out / 'metrics.jsonl'} records {len(records)} iterations but the newest checkpoint is "
                            f"at iteration {start}; restore the file (or truncate it to whole lines) to continue.")
    if requested.run.iterations < start:
        raise UserError(f"Run {out} has done {start} iterations (its newest checkpoint); --iterations "
                        f"{requested.run.iterations} would undo some: give at least {start}.")
    if (out / "manifest.json").exists() and requested.run.iterations == start:
        read_manifest(out)
        raise UserError(f"Run {out} is already complete ({start} iterations); pass --iterations N with N > {start} to "
                        "continue it.")
    return _Opened(settings=requested, start=start, changes=changes, history=list(marker["resumes"]), notes=notes)


def _open(settings: Settings, out: Path, resume: bool, held: dict[str, Any]) -> _Opened:
    """Rank 0: check ``out`` and, for a resume, its files; take the lock. Nothing else is written."""
    check_run_target(out, resume)
    _check_free_space(out)
    if not resume:
        return _Opened(settings=settings)
    held["lock"] = RunLock(out)
    opened = _open_resume(settings, out, held)
    if held["lock"].note:
        opened.notes.insert(0, held["lock"].note + ".")
    return opened


def _claim_fresh(settings: Settings, out: Path, held: dict[str, Any]) -> None:
    """Rank 0: create the folder, lock it, then the marker (first) and config.toml."""
    check_run_target(out, resume=False)  # again: another process may have started there meanwhile
    if not out.exists():
        out.mkdir(parents=True)
        held["created"] = out
    held["lock"] = RunLock(out)
    check_run_target(out, resume=False)
    clean_orphans(out)
    text = to_toml(settings)
    write_marker(out, text)
    atomic_write_text(out / "config.toml", text)


def _commit_resume(opened: _Opened, out: Path) -> None:
    """Rank 0: the resume is accepted; record it and tidy the folder."""
    clean_orphans(out)
    if opened.changes:
        entry = {"from_iteration": opened.start, "changed": opened.changes, "time": time.time()}
        history = opened.history + [entry]
        text = to_toml(opened.settings)
        old = read_marker(out)["config_sha256"]
        write_marker(out, text, history, also_accept=old)  # a kill between the writes leaves a valid pair
        atomic_write_text(out / "config.toml", text)
        write_marker(out, text, history)
        opened.history = history
    (out / "manifest.json").unlink(missing_ok=True)  # the run is incomplete until the end
    records, _ = read_metrics(out / "metrics.jsonl")
    if (out / "metrics.jsonl").exists():
        import json

        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n"
                                                         for r in records[: opened.start]))


def _load_state(method, out: Path, start: int, settings: Settings, dist: Dist, held: dict[str, Any]) -> None:
    """Every rank loads checkpoint ``start`` (rank 0 already read it); it must fit the freshly built method."""
    if start == 0 and "state" not in held and not dist.enabled:
        return
    path = checkpoint_path(out / "checkpoints", start)
    if "state" in held:
        state = held.pop("state")
    elif start > 0:
        _, state = read_checkpoint(path, run_identity(settings))
    else:
        state = None
    starts = dist.all_gather_objects(start, "agreeing on the checkpoint to resume from")
    if len(set(starts)) != 1:
        raise UserError(f"The ranks found different checkpoints in {out / 'checkpoints'} (iterations {starts}); "
                        "is the run directory on a filesystem every rank sees the same way?")
    if state is None:
        return
    saved_world = state.pop("world_size", 1)
    if saved_world != dist.world_size:
        raise UserError(f"Run {out} was checkpointed by {saved_world} process(es) but is resumed with "
                        f"{dist.world_size}; resume it with the same number (torchrun --nproc-per-node "
                        f"{saved_world}{' ...' if saved_world > 1 else ' or no torchrun'}).")
    check_state(state, method.state_dict(), path)
    try:
        method.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise DataError(f"Checkpoint {path} does not fit this run ({type(exc).__name__}).") from None


def _save_checkpoint(method, out: Path, iteration: int, dist: Dist, identity: dict[str, Any]) -> None:
    state = {**method.state_dict(), "world_size": dist.world_size}  # state_dict is collective under torchrun
    if dist.is_main:
        save_checkpoint(out / "checkpoints", iteration, state, run=identity)


def distill(settings: Settings, out: str | Path, *, resume: bool = False, console=None,
            dist: Dist = SINGLE) -> dict[str, Any]:
    """Run (or resume) a distillation into ``out``; returns the final evaluation ({} on ranks other than 0).

    ``settings`` are the run's; on resume, the settings requested (the run's own config.toml with any
    safe changes; anything else is refused). Under torchrun (``dist`` from distributed.init_from_env) every
    rank runs this collectively: rank 0 alone checks and writes the run directory, checkpoints, metrics
    and results, and draws the progress bar.
    """
    from .bounds import check_run_memory
    from .runner import load_run_dataset

    if str(out).strip() == "":
        raise UserError("--out is empty; give the run directory's path.")
    out = Path(out)
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    held: dict[str, Any] = {}  # rank 0: the lock, the folder if we created it, the checkpoint it read
    try:
        opened = dist.on_main(lambda: _open(settings, out, resume, held), "checking the run directory")
        settings = opened.settings
        if dist.is_main:
            for note in opened.notes:
                console.print(f"note: {note}", soft_wrap=True)
        run = settings.run
        dataset = load_run_dataset(run)
        dataset.class_index.check_ipc(run.ipc)  # bad data or IPC: refused before the directory is touched
        device = resolve_device(run.device)
        dist.on_main(lambda: check_run_memory(settings, dataset, device), "checking the memory a run needs")
        if not resume:
            dist.on_main(lambda: _claim_fresh(settings, out, held), "starting the run directory")
        built = build_run(settings, dataset=dataset, experts_dir=out / "experts", dist=dist)
        method = built.method
        identity = run_identity(settings)
        _load_state(method, out, opened.start, settings, dist, held)
        if resume:
            dist.on_main(lambda: _commit_resume(opened, out), "recording the resume")
            if dist.is_main and opened.start:
                console.print(f"resuming from iteration {opened.start}")
        else:
            _save_checkpoint(method, out, 0, dist, identity)  # a good state exists from the start
        _loop(built, out, opened.start, identity, console)
        return finish_run(built, out, console, history=opened.history)
    finally:
        lock = held.get("lock")
        if lock is not None:
            lock.release()
        created = held.get("created")
        if created is not None and created.is_dir() and not any(created.iterdir()):
            created.rmdir()  # a fresh run that failed before writing anything leaves nothing behind


def _loop(built: Run, out: Path, start: int, identity: dict[str, Any], console) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    settings, method, dist = built.settings, built.method, built.dist
    run = settings.run
    stop: dict[str, int] = {}
    last_eval: dict[str, Any] | None = None
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}")]
    with _stop_on_signals(stop), Progress(*columns, console=console, transient=False,
                                          disable=not dist.is_main) as progress:
        task = progress.add_task(f"distill {run.method}", total=run.iterations, completed=start, status="")
        for it in range(start + 1, run.iterations + 1):
            t0 = time.perf_counter()
            try:
                logs = method.step()
            except NonFiniteError as exc:
                raise NonFiniteError(_explain_nonfinite(settings, method, it, it == start + 1, str(exc))) from None
            _check_finite(method, logs, settings, it)
            seconds = time.perf_counter() - t0
            record = {"iteration": it, "seconds": seconds, **_finite_logs(logs)}
            stopping = dist.any(bool(stop), "agreeing to stop")  # every rank stops at the same iteration
            if dist.is_main and run.eval_every and it % run.eval_every == 0 and it < run.iterations:
                last_eval = built.evaluate(n_nets=1, dist=SINGLE)  # rank 0 alone: a quick look
                record["eval_accuracy"] = last_eval["mean"]
            if dist.is_main:
                _append_jsonl(out / "metrics.jsonl", record)
            if it % run.checkpoint_every == 0 or it == run.iterations or stopping:
                _save_checkpoint(method, out, it, dist, identity)
            status = f"loss {record.get('loss', math.nan):.4g}"
            if last_eval is not None:
                status += f" acc {100 * last_eval['mean']:.1f}%"
            progress.update(task, advance=1, status=status)
            if stopping:
                raise Interrupted(stop.get("signum", signal.SIGTERM))


def finish_run(built: Run, out: Path, console, history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write the synthetic set, its picture, the evaluation and (last) the manifest.

    Under torchrun every rank evaluates its share of the nets; rank 0 alone writes (others return {}).
    """
    settings, dist = built.settings, built.dist
    if dist.is_main:
        tensors = built.synthetic()
        save_tensors(out / "synthetic.safetensors", tensors, metadata={"method": settings.run.method,
                                                                      "dataset": settings.run.dataset})
        save_grid(tensors["images"], tensors["labels"], built.dataset, out / "synthetic.png")
        console.print(f"evaluating the distilled set on {settings.run.evals} fresh nets ...")
    result = built.evaluate()
    if not dist.is_main:
        return {}
    atomic_write_json(out / "eval.json", {"method": settings.run.method, "dataset": settings.run.dataset,
                                          "ipc": settings.run.ipc, **result})
    write_manifest(out, settings, {"method": settings.run.method, "iterations": settings.run.iterations,
                                   "accuracy_mean": result["mean"], "accuracy_std": result["std"],
                                   "distributed": dist.describe(), "resumes": list(history or [])})
    return result


def load_settings_from_run(out: str | Path) -> Settings:
    """The run's settings (config.toml, checked against the marker); one sentence naming a bad file."""
    out = Path(out)
    if not (out / MARKER).is_file():
        raise UserError(f"{out} is not a mim4dd-fast run directory (no {MARKER} marker).")
    return read_config(out)

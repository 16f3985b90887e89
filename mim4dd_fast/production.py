"""Production distillation (`mim4dd-fast distill`): one run directory that survives crashes and can
always be resumed. The run itself comes from the run builder (runner.py).

RUN_DIR layout (everything written atomically; ``manifest.json`` last, so a run without it is not
complete):
  config.toml          every setting, defaults included (reproduce with --config RUN_DIR/config.toml)
  checkpoints/         ckpt-<iter>.safetensors + .json (the newest two that verify)
  experts/             MTT expert trajectories (resumable, checksummed)
  metrics.jsonl        one line per iteration: losses, MI bounds, seconds, memory
  synthetic.safetensors  images, labels (and MTT's learned step size)
  synthetic.png        the images per class, de-normalised (ZCA inverted where used)
  eval.json            evaluation of the distilled set (mean ± std over fresh nets)
  manifest.json        versions and the sha256 of every file above
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import load_latest_checkpoint, save_checkpoint
from .distributed import SINGLE, Dist
from .errors import NonFiniteError, UserError
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text, check_writable_dir, save_tensors, sha256_file
from .runner import Run, build_run, resolve_device
from .settings import Settings, build_settings, read_toml

MIN_FREE_BYTES = 64 * 2**20  # refuse to start with less free disk than this

RUN_FILES = ("config.toml", "metrics.jsonl", "synthetic.safetensors", "synthetic.png", "eval.json")


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


def prepare_run_dir(out: str | Path, resume: bool) -> Path:
    """Check the directory is writable and has room, before any work starts."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"Run directory {out} exists and is not a directory.")
    check_writable_dir(out)
    free = shutil.disk_usage(out).free
    if free < MIN_FREE_BYTES:
        raise UserError(f"Run directory {out} has only {free // 2**20} MiB free; at least "
                        f"{MIN_FREE_BYTES // 2**20} MiB are needed.")
    has_run = (out / "config.toml").exists()
    if has_run and not resume:
        raise UserError(f"Run directory {out} already holds a run; pass --resume to continue it or choose another "
                        "directory.")
    if resume and not has_run:
        raise UserError(f"Run directory {out} holds no run to resume (config.toml is missing).")
    return out


def _truncate_metrics(path: Path, last_iteration: int) -> None:
    """Drop metric lines past the checkpoint we resume from (and any torn last line)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if int(record.get("iteration", 0)) <= last_iteration:
            kept.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
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


def _check_finite(method, logs: dict[str, Any], settings: Settings) -> None:
    """Stop before a NaN/Inf state can be checkpointed; the last checkpoint stays the good one."""
    loss = logs.get("loss", 0.0)
    if math.isfinite(float(loss)) and bool(torch.isfinite(method.images).all()):
        return
    lr_img = getattr(settings.method_config, "lr_img", None)
    now = f" (now {lr_img})" if lr_img is not None else ""
    raise NonFiniteError(f"The loss or the synthetic images became NaN/Inf at iteration {method.iteration}; "
                         f"lower lr_img{now} in [method_config] (and lr_lr for MTT), then resume from the last "
                         "checkpoint.")


def _start_run_dir(settings: Settings, out: Path, resume: bool) -> None:
    if not resume:
        atomic_write_text(out / "config.toml", to_toml(settings))
    (out / "manifest.json").unlink(missing_ok=True)  # the run is incomplete until the end


def _resume_state(method, out: Path, dist: Dist, console) -> int:
    """Load the newest good checkpoint into ``method``; the iteration it holds (0 when there is none).

    Every rank reads the same files; the checkpoint records how many processes wrote it, and a
    different number now is refused (the per-rank work split, hence the float rounding, would change).
    """
    found = load_latest_checkpoint(out / "checkpoints",
                                   warn=lambda m: console.print(f"warning: {m}") if dist.is_main else None)
    start = 0
    if found is not None:
        start, state = found
        saved_world = int(state.pop("world_size", 1))
        if saved_world != dist.world_size:
            raise UserError(f"Run {out} was checkpointed by {saved_world} process(es) but is resumed with "
                            f"{dist.world_size}; resume it with the same number (torchrun --nproc-per-node "
                            f"{saved_world}{' ...' if saved_world > 1 else ' or no torchrun'}).")
        method.load_state_dict(state)
    starts = dist.all_gather_objects(start, "agreeing on the checkpoint to resume from")
    if len(set(starts)) != 1:
        raise UserError(f"The ranks found different checkpoints in {out / 'checkpoints'} (iterations {starts}); "
                        "is the run directory on a filesystem every rank sees the same way?")
    if dist.is_main and found is not None:
        console.print(f"resuming from iteration {start}")
    return start


def _save_checkpoint(method, out: Path, iteration: int, dist: Dist) -> None:
    state = {**method.state_dict(), "world_size": dist.world_size}  # state_dict is collective under torchrun
    if dist.is_main:
        save_checkpoint(out / "checkpoints", iteration, state)


def distill(settings: Settings, out: str | Path, *, resume: bool = False, console=None,
            dist: Dist = SINGLE) -> dict[str, Any]:
    """Run (or resume) a distillation into ``out``; returns the final evaluation ({} on ranks other than 0).

    Under torchrun (``dist`` from distributed.init_from_env) every rank runs this collectively: rank 0
    alone writes the run directory, checkpoints, metrics and results, and draws the progress bar.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .runner import load_run_dataset

    console = console or Console(stderr=True)
    out = dist.on_main(lambda: prepare_run_dir(out, resume), "checking the run directory")
    run = settings.run
    dataset = load_run_dataset(run)
    dataset.class_index.check_ipc(run.ipc)  # bad data or IPC: refused before the directory is touched
    dist.on_main(lambda: _start_run_dir(settings, out, resume), "starting the run directory")
    built = build_run(settings, dataset=dataset, experts_dir=out / "experts", dist=dist)
    method = built.method
    start = 0
    if resume:
        start = _resume_state(method, out, dist, console)
    else:
        _save_checkpoint(method, out, 0, dist)  # a good state exists from the start
    if dist.is_main:
        _truncate_metrics(out / "metrics.jsonl", start)

    stop: dict[str, int] = {}
    last_eval: dict[str, Any] | None = None
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}")]
    with _stop_on_signals(stop), Progress(*columns, console=console, transient=False,
                                          disable=not dist.is_main) as progress:
        task = progress.add_task(f"distill {run.method}", total=run.iterations, completed=start, status="")
        for it in range(start + 1, run.iterations + 1):
            t0 = time.perf_counter()
            logs = method.step()
            _check_finite(method, logs, settings)
            seconds = time.perf_counter() - t0
            record = {"iteration": it, "seconds": seconds, **_finite_logs(logs)}
            stopping = dist.any(bool(stop), "agreeing to stop")  # every rank stops at the same iteration
            if dist.is_main and run.eval_every and it % run.eval_every == 0 and it < run.iterations:
                last_eval = built.evaluate(n_nets=1, dist=SINGLE)  # rank 0 alone: a quick look
                record["eval_accuracy"] = last_eval["mean"]
            if dist.is_main:
                _append_jsonl(out / "metrics.jsonl", record)
            if it % run.checkpoint_every == 0 or it == run.iterations or stopping:
                _save_checkpoint(method, out, it, dist)
            status = f"loss {record.get('loss', math.nan):.4g}"
            if last_eval is not None:
                status += f" acc {100 * last_eval['mean']:.1f}%"
            progress.update(task, advance=1, status=status)
            if stopping:
                raise Interrupted(stop.get("signum", signal.SIGTERM))

    return finish_run(built, out, console)


def finish_run(built: Run, out: Path, console) -> dict[str, Any]:
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
                                   "distributed": dist.describe()})
    return result


def load_settings_from_run(out: str | Path) -> Settings:
    path = Path(out) / "config.toml"
    if not path.exists():
        raise UserError(f"{out} is not a run directory (config.toml is missing).")
    return build_settings(read_toml(path))

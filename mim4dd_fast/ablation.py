"""Ablation and sensitivity sweeps over MIM4DD's knobs: grid parsing, cached cells, report.

A *cell* is one setting of the swept parameters and one seed: distil, then evaluate on fresh nets.
Finished cells are cached as JSON (atomically) under ``OUT/cells/`` keyed by a hash of everything that
determines them, so an interrupted sweep resumes without recomputing them. Each cell file carries its key
and a checksum of its content (``read_cell`` checks both and the schema): a damaged or edited cell is
named and computed again, never reported.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .distributed import SINGLE, Dist, DistributedError
from .errors import ConfigError

SWEEP_MARKER = ".mim4dd-ablation"  # written first into OUT: a folder without it is not ours to write in

# parameter -> (kind, parser); kinds: "mim" settings, "method" base settings
PARAMETERS = ("beta", "tau", "lambda", "head", "head_width", "critic", "noise_ratio", "layers", "n_real",
              "lr_img", "syn_steps")

# The default sweep: one parameter at a time around the defaults (digits, under 20 min on 2 cores).
DEFAULT_SWEEP = {
    "tau": ["0.05", "0.1", "0.5"],
    "beta": ["uniform", "geometric:0.5", "geometric:2"],
    "head": ["identity", "linear", "mlp"],
    "critic": ["infonce", "nce"],
    "lambda": ["0", "0.1", "1"],
}


def _number(param: str, text: str, kind=float):
    """The grid text as a number (ranges are checked by the settings classes, once)."""
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise ConfigError(f"Grid value {_short(text)!r} for {param!r} is not a valid {kind.__name__}.") from None


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# grid name -> (table, key, number type) for the parameters that are one number
_SCALARS = {"tau": ("mim", "tau", float), "lambda": ("mim", "lam", float), "noise_ratio": ("mim", "noise_ratio", float),
            "n_real": ("mim", "n_real", int), "head_width": ("mim", "head_width", int),
            "lr_img": ("method_config", "lr_img", float), "syn_steps": ("method_config", "syn_steps", int)}


def setting_for(param: str, text: str) -> dict[str, dict[str, Any]]:
    """Translate one grid value into a settings layer ({"mim": {...}} or {"method_config": {...}}).

    Only the grid's short syntax is parsed here (``geometric:0.5``, ``mlp:64``, ``nce:4``, ``1/2/3``,
    ``blocks.0+blocks.1``); whether a value is allowed is decided by the settings classes themselves.
    """
    text = str(text).strip()
    if param in _SCALARS:
        table, key, kind = _SCALARS[param]
        return {table: {key: _number(param, text, kind)}}
    if param == "beta":
        if text.startswith("geometric"):
            _, _, value = text.partition(":")
            return {"mim": {"beta": "geometric", "beta_value": _number(param, value or "0.5")}}
        if "/" in text:
            return {"mim": {"beta_list": [_number(param, v) for v in text.split("/")]}}
        return {"mim": {"beta": text}}
    if param == "head":
        name, _, width = text.partition(":")
        return {"mim": {"head": name, **({"head_width": _number(param, width, int)} if width else {})}}
    if param == "critic":
        name, _, ratio = text.partition(":")
        return {"mim": {"critic": name, **({"noise_ratio": _number(param, ratio)} if ratio else {})}}
    if param == "layers":
        return {"mim": {"layers": None if text == "all" else [t for t in text.split("+") if t]}}
    raise ConfigError(f"Unknown grid parameter {_short(param)!r}; choose from {', '.join(PARAMETERS)}.")


def check_setting(param: str, text: str) -> None:
    """ConfigError (one sentence, naming the grid value) when a value's MIM settings are invalid."""
    from .config import from_mapping
    from .methods.mim import MIMConfig

    layer = setting_for(param, text)
    if "mim" in layer:
        try:
            from_mapping(MIMConfig, layer["mim"], what="mim setting")
        except ConfigError as exc:
            raise ConfigError(f"Grid value {_short(str(text))!r} for {param!r}: {exc}") from None


def parse_grid_args(items: list[str]) -> dict[str, list[str]]:
    """``["tau=0.05,0.1", "beta=uniform,geometric:0.5"]`` -> ordered {param: [values]} (validated)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        param, sep, values = item.partition("=")
        param = param.strip()
        if not sep or not param:
            raise ConfigError(f"Grid {item!r} must look like name=value1,value2.")
        if param not in PARAMETERS:
            raise ConfigError(f"Unknown grid parameter {param!r}; choose from {', '.join(PARAMETERS)}.")
        if param in grid:
            raise ConfigError(f"Grid parameter {param!r} is given twice.")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            raise ConfigError(f"Grid parameter {param!r} has an empty list of values.")
        for v in vals:
            check_setting(param, v)  # validate now, before any work
        grid[param] = vals
    return grid


def parse_grid_file(path: str | Path) -> dict[str, list[str]]:
    """A TOML file with a ``[grid]`` table: ``tau = [0.05, 0.1]``, ``beta = ["uniform", "geometric:0.5"]``."""
    from .settings import read_toml

    data = read_toml(path, what="Grid file")
    table = data.get("grid")
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"Grid file {path} needs a non-empty [grid] table.")
    items = []
    for key, values in table.items():
        if not isinstance(values, list):
            raise ConfigError(f"Grid parameter {key!r} in {path} must be a list.")
        items.append(f"{key}=" + ",".join(str(v).lower() if isinstance(v, bool) else str(v) for v in values))
    return parse_grid_args(items)


@dataclass(frozen=True)
class Cell:
    """One point of the sweep: the swept values (in grid order) and a seed."""

    params: tuple[tuple[str, str], ...]
    seed: int

    def overrides(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {"mim": {}, "method_config": {}}
        for param, value in self.params:
            for table, values in setting_for(param, value).items():
                out[table].update(values)
        return out

    def label(self) -> str:
        return ", ".join(f"{p}={v}" for p, v in self.params)


def make_cells(grid: dict[str, list[str]], seeds: list[int], one_at_a_time: bool = False) -> list[Cell]:
    """Product of the grid (or one parameter at a time, others at their defaults) x seeds."""
    points: list[tuple[tuple[str, str], ...]] = []
    if one_at_a_time:
        for param, values in grid.items():
            points += [((param, v),) for v in values]
    else:
        names = list(grid)
        points = [tuple(zip(names, combo, strict=True)) for combo in itertools.product(*(grid[n] for n in names))]
    return [Cell(p, s) for p in points for s in seeds]


CELL_VERSION = 3  # bump when what a cell measures changes, so old caches are not reused


def cell_key(cell: Cell, base: dict[str, Any], archs: tuple[str, ...] = ()) -> str:
    """The cache key: every resolved setting, the seed and the evaluation plan (two cells that differ
    only in their labels, e.g. the default point of two one-at-a-time sweeps, share one result)."""
    settings = cell_settings(cell, base).to_toml_dict()
    blob = json.dumps({"settings": settings, "seed": cell.seed, "archs": list(archs), "version": CELL_VERSION},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _fraction(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0


def read_cell(path: Path, key: str) -> dict[str, Any]:
    """A cached cell: its checksum, its key and its schema verified; DataError naming the file otherwise."""
    from .errors import DataError
    from .rundir import read_checked_json

    cell = read_checked_json(path, "Ablation cell")
    accs, mi = cell.get("accuracies"), cell.get("mi_est")
    ok = (cell.get("key") == key and isinstance(cell.get("params"), dict) and isinstance(cell.get("seed"), int)
          and _fraction(cell.get("accuracy_mean")) and isinstance(accs, list) and accs and all(map(_fraction, accs))
          and isinstance(mi, dict) and all(isinstance(v, (int, float)) for v in mi.values())
          and all(map(_fraction, cell.get("val_accuracies", []))))
    if not ok:
        raise DataError(f"Ablation cell {path} has the wrong content for its key (missing or out-of-range values).")
    return cell


def _cached(path: Path, key: str, warn) -> bool:
    """True when the cell at ``path`` is cached and sound; a damaged one is named through ``warn`` (recomputed)."""
    from .errors import DataError

    if not path.exists():
        return False
    try:
        read_cell(path, key)
    except DataError as exc:
        warn(f"{exc} It is computed again.")
        return False
    return True


def cell_settings(cell: Cell, base: dict[str, Any]):
    """The typed settings of one cell: the sweep's base layer, the cell's values and its seed."""
    from .settings import build_settings, merge_layers

    return build_settings(merge_layers(base, {**cell.overrides(), "seed": cell.seed}))


def stop_with_parent(parent_pid: int) -> None:
    """Worker initializer: end this sweep worker when the sweep's process dies (SIGKILL, SIGTERM), instead of
    letting it finish its cell for nobody. Linux only (prctl PR_SET_PDEATHSIG); elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before the request was registered
        os._exit(1)


def run_cell(cell: Cell, base: dict[str, Any], experts_dir: str, threads: int = 1,
             archs: tuple[str, ...] = ()) -> dict[str, Any]:
    """Distil and evaluate one cell (runs in a worker process when --workers > 1).

    The run's evaluation nets are tested on the validation split (what settings are chosen on) and on the
    test split (final tables only); ``archs`` adds nets of other architectures trained on the same set
    and tested on the test split (cross-architecture generalisation).
    """
    import torch

    from .allocator import tune
    from .runner import build_run

    tune()  # as the CLI runs (allocator.py)
    torch.set_num_threads(threads)
    settings = cell_settings(cell, base)
    t0, c0 = time.perf_counter(), time.process_time()
    run = build_run(settings, device="cpu", experts_dir=experts_dir)
    history: list[dict[str, float]] = []
    for _ in range(settings.run.iterations):
        logs = run.step()
        history.append({k: float(v) for k, v in logs.items() if isinstance(v, (int, float))})
    # CPU seconds as well as wall: cells share the machine with other workers, CPU time does not see them
    distill_seconds, distill_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    splits = run.evaluate_splits(("val", "test"))
    # other architectures: one net each (the distillation seeds replicate them)
    by_arch = {arch: run.evaluate_splits(("test",), model=arch, n_nets=1)["test"]["mean"] for arch in archs}
    eval_seconds = time.perf_counter() - t0
    tail = history[-min(5, len(history)):]
    mi = {k: sum(h[k] for h in tail) / len(tail) for k in tail[-1] if k.startswith("mi_est/")}
    test, val = splits["test"], splits["val"]
    return {"params": dict(cell.params), "seed": cell.seed, "accuracy_mean": test["mean"],
            "accuracy_std": test["std"], "accuracies": test["accuracies"], "val_accuracy_mean": val["mean"],
            "val_accuracies": val["accuracies"], "archs": by_arch, "mi_est": mi,
            "final_loss": tail[-1].get("loss"), "mim_loss": tail[-1].get("mim_loss"),
            "distill_seconds": distill_seconds, "distill_cpu_seconds": distill_cpu, "eval_seconds": eval_seconds}


def run_sweep(cells: list[Cell], base: dict[str, Any], out: Path, *, workers: int = 1, console=None,
              dist: Dist = SINGLE, archs: tuple[str, ...] = (), title: str = "ablation cells") -> list[dict] | None:
    """Run every cell not already cached in ``out/cells``; returns all results in cell order.

    Under torchrun (``dist`` enabled) this is a collective call: rank 0 decides which cells are pending
    and broadcasts the list, the pending cells are split round-robin over the ranks (``dist.owned``),
    MTT experts are built collectively first, each rank runs and caches its own cells (atomic JSON,
    recording ``"rank"``), and the results are gathered to rank 0, which also caches any it does not
    see on its filesystem. Rank 0 returns the full list (cached and new cells, in cell order) and draws
    the only progress bar; the other ranks return None. When a cell fails on some rank, that rank
    re-raises its own error and rank 0 raises a DistributedError naming the rank and the cell.
    """
    from contextlib import nullcontext

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .io import atomic_write_json
    from .rundir import with_checksum
    from .runner import load_run_dataset, resolve_experts

    experts_dir = out / "experts"
    cache = out / "cells"
    cache.mkdir(parents=True, exist_ok=True)
    keys = [cell_key(c, base, archs) for c in cells]
    # rank 0's view of the cache decides, so every rank splits the same list even if a fast rank
    # has already written a cell by the time a slow one looks
    def warn(message: str) -> None:
        if console is not None:
            console.print(f"warning: {message}", soft_wrap=True)

    # (cells with the same settings share one key: the first of them runs, the others read its result)
    pending_idx = [i for i, k in enumerate(keys) if keys.index(k) == i and not _cached(cache / f"{k}.json", k, warn)] \
        if dist.is_main else None
    pending_idx = dist.broadcast_object(pending_idx, "agreeing on the pending sweep cells")
    if pending_idx and cell_settings(cells[0], base).choice.spec.needs_experts:
        for seed in sorted({cells[i].seed for i in pending_idx}):  # once, before cells race for them (collective)
            settings = cell_settings(Cell((), seed), base)
            resolve_experts(settings, load_run_dataset(settings.run), experts_dir, "cpu", dist=dist)
        dist.barrier("waiting for the experts")
    mine = dist.owned(pending_idx)
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    progress = Progress(*columns, console=console) if dist.is_main else None
    done: dict[int, dict] = {}
    failure: tuple[int, str] | None = None  # (cell index or -1, message) when this rank's cells failed
    error: Exception | None = None
    with progress if progress is not None else nullcontext():
        task = progress.add_task(title, total=len(cells), completed=len(cells) - len(pending_idx)) \
            if progress is not None else None

        def store(i: int, result: dict) -> None:
            result = {**result, "rank": dist.rank}  # which rank ran it (0 in a single-process sweep)
            atomic_write_json(cache / f"{keys[i]}.json", with_checksum({**result, "key": keys[i]}))
            done[i] = result
            if progress is not None:
                progress.update(task, advance=1, description=f"done: {cells[i].label()} seed {cells[i].seed}")

        current = None
        try:
            if workers <= 1:
                for i in mine:
                    current = i
                    store(i, run_cell(cells[i], base, str(experts_dir), archs=archs))
            else:
                from concurrent.futures import ProcessPoolExecutor, as_completed
                from multiprocessing import get_context

                with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                         initializer=stop_with_parent, initargs=(os.getpid(),)) as pool:
                    futures = {pool.submit(run_cell, cells[i], base, str(experts_dir), 1, archs): i for i in mine}
                    for future in as_completed(futures):
                        current = futures[future]
                        store(current, future.result())
        except Exception as exc:
            if not dist.enabled:
                raise
            failure = (current if current is not None else -1, f"{type(exc).__name__}: {exc}")
            error = exc
        payload = {"rank": dist.rank, "results": done, "failure": failure}
        gathered = dist.gather_objects(payload, "gathering the sweep results")
        if error is not None:
            raise error
        if gathered is None:
            return None
        for part in gathered:
            if part["failure"] is not None:
                i, message = part["failure"]
                where = f" on cell {cells[i].label()} seed {cells[i].seed}" if i >= 0 else ""
                raise DistributedError(f"rank {part['rank']} failed{where} ({message}); the cells finished "
                                       f"before it are cached, so rerunning the same command resumes the sweep.")
            for i, result in part["results"].items():
                path = cache / f"{keys[i]}.json"
                if not path.exists():  # ranks on another filesystem: keep their cells for resuming here
                    atomic_write_json(path, with_checksum({**result, "key": keys[i]}))
        if progress is not None:
            progress.update(task, completed=len(cells), description=title)
    # a cached result may have been computed under another label (same settings): report it under this one
    return [{**read_cell(cache / f"{k}.json", k), "params": dict(c.params), "seed": c.seed}
            for k, c in zip(keys, cells, strict=True)]


def _seed_values(members: list[dict], key: str) -> list[float]:
    """One value per distillation seed (seed order): the mean over that seed's evaluation nets."""
    return [float(m[key]) for m in sorted(members, key=lambda m: m["seed"]) if m.get(key) is not None]


def summarise(results: list[dict]) -> list[dict]:
    """Group results by swept values: validation and test accuracy as mean and 95 % interval over
    distillation seeds (the unit: each seed is a new distilled set), MI estimate per layer."""
    from .stats import mean_ci

    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(tuple(sorted(r["params"].items())), []).append(r)
    rows = []
    for key, members in groups.items():
        layers = sorted({k for m in members for k in m["mi_est"]})
        val = _seed_values(members, "val_accuracy_mean")
        test = mean_ci(_seed_values(members, "accuracy_mean"))
        rows.append({"params": dict(key), "seeds": len(members), "test": test, "val": mean_ci(val) if val else None,
                     "mi_est": {k: sum(m["mi_est"].get(k, 0.0) for m in members) / len(members) for k in layers}})
    return rows


def default_value(param: str, values: list[str], base: dict[str, Any]) -> str | None:
    """The grid value that equals the base's own setting (the reference of paired differences), if any."""
    from .settings import build_settings

    settings = build_settings(base)
    for v in values:
        layer = setting_for(param, v)
        tables = {"mim": settings.mim, "method_config": settings.method_config}
        if all(tables[t] is not None and all(getattr(tables[t], k) == val for k, val in entries.items())
               for t, entries in layer.items()):
            return v
    return None


def one_at_a_time_effects(results: list[dict], grid: dict[str, list[str]], base: dict[str, Any]) -> list[dict]:
    """Per swept parameter (one at a time): each value minus the default, paired on the same seeds, on the
    validation split (where settings are chosen), and a within-seed permutation test of "this parameter
    has no effect" (Holm-adjusted over the parameters). A parameter whose values do not include the
    default, or with fewer than two common seeds, gets no test."""
    from .stats import holm, sweep_effects

    out = []
    for param, values in grid.items():
        per_value = {v: [r for r in results if r["params"] == {param: v}] for v in values}
        seeds = sorted(set.intersection(*({r["seed"] for r in rs} for rs in per_value.values())))
        default = default_value(param, values, base)
        row = {"param": param, "values": values, "default": default, "effects": None}
        key = "val_accuracy_mean" if all(r.get("val_accuracy_mean") is not None for r in results) else "accuracy_mean"
        if default is not None and len(seeds) >= 2:
            table = {v: [next(r[key] for r in rs if r["seed"] == s) for s in seeds] for v, rs in per_value.items()}
            row["effects"] = sweep_effects(table, default)
        row["split"] = "validation" if key == "val_accuracy_mean" else "test"
        out.append(row)
    tested = [r for r in out if r["effects"] is not None]
    for r, p in zip(tested, holm([r["effects"].p_no_effect for r in tested]), strict=True):
        r["p_no_effect_holm"] = p
    return out


def _order(values: list[str]) -> list[str]:
    try:
        return sorted(values, key=float)
    except ValueError:
        return values


def _pct(iv) -> str:
    from .stats import format_interval

    return "-" if iv is None else format_interval(iv, digits=2, scale=100)


def write_report(results: list[dict], grid: dict[str, list[str]], out: Path, *, title: str, command: str,
                 one_at_a_time: bool, base: dict[str, Any] | None = None) -> Path:
    """Markdown tables + PNGs: validation and test accuracy (mean, 95 % interval over seeds) and the MI
    estimate per layer vs each parameter; for one-at-a-time sweeps, each value's paired difference from
    the default and a calibrated "no effect" test (not a range/noise ratio); a heatmap for two-parameter
    products."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_write_text
    from .stats import format_difference

    rows = summarise(results)
    by_params = {tuple(sorted(r["params"].items())): r for r in rows}
    figures: list[str] = []
    params = list(grid)
    for param in params:
        values = [v for v in _order(grid[param]) if ((param, v),) in by_params or not one_at_a_time]
        if one_at_a_time:
            sub = {v: by_params[((param, v),)] for v in values if ((param, v),) in by_params}
        else:  # product grid: the marginal over the other parameters (mean of their cells' means)
            from .stats import mean_ci

            sub = {}
            for v in values:
                members = [r for r in results if r["params"].get(param) == v]
                if members:
                    by_seed: dict[int, list[dict]] = {}
                    for m in members:
                        by_seed.setdefault(m["seed"], []).append(m)
                    test = [sum(m["accuracy_mean"] for m in ms) / len(ms) for ms in by_seed.values()]
                    sub[v] = {"test": mean_ci(test), "val": None, "mi_est": {}}
        values = [v for v in values if v in sub]
        if not values:
            continue
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
        xs = range(len(values))
        for split in ("val", "test"):
            ivs = [sub[v][split] for v in values]
            if any(iv is None for iv in ivs):
                continue
            ax1.errorbar(xs, [100 * iv.mean for iv in ivs], capsize=4, marker="o",
                         yerr=[100 * iv.half_width if math.isfinite(iv.half_width) else 0 for iv in ivs],
                         label="validation" if split == "val" else "test")
        ax1.set_xticks(list(xs), values)
        ax1.set_xlabel(param)
        ax1.set_ylabel("accuracy (%), 95% CI over seeds")
        ax1.legend(fontsize=7)
        layers = sorted({k for v in values for k in sub[v]["mi_est"]})
        for layer in layers:
            ax2.plot(xs, [sub[v]["mi_est"].get(layer, math.nan) for v in values], marker="o",
                     label=layer.removeprefix("mi_est/"))
        ax2.set_xticks(list(xs), values)
        ax2.set_xlabel(param)
        ax2.set_ylabel("MI estimate log M - L (nats)")
        if layers:
            ax2.legend(fontsize=7)
        fig.tight_layout()
        name = f"{param}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        figures.append(name)

    if len(params) == 2 and not one_at_a_time:
        p1, p2 = params
        v1, v2 = _order(grid[p1]), _order(grid[p2])
        table = {(r["params"][p1], r["params"][p2]): r["test"].mean for r in rows}
        grid_vals = [[100 * table.get((a, b), math.nan) for b in v2] for a in v1]
        fig, ax = plt.subplots(figsize=(1.2 * len(v2) + 2.5, 0.8 * len(v1) + 1.8))
        im = ax.imshow(grid_vals, cmap="viridis")
        ax.set_xticks(range(len(v2)), v2)
        ax.set_yticks(range(len(v1)), v1)
        ax.set_xlabel(p2)
        ax.set_ylabel(p1)
        for i, row in enumerate(grid_vals):
            for j, val in enumerate(row):
                ax.text(j, i, f"{val:.1f}", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(im, label="test accuracy (%)")
        fig.tight_layout()
        fig.savefig(out / "heatmap.png", dpi=110)
        plt.close(fig)
        figures.append("heatmap.png")

    lines = [f"# {title}", "", f"Produced by: `{command}`", "",
             "Accuracy: mean over distillation seeds (each a new distilled set; the mean over its evaluation "
             "nets) with its 95 % t interval. Choose settings on the validation column; the test column is "
             "for final reporting only.", "",
             "| setting | validation % | test % | seeds | MI estimate per layer (nats) |", "|---|---|---|---|---|"]
    for r in rows:
        label = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        mi = ", ".join(f"{k.removeprefix('mi_est/')}: {v:.3f}" for k, v in r["mi_est"].items()) or "-"
        lines.append(f"| {label} | {_pct(r['val'])} | {_pct(r['test'])} | {r['seeds']} | {mi} |")
    if one_at_a_time and base is not None:
        lines += ["", "## Effects (paired on the same seeds, minus the default)", ""]
        for e in one_at_a_time_effects(results, grid, base):
            if e["effects"] is None:
                why = "no default among the values" if e["default"] is None else "fewer than two seeds"
                lines.append(f"- {e['param']}: no test ({why}).")
                continue
            fx = e["effects"]
            verdict = "has an effect" if e["p_no_effect_holm"] < 0.05 else "no detectable effect"
            lines += [f"### {e['param']} (default {e['default']}): {verdict} — within-seed permutation p = "
                      f"{fx.p_no_effect:.3f}, Holm-adjusted over parameters {e['p_no_effect_holm']:.3f}", "",
                      f"| value | minus default ({e['split']}, points) | paired t p (Holm over values) |",
                      "|---|---|---|"]
            for eff in fx.effects:
                lines.append(f"| {e['param']}={eff.setting} | {format_difference(eff.diff, digits=2, scale=100)} | "
                             f"{eff.p_value:.3f} ({eff.p_holm:.3f}) |")
            lines.append("")
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path

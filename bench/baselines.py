"""Our DC, DM and MTT at exactly the settings of /work/shared/ANCHORS.md, measured the same way.

Each row is one ANCHORS.md row: CIFAR-10-shaped random data (3x32x32, 10 classes, 500 real images
per class), ConvNet-3 width 128 with instance norm, DSA on; DC and DM draw 256 real images per
class; MTT trains the student on all synthetic images in every step (batch_syn None). MTT rows come
twice, with ``unroll="full"`` (the original's one big graph) and ``unroll="checkpointed"`` (exact,
one step's graph alive at a time). MTT's "expert trajectories" are random flat parameter vectors of
the right length: the cost of an iteration does not depend on their values, only on their shape.

Every row runs in a FRESH subprocess (so its peak RSS is its own). In it:
  1. data, experts and imports are set up, then the RSS is read (the baseline);
  2. the method is built; iteration 1 runs under FlopCounterMode (GFLOP/iteration; it is also the
     warm-up), iteration 2 under saved_tensors_hooks (bytes saved for backward: the most held at
     once, each storage counted once; the total ever saved is kept in the JSON), then ``--repeats``
     timed iterations (median s/iteration);
  3. peak RSS rise = the process peak over steps 2-3 (kernel VmHWM reset at the baseline, or a
     sampling thread where that is unavailable) minus the baseline.

The reference column is the ORIGINAL code's cost, typed in from ANCHORS.md (the only numbers here
that are not measured in this run); "ours/orig" is ours divided by it (below 1 = we are cheaper).

    .venv/bin/python bench/baselines.py --list                       # rows and a time estimate
    .venv/bin/python bench/baselines.py --json baselines.json        # everything (long, see --list)
    .venv/bin/python bench/baselines.py --skip dc10 --json b.json    # everything but DC IPC 10
    .venv/bin/python bench/baselines.py --rows dm1,'mtt1_*'          # a subset (names or globs)
    .venv/bin/python bench/baselines.py --smoke --repeats 1          # tiny shapes: checks it works
"""

from __future__ import annotations

import fnmatch
import gc
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ArgError, Parser, mib, random_dataset, random_experts  # noqa: E402

MiB, GiB = 2**20, 2**30


@dataclass(frozen=True)
class Anchor:
    """One ANCHORS.md row: the original code's cost per iteration (2-core CPU, 2 threads)."""

    seconds: float
    saved_bytes: float
    rss_bytes: float
    gflop: float


# Original code (MTT @50dccea, DatasetCondensation @53f63a6), from /work/shared/ANCHORS.md.
ANCHORS: dict[str, Anchor] = {
    "mtt1_s10": Anchor(0.52, 310 * MiB, 327 * MiB, 89),
    "mtt1_s20": Anchor(1.00, 617 * MiB, 630 * MiB, 178),
    "mtt1_s50": Anchor(2.44, 1540 * MiB, 1536 * MiB, 446),
    "mtt10_s10": Anchor(10.6, 2.8 * GiB, 2.9 * GiB, 892),
    "mtt10_s30": Anchor(30.6, 8.4 * GiB, 8.4 * GiB, 2677),
    "dc1": Anchor(6.8, 430 * MiB, 561 * MiB, 770),
    "dc10": Anchor(161, 659 * MiB, 789 * MiB, 21888),
    "dm1": Anchor(2.9, 16 * MiB, 275 * MiB, 262),
    "dm10": Anchor(2.8, 151 * MiB, 396 * MiB, 280),
}


@dataclass(frozen=True)
class Row:
    """One measured setting: method, IPC, the method's settings, and its ANCHORS.md row."""

    name: str
    method: str  # "dc" | "dm" | "mtt"
    ipc: int
    setting: str
    anchor: str
    config: dict[str, Any] = field(default_factory=dict)


def _mtt_rows() -> list[Row]:
    rows = []
    for ipc, steps in ((1, 10), (1, 20), (1, 50), (10, 10), (10, 30)):
        for unroll, short in (("full", "full"), ("checkpointed", "ckpt")):
            # max_start_epoch 2 keeps the random trajectories short; it does not change the cost.
            cfg = {"syn_steps": steps, "batch_syn": None, "dsa": True, "unroll": unroll, "max_start_epoch": 2,
                   "expert_epochs": 2}
            rows.append(Row(f"mtt{ipc}_s{steps}_{short}", "mtt", ipc,
                            f"{steps} steps x all {10 * ipc} images, {unroll}", f"mtt{ipc}_s{steps}",
                            cfg))
    return rows


ROWS: dict[str, Row] = {r.name: r for r in [
    *_mtt_rows(),
    Row("dc1", "dc", 1, "outer 1 / inner 1, 256 real/class", "dc1", {"batch_real": 256, "dsa": True}),
    Row("dc10", "dc", 10, "outer 10 / inner 50, 256 real/class", "dc10", {"batch_real": 256, "dsa": True}),
    Row("dm1", "dm", 1, "256 real/class", "dm1", {"batch_real": 256, "dsa": True}),
    Row("dm10", "dm", 10, "256 real/class", "dm10", {"batch_real": 256, "dsa": True}),
]}


@dataclass(frozen=True)
class Shapes:
    """Data and model size: the ANCHORS setting, or tiny for ``--smoke`` (ratios then meaningless)."""

    image_size: int = 32
    width: int = 128
    n_per_class: int = 500  # real training images per class (>= batch_real, so batches are sampled)
    batch_real: int | None = None  # None: the row's (256)

    @property
    def is_anchor_setting(self) -> bool:
        return self == Shapes()


SMOKE = Shapes(image_size=8, width=16, n_per_class=40, batch_real=16)


# -- one row, in this process ------------------------------------------------------------------------


def build(row: Row, shapes: Shapes, seed: int = 0):
    """Dataset and (for MTT) random experts: everything that exists before the RSS baseline."""
    from mim4dd_fast.methods.registry import resolve

    dataset = random_dataset(n_per_class=shapes.n_per_class, size=shapes.image_size, seed=seed)
    config = {**row.config, "width": shapes.width}
    if shapes.batch_real is not None and "batch_real" in config:
        config["batch_real"] = shapes.batch_real
    experts = None
    spec = resolve(row.method).spec
    if spec.needs_experts:
        experts = random_experts(dataset, spec.expert_plan(spec.config_class(**config), dataset), num=1, seed=seed)
    return dataset, config, experts


def measure_row(row: Row, shapes: Shapes = Shapes(), repeats: int = 3, seed: int = 0) -> dict[str, Any]:
    """Measure one row in this process (call it in a fresh process for a per-row peak RSS)."""
    import torch
    import torch.utils.flop_counter  # noqa: F401  (imports before the baseline: not the method's memory)

    import mim4dd_fast.augment  # noqa: F401
    import mim4dd_fast.methods.dc  # noqa: F401
    import mim4dd_fast.methods.dm  # noqa: F401
    import mim4dd_fast.methods.mtt  # noqa: F401
    from mim4dd_fast.methods.registry import build_method
    from mim4dd_fast.profiling import PeakRSS, SavedTensorBytes, measure_flops, rss_bytes

    dataset, config, experts = build(row, shapes, seed)
    # The first optimizer built imports torch._dynamo (~70 MiB RSS): a one-time library cost, not the method's.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    gc.collect()
    rss0 = rss_bytes()
    with PeakRSS() as peak:
        method = build_method(row.method, dataset, row.ipc, config=config, experts=experts, seed=seed)
        _, flops = measure_flops(method.step)  # iteration 1: FLOPs, and the warm-up
        with SavedTensorBytes() as saved:  # iteration 2: bytes saved for backward
            method.step()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            method.step()
            times.append(time.perf_counter() - t0)
    n_params = None
    theta_store = None
    if row.method == "mtt":
        n_params = int(sum(p.numel() for p in method.model.parameters()))
        if config["unroll"] == "checkpointed":  # flat theta_k per step, not seen by saved_tensors_hooks
            theta_store = (config["syn_steps"] + 1) * n_params * 4
    return {
        "row": row.name,
        "method": row.method,
        "ipc": row.ipc,
        "setting": row.setting,
        "config": config,
        "s_per_iter_median": statistics.median(times) if times else math.nan,
        "s_per_iter_all": times,
        "saved_peak_bytes": saved.peak,
        "saved_total_bytes": saved.total,
        "theta_store_bytes": theta_store,
        "rss_rise_bytes": max(0, peak.peak - rss0),
        "rss_method": peak.method,
        "gflop_per_iter": flops.total / 1e9,
        "flops_by_op": flops.by_op,
        "params": n_params,
        "threads": torch.get_num_threads(),
    }


def ratios(result: dict[str, Any], anchor: Anchor) -> dict[str, float]:
    """ours / original for the four figures (below 1: ours is cheaper)."""
    def r(ours: float | None, orig: float) -> float:
        return ours / orig if ours is not None and orig > 0 and math.isfinite(ours) else math.nan

    return {
        "s_per_iter": r(result.get("s_per_iter_median"), anchor.seconds),
        "saved_for_backward": r(result.get("saved_peak_bytes"), anchor.saved_bytes),
        "peak_rss_rise": r(result.get("rss_rise_bytes"), anchor.rss_bytes),
        "gflop": r(result.get("gflop_per_iter"), anchor.gflop),
    }


# -- the driver ------------------------------------------------------------------------------------


def select_rows(rows: str | None, skip: str | None) -> list[Row]:
    """Rows matching the comma list ``rows`` (names or globs; all when None) minus those in ``skip``."""
    def match(spec: str | None) -> list[str]:
        if spec is None:
            return list(ROWS)
        names: list[str] = []
        for pattern in (p.strip() for p in spec.split(",") if p.strip()):
            hits = [n for n in ROWS if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise ArgError(f"No row matches {pattern!r}; rows are: {', '.join(ROWS)}.")
            names += [n for n in hits if n not in names]
        return names

    chosen = match(rows)
    dropped = set(match(skip)) if skip else set()
    return [ROWS[n] for n in chosen if n not in dropped]


def estimate_seconds(row: Row, repeats: int) -> float:
    """Rough wall time of a row from its anchor: 2 untimed + ``repeats`` timed iterations, ~8 s start-up;
    the checkpointed unroll recomputes each step's forward, so it is counted 1.5x."""
    slower = 1.5 if row.config.get("unroll") == "checkpointed" else 1.0
    return 8.0 + (2 + repeats) * ANCHORS[row.anchor].seconds * slower


def run_worker(row: Row, args) -> dict[str, Any]:
    """Measure ``row`` in a fresh Python process; returns its JSON (or an ``error`` entry)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", row.name, "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--seed", str(args.seed)]
    if args.smoke:
        cmd.append("--smoke")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines()
        return {"row": row.name, "error": lines[-1] if lines else f"exit code {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt_s(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


def _fmt_gflop(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _fmt_ratio(x: float) -> str:
    if not math.isfinite(x):
        return "-"
    colour = "green" if x <= 1.0 else "red"
    return f"[{colour}]{x:.2f}x[/{colour}]"


def table(results: list[dict[str, Any]], shapes: Shapes, threads: int):
    from rich.table import Table

    title = (f"Our baselines vs the original code (ANCHORS.md), {threads} threads, "
             f"{'ANCHORS setting' if shapes.is_anchor_setting else 'SMOKE shapes: ratios not meaningful'}")
    t = Table(title=title, show_lines=False)
    for col, just in (("row", "left"), ("setting", "left"), ("figure", "left"), ("ours", "right"),
                      ("original code, from ANCHORS.md", "right"), ("ours/orig", "right")):
        t.add_column(col, justify=just, no_wrap=col != "setting")
    for res in results:
        row = ROWS[res["row"]]
        anchor = ANCHORS[row.anchor]
        head = [row.name, f"{row.method.upper()} IPC {row.ipc}: {row.setting}"]
        if "error" in res:
            t.add_row(*head, "[red]failed[/red]", res["error"][:80], "", "", end_section=True)
            continue
        rat = ratios(res, anchor) if shapes.is_anchor_setting else dict.fromkeys(
            ("s_per_iter", "saved_for_backward", "peak_rss_rise", "gflop"), math.nan)
        saved = mib(res["saved_peak_bytes"]) + " MiB"
        if res.get("theta_store_bytes"):
            saved += f" (+{mib(res['theta_store_bytes'])} θ)"
        figures = [
            ("s / iteration", _fmt_s(res["s_per_iter_median"]), _fmt_s(anchor.seconds), rat["s_per_iter"]),
            ("saved for backward", saved, f"{mib(anchor.saved_bytes)} MiB", rat["saved_for_backward"]),
            ("peak RSS rise", f"{mib(res['rss_rise_bytes'])} MiB", f"{mib(anchor.rss_bytes)} MiB",
             rat["peak_rss_rise"]),
            ("GFLOP / iteration", _fmt_gflop(res["gflop_per_iter"]), _fmt_gflop(anchor.gflop), rat["gflop"]),
        ]
        for i, (fig, ours, orig, ratio) in enumerate(figures):
            t.add_row(*(head if i == 0 else ["", ""]), fig, ours, orig, _fmt_ratio(ratio),
                      end_section=i == len(figures) - 1)
    return t


def build_parser() -> Parser:
    p = Parser(prog="bench/baselines.py", description="Our DC/DM/MTT at the ANCHORS.md settings vs the originals.")
    p.add_argument("--rows", default=None, help=f"comma list of row names or globs (default all): {', '.join(ROWS)}")
    p.add_argument("--skip", default=None, help="comma list of row names or globs to leave out, e.g. dc10")
    p.add_argument("--repeats", type=int, default=3, help="timed iterations per row (median; after 2 untimed)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the anchors used 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the rows (with anchors and ratios) as JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (8x8 images, width 16): checks the script runs")
    p.add_argument("--list", action="store_true", help="list the selected rows with a time estimate and exit")
    p.add_argument("--worker", default=None, help="internal: measure one row in this process, print JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.repeats < 1:
            raise ArgError(f"--repeats must be at least 1, got {args.repeats}.")
        if args.threads < 1:
            raise ArgError(f"--threads must be at least 1, got {args.threads}.")
        if args.worker is not None and args.worker not in ROWS:
            raise ArgError(f"Unknown row {args.worker!r}; rows are: {', '.join(ROWS)}.")
        rows = select_rows(args.rows, args.skip)
        if not rows:
            raise ArgError("The selection is empty after --skip; choose at least one row.")
    except ArgError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shapes = SMOKE if args.smoke else Shapes()

    if args.worker is not None:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(measure_row(ROWS[args.worker], shapes, args.repeats, args.seed)))
        return 0

    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # piped or in a log: do not squeeze the table into 80 columns
        console = Console(width=130)
    if args.list:
        total = 0.0
        for row in rows:
            est = estimate_seconds(row, args.repeats)
            total += est
            console.print(f"{row.name:16s} {row.method.upper()} IPC {row.ipc}, {row.setting}: ~{est / 60:.1f} min")
        console.print(f"total ~{total / 60:.0f} min at the anchors' speed ({args.repeats} repeats, 2 threads)")
        return 0

    results = []
    for k, row in enumerate(rows, 1):
        est = "" if args.smoke else f", ~{estimate_seconds(row, args.repeats) / 60:.1f} min at the anchors' speed"
        # A plain line, not a spinner: on 2 cores any busy parent thread slows the measured child.
        console.print(f"[{k}/{len(rows)}] {row.name}{est} ...")
        t0 = time.perf_counter()
        res = run_worker(row, args)
        res["wall_seconds"] = time.perf_counter() - t0
        if not args.smoke and "error" not in res:
            res["anchor"] = vars(ANCHORS[row.anchor]) | {"source": "original code, from ANCHORS.md"}
            res["ours_over_original"] = ratios(res, ANCHORS[row.anchor])
        results.append(res)
        status = f"[red]failed: {res['error']}[/red]" if "error" in res else "done"
        console.print(f"{row.name}: {status} ({res['wall_seconds']:.0f} s)")
    console.print(table(results, shapes, args.threads))
    if any(r.get("theta_store_bytes") for r in results):
        console.print("θ: the checkpointed unroll also keeps one flat parameter vector per student step "
                      "(not saved-for-backward, so not in the hook count; computed from the parameter count).")
    if args.json:
        from mim4dd_fast.io import atomic_write_json
        from mim4dd_fast.profiling import environment

        atomic_write_json(args.json, {"environment": environment("cpu") | {"threads": args.threads},
                                      "shapes": vars(shapes), "smoke": args.smoke, "repeats": args.repeats,
                                      "rows": results})
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

"""fp32 vs the opt-in bf16 (``precision = "bf16"``), per method: accuracy over seeds and time per iteration.

    python bench/precision.py --methods dc,dm,mtt --dataset digits --seeds 5 --json runs/bench/precision_digits.json
    python bench/precision.py --methods dm --dataset mnist5k --data-dir DATA --seeds 3

For each method, the same settings (the dataset / method / IPC preset, as ``bench/compare.py``) run twice
on the same distillation seeds: once as they are (fp32) and once with the method's ``precision`` set to
"bf16". Each run is ``bench/compare.py``'s measurement (FLOPs, memory, timed iterations, evaluation nets
per seed; evaluation in float32 either way). Reported: accuracy mean and 95% interval over seeds for
each, the paired difference bf16 - fp32 with its 95% interval (``mim4dd_fast.stats.paired_compare``), and
the ratio of median seconds per iteration. On small images (digits, 8x8) the time ratio says little:
the bf16 speed-up at CIFAR size is ``bench/baselines.py --precision bf16``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402
from _common import Parser  # noqa: E402


def build_parser() -> Parser:
    p = Parser(prog="bench/precision.py", description="fp32 vs bf16 per method: accuracy over seeds and speed.")
    p.add_argument("--methods", default="dc,dm,mtt", help="comma list of methods (default dc,dm,mtt)")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--seeds", type=int, default=5, help="distillation seeds per precision (paired)")
    p.add_argument("--iterations", type=int, default=None, help="distillation iterations (default: preset)")
    p.add_argument("--evals", type=int, default=None, help="evaluation nets per seed (default: preset or 5)")
    p.add_argument("--eval-epochs", type=int, default=None, help="evaluation epochs (default: the settings')")
    p.add_argument("--json", default=None, help="write both runs of every method and the comparison here")
    return p


def compare_args(args) -> list[str]:
    """The same choices as ``bench/compare.py`` flags (its parser validates them)."""
    argv = ["--methods", args.methods, "--dataset", args.dataset, "--ipc", str(args.ipc), "--seeds", str(args.seeds),
            "--device", "cpu"]
    for flag in ("data_dir", "iterations", "evals", "eval_epochs"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    return argv


def with_precision(settings, precision: str):
    """``settings`` with the method's precision set (re-validated by the config class)."""
    return dataclasses.replace(settings, method_config=dataclasses.replace(settings.method_config,
                                                                           precision=precision))


def summarize(fp32: dict[str, Any], bf16: dict[str, Any]) -> dict[str, Any]:
    """bf16 vs fp32 of one method: paired accuracy difference (95% interval) and the time ratio."""
    from mim4dd_fast.stats import paired_compare

    c = paired_compare(bf16["accuracy_per_seed"], fp32["accuracy_per_seed"])
    return {"method": fp32["method"], "n_seeds": c.n, "fp32_accuracy": fp32["accuracy_mean"],
            "fp32_ci95": fp32["accuracy_ci95"], "bf16_accuracy": bf16["accuracy_mean"],
            "bf16_ci95": bf16["accuracy_ci95"],
            "diff": c.diff.mean, "diff_ci95": [c.diff.low, c.diff.high], "p_t": c.p_value,
            "time_ratio": bf16["sec_per_iter_median"] / fp32["sec_per_iter_median"],
            "fp32_sec_per_iter": fp32["sec_per_iter_median"], "bf16_sec_per_iter": bf16["sec_per_iter_median"]}


def main(argv: list[str] | None = None) -> int:
    from mim4dd_fast.errors import run_command

    return run_command(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from mim4dd_fast import profiling
    from mim4dd_fast.runner import load_run_dataset

    args = build_parser().parse_args(argv)
    cargs = compare.parse_args(compare_args(args))
    console = Console(width=None if sys.stdout.isatty() else 160)
    plans = [(m, *compare.resolve_settings(m, cargs)) for m in cargs.method_list]
    dataset = load_run_dataset(plans[0][2].run)
    dataset.class_index.check_ipc(args.ipc)
    baselines: dict = {}
    rows, runs = [], []
    t0 = time.perf_counter()
    with Progress(console=Console(stderr=True), transient=True) as progress:
        for name, preset, settings in plans:
            pair = {p: compare.run_method(f"{name} ({p})", preset, with_precision(settings, p), dataset, "cpu", cargs,
                                          progress, baselines) for p in ("fp32", "bf16")}
            runs += list(pair.values())
            rows.append(summarize(pair["fp32"], pair["bf16"]) | {"method": name})
    table = Table(title=f"fp32 vs bf16 on {args.dataset}, IPC {args.ipc}, {args.seeds} paired seeds "
                        f"(accuracy %: mean [95% interval])")
    for col in ("method", "fp32", "bf16", "bf16 - fp32", "p (paired t)", "s/iter fp32", "s/iter bf16", "bf16/fp32"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        table.add_row(r["method"], compare._interval(r["fp32_accuracy"], r["fp32_ci95"]),
                      compare._interval(r["bf16_accuracy"], r["bf16_ci95"]),
                      f"{100 * r['diff']:+.1f} [{100 * r['diff_ci95'][0]:+.1f}, {100 * r['diff_ci95'][1]:+.1f}]",
                      f"{r['p_t']:.2f}", f"{r['fp32_sec_per_iter']:.4f}", f"{r['bf16_sec_per_iter']:.4f}",
                      f"{r['time_ratio']:.2f}x")
    console.print(table)
    console.print(f"total wall-clock {time.perf_counter() - t0:.0f} s")
    if args.json:
        from mim4dd_fast.io import atomic_write_json

        atomic_write_json(args.json, {"environment": profiling.environment("cpu"),
                                      "command": ["python", "bench/precision.py", *(argv or sys.argv[1:])],
                                      "comparison": rows, "runs": runs})
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

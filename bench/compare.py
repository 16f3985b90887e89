"""Methods side by side on the same data, seeds and budget, with every cost measured in this run.

    python bench/compare.py --methods mtt,mim4dd
    python bench/compare.py --methods dc,dm,mtt,mim4dd --ipc 10 --json out.json --csv out.csv
    python bench/compare.py --methods mtt,mim4dd --profile traces/   # then: tensorboard --logdir traces/

Per method, iteration 1 runs under FlopCounterMode (it is also the warm-up), iteration 2 under the
memory counters (bytes saved for backward, peak-RSS rise; CUDA max_memory_allocated on GPU), and the
remaining iterations are timed (CUDA synchronised). Then ``--evals`` fresh nets train on the
distilled set, and the random-real baseline at the same IPC is measured with the same protocol.
``--profile`` records 1 warm-up + 2 traced extra iterations per method after the evaluation, so
the accuracy always reflects exactly ``--iterations`` steps.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Parser, mib, random_dataset, random_experts, si  # noqa: E402

RANDOM = "random-cifar10"  # Gaussian CIFAR-10-shaped data for cost measurements (accuracy meaningless)

REQUIRED = ("method", "dataset", "ipc", "iterations", "sec_per_iter_median", "sec_per_iter_p90", "flops_per_iter",
            "peak_mem_bytes", "peak_mem_kind", "accuracy_mean", "accuracy_std", "random_baseline_mean")
CSV_FIELDS = (*REQUIRED, "total_seconds", "flops_per_sec", "saved_for_backward_bytes", "peak_rss_delta_bytes",
              "cuda_max_allocated_bytes", "random_baseline_std", "mi_estimate_mean", "expert_seconds",
              "eval_seconds", "device", "preset")


def build_parser() -> Parser:
    p = Parser(prog="bench/compare.py", description="Compare distillation methods with measured costs.")
    p.add_argument("--methods", required=True, help="comma list: dc, dm, mtt, dc+mim, dm+mim, mtt+mim, mim4dd")
    p.add_argument("--dataset", default=None,
                   help=f"default: the preset's, else digits; {RANDOM} = random data for cost measurements")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--ipc", type=int, default=None, help="default: the preset's, else 1")
    p.add_argument("--iterations", type=int, default=None, help="distillation iterations (default: preset)")
    p.add_argument("--evals", type=int, default=None, help="evaluation nets per method (default: preset or 5)")
    p.add_argument("--seed", type=int, default=0, help="the first distillation seed")
    p.add_argument("--seeds", type=int, default=3,
                   help="distillation seeds per method (each a new distilled set): seed, seed+1, ...; accuracy is "
                        "reported as mean and 95%% interval over them, and each method minus the first is paired "
                        "on the same seeds")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("--csv", default=None, help="write one CSV row per method here")
    p.add_argument("--profile", default=None, help="write torch.profiler traces here (TensorBoard / Perfetto)")
    p.add_argument("--preset", default=None, help="settings preset (default: the dataset/IPC preset if any)")
    # For tests and quick looks; not part of the documented interface.
    p.add_argument("--eval-epochs", type=int, default=None, help=argparse_hidden())
    p.add_argument("--cache-dir", default=None, help=argparse_hidden())
    p.add_argument("--set", action="append", default=[], metavar="[METHOD:]TABLE.KEY=VALUE",
                   help="any setting, as `mim4dd-fast distill --set` (mim.tau=0.2, method.lr_img=100); a METHOD: "
                        "prefix limits it to that method")
    return p


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


def parse_args(argv: list[str] | None):
    args = build_parser().parse_args(argv)
    from mim4dd_fast.errors import ConfigError
    from mim4dd_fast.methods.registry import canonical_name

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not names:
        raise ConfigError("--methods needs at least one method name, e.g. --methods mtt,mim4dd.")
    for m in names:
        canonical_name(m)
    if args.ipc is not None and args.ipc < 1:
        raise ConfigError(f"--ipc must be at least 1, got {args.ipc}.")
    if args.iterations is not None and args.iterations < 3:
        raise ConfigError(f"--iterations must be at least 3 (FLOPs, memory, then timed), got {args.iterations}.")
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {args.seeds}.")
    if args.evals is not None and args.evals < 1:
        raise ConfigError(f"--evals must be at least 1, got {args.evals}.")
    if args.eval_epochs is not None and args.eval_epochs < 1:
        raise ConfigError(f"--eval-epochs must be at least 1, got {args.eval_epochs}.")
    from mim4dd_fast.bounds import check_seed
    from mim4dd_fast.rundir import check_output_dir, check_output_file

    check_seed(args.seed, "--seed")
    check_seed(args.seed + args.seeds - 1, "the last distillation seed (--seed + --seeds - 1)")
    check_output_file(args.json, "--json")  # before any work: a bad path must not cost the finished results
    check_output_file(args.csv, "--csv")
    if args.profile is not None:
        check_output_dir(args.profile, "--profile")
    args.method_list = names
    return args


def resolve_settings(method: str, args):
    """(preset name, Settings) for ``method``: preset < flags < --set items (scoped ones for this method)."""
    from mim4dd_fast.errors import ConfigError
    from mim4dd_fast.settings import parse_overrides
    from mim4dd_fast.settings import resolve_settings as resolve

    flags: dict[str, Any] = {"method": method, "seed": args.seed, "device": args.device}
    for key in ("dataset", "data_dir", "ipc", "iterations", "evals"):  # given flags override the preset
        if getattr(args, key) is not None:
            flags[key] = getattr(args, key)
    if args.eval_epochs is not None:
        flags["eval"] = {"epochs": args.eval_epochs}
    extra = parse_overrides(args.set, method, args.method_list)
    name, settings = resolve(flags, extra, preset=args.preset)
    if settings.run.iterations < 3:
        raise ConfigError(f"iterations must be at least 3 for a benchmark, got {settings.run.iterations}.")
    return name, settings


# -- one method -------------------------------------------------------------------------------------


def _experts(settings, dataset, device: str, args, progress):
    """The method's expert trajectories: random ones on random data (costs do not depend on their values),
    else the library's resolver over the shared cache (``--cache-dir`` for tests)."""
    from mim4dd_fast.runner import default_experts_cache, resolve_experts

    if dataset.name == RANDOM:
        plan = settings.choice.spec.expert_plan(settings.method_config, dataset)
        return random_experts(dataset, plan, num=settings.run.num_experts, seed=settings.run.seed)
    task = progress.add_task(f"experts ({settings.run.num_experts})", total=None)

    def report(k: int, done: int, total: int) -> None:
        progress.update(task, total=settings.run.num_experts * total, completed=k * total + done)

    experts = resolve_experts(settings, dataset, args.cache_dir or default_experts_cache(), device, report)
    progress.update(task, visible=False)
    return experts


def _label(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _distill_once(name: str, settings, dataset, device: str, args, progress, measure: bool):
    """One distillation seed: (method, logs, timed seconds, FLOP report, memory report, expert seconds).
    With ``measure``, iteration 1 runs under FlopCounterMode (also the warm-up) and iteration 2 under the
    memory counters; every other iteration is timed."""
    import torch

    from mim4dd_fast import profiling
    from mim4dd_fast.runner import build_run

    run = settings.run
    t_exp = time.perf_counter()
    experts = _experts(settings, dataset, device, args, progress) if settings.choice.spec.needs_experts else None
    expert_seconds = time.perf_counter() - t_exp if experts is not None else None
    torch.manual_seed(run.seed)
    method = build_run(settings, dataset=dataset, device=device, experts=experts).method
    task = progress.add_task(f"distill {name}, seed {run.seed}", total=run.iterations)
    flops = mem = None
    logs: dict = {}
    if measure:
        logs, flops = profiling.measure_flops(method.step)
        progress.advance(task)
        logs, mem = profiling.measure_memory(method.step, device)
        progress.advance(task)
    times: list[float] = []
    for _ in range(run.iterations - (2 if measure else 0)):
        logs, dt = profiling.timed(method.step, device)
        times.append(dt)
        progress.advance(task)
    progress.update(task, visible=False)
    return method, logs, times, flops, mem, expert_seconds


def run_method(name: str, preset: str | None, settings, dataset, device: str, args, progress,
               baselines: dict) -> dict[str, Any]:
    """Distil with ``name`` on ``--seeds`` distillation seeds (each a new distilled set) and measure it;
    returns one result object of the JSON schema. Costs come from every seed's timed iterations (FLOPs and
    memory from the first seed); accuracy is the mean over each seed's evaluation nets, then mean and 95 %
    interval over seeds. Evaluation nets never share a seed across distillation seeds."""
    from mim4dd_fast import profiling
    from mim4dd_fast.evaluation import evaluate_synthetic, random_baseline
    from mim4dd_fast.stats import evaluation_seed, mean_ci

    ecfg = dataclasses.replace(settings.eval, n_nets=settings.run.evals)
    per_seed, times, expert_seconds, eval_seconds, total_seconds = [], [], [], 0.0, 0.0
    flops = mem = logs = method = None
    for k in range(args.seeds):
        seeded = dataclasses.replace(settings, run=dataclasses.replace(settings.run, seed=settings.run.seed + k))
        run = seeded.run
        t0 = time.perf_counter()
        method_k, logs_k, times_k, flops_k, mem_k, exp_s = _distill_once(name, seeded, dataset, device, args,
                                                                          progress, measure=k == 0)
        total_seconds += time.perf_counter() - t0
        if k == 0:
            method, logs, flops, mem = method_k, logs_k, flops_k, mem_k
        times += times_k
        if exp_s is not None:
            expert_seconds.append(exp_s)
        etask = progress.add_task(f"evaluate {name}, seed {run.seed}", total=ecfg.n_nets)
        t_eval = time.perf_counter()
        x, y = method_k.synthetic_set()
        acc = evaluate_synthetic(x, y, dataset, ecfg, seed=evaluation_seed(run.seed, 0), device=device,
                                 lr=method_k.learned_lr(), progress=lambda i, a, t=etask: progress.advance(t))
        eval_seconds += time.perf_counter() - t_eval
        progress.update(etask, visible=False)
        key = (run.dataset, run.data_dir, run.image_size, run.zca, run.ipc, run.seed, repr(ecfg))
        if key not in baselines:
            btask = progress.add_task(f"random-real baseline, IPC {run.ipc}, seed {run.seed}", total=ecfg.n_nets)
            baselines[key] = random_baseline(dataset, run.ipc, ecfg, seed=evaluation_seed(run.seed, 0),
                                             device=device, progress=lambda i, a, t=btask: progress.advance(t))
            progress.update(btask, visible=False)
        per_seed.append((acc, baselines[key]))
    stats = profiling.summarize_times(times)

    traces: list[str] = []
    if args.profile:
        # one sub-folder per method: torch-tb-profiler shows each as a run
        traces = [str(p) for p in profiling.trace(Path(args.profile) / _label(name), method.step, steps=2,
                                                  warmup=1, name=_label(name), device=device)]

    mi = {k.split("/", 1)[1]: float(v) for k, v in logs.items() if k.startswith("mi_est/")}
    median = stats["median"]
    seeds_acc = [a["mean"] for a, _ in per_seed]
    seeds_base = [b["mean"] for _, b in per_seed]
    acc_ci, base_ci = mean_ci(seeds_acc), mean_ci(seeds_base)
    run = settings.run
    return {
        "method": name,
        "canonical_method": settings.choice.name,
        "dataset": run.dataset,
        "ipc": run.ipc,
        "iterations": run.iterations,
        "seeds": [run.seed + k for k in range(args.seeds)],
        "timed_iterations": len(times),
        "sec_per_iter_median": median,
        "sec_per_iter_p90": stats["p90"],
        "total_seconds": total_seconds,
        "flops_per_iter": flops.total,
        "flops_per_sec": flops.total / median if median > 0 else math.nan,
        "flops_by_op": flops.by_op,
        "peak_mem_bytes": mem.peak_bytes,
        "peak_mem_kind": mem.kind,
        "saved_for_backward_bytes": mem.saved_peak,
        "peak_rss_delta_bytes": mem.rss_delta,
        "rss_method": mem.rss_method,
        "cuda_max_allocated_bytes": mem.cuda_peak,
        "accuracy_mean": acc_ci.mean,
        "accuracy_ci95": [acc_ci.low, acc_ci.high],
        "accuracy_std": float(statistics.stdev(seeds_acc)) if len(seeds_acc) > 1 else 0.0,
        "accuracy_per_seed": seeds_acc,
        "accuracies": [a for acc, _ in per_seed for a in acc["accuracies"]],
        "random_baseline_mean": base_ci.mean,
        "random_baseline_ci95": [base_ci.low, base_ci.high],
        "random_baseline_std": float(statistics.stdev(seeds_base)) if len(seeds_base) > 1 else 0.0,
        "random_baseline_per_seed": seeds_base,
        "random_baseline_accuracies": [a for _, b in per_seed for a in b["accuracies"]],
        "mi_estimate": mi or None,
        "mi_estimate_mean": (sum(mi.values()) / len(mi)) if mi else None,
        "final_loss": float(logs.get("loss", math.nan)),
        "expert_seconds": sum(expert_seconds) if expert_seconds else None,
        "eval_seconds": eval_seconds,
        "eval_nets": ecfg.n_nets,
        "eval_epochs": ecfg.epochs,
        "device": device,
        "preset": preset,
        "traces": traces,
        "settings": settings.to_toml_dict(),
    }


def paired_differences(results: list[dict]) -> list[dict]:
    """Each method minus the first, paired on the same distillation seeds (test accuracy)."""
    from mim4dd_fast.stats import paired_compare

    first = results[0]
    out = []
    for r in results[1:]:
        c = paired_compare(r["accuracy_per_seed"], first["accuracy_per_seed"])
        out.append({"method": r["method"], "versus": first["method"], "n_seeds": c.n, "diff": c.diff.mean,
                    "ci95": [c.diff.low, c.diff.high], "p_t": c.p_value, "p_sign_flip": c.permutation_p,
                    "detectable": c.detectable})
    return out


# -- output ------------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return "-"
    return f"{a / b:.2f}x"


def _interval(mean: float, ci: list[float]) -> str:
    if not all(math.isfinite(v) for v in ci):
        return f"{100 * mean:.1f} (1 seed)"
    return f"{100 * mean:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def render(results: list[dict], console) -> None:
    from rich.table import Table

    first = results[0]
    cpu = first["peak_mem_kind"] == "cpu_saved_for_backward"
    table = Table(title=f"{first['dataset']}, IPC {first['ipc']}, device {first['device']} "
                        f"(ratios: time / FLOPs / memory vs {first['method']})")
    cols = ["method", "iters", "s/it median", "s/it p90", "distill s", "FLOP/it", "FLOP/s",
            "saved for bwd MiB" if cpu else "CUDA max alloc MiB", "peak RSS rise MiB",
            f"accuracy % (95% CI, {len(first['seeds'])} seeds)", "random real %", "MI estimate (nats)",
            f"vs {first['method']}"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("method", "MI estimate (nats)") else "right")
    for r in results:
        mi = "-"
        if r["mi_estimate"]:
            mi = " ".join(f"{k}:{v:.3f}" for k, v in r["mi_estimate"].items())
        table.add_row(
            r["method"], str(r["iterations"]), f"{r['sec_per_iter_median']:.3f}", f"{r['sec_per_iter_p90']:.3f}",
            f"{r['total_seconds']:.1f}", si(r["flops_per_iter"]), si(r["flops_per_sec"]), mib(r["peak_mem_bytes"]),
            mib(r["peak_rss_delta_bytes"]),
            _interval(r["accuracy_mean"], r["accuracy_ci95"]),
            _interval(r["random_baseline_mean"], r["random_baseline_ci95"]), mi,
            " / ".join(_ratio(r[k], first[k]) for k in ("sec_per_iter_median", "flops_per_iter", "peak_mem_bytes")),
        )
    console.print(table)
    diffs = paired_differences(results)
    if diffs:
        paired = Table(title=f"paired on the same distillation seeds: accuracy minus {first['method']} (test split)")
        for c in ("method", "difference (points)", "95% CI", "p (paired t)", "p (sign flip)", "verdict"):
            paired.add_column(c, justify="left" if c in ("method", "verdict") else "right")
        for d in diffs:
            low, high = d["ci95"]
            paired.add_row(d["method"], f"{100 * d['diff']:+.2f}", f"[{100 * low:+.2f}, {100 * high:+.2f}]",
                           f"{d['p_t']:.3f}", f"{d['p_sign_flip']:.3f}",
                           "detectable" if d["detectable"] else "no detectable effect")
        console.print(paired)
    kind = ("memory = peak bytes held for backward (saved_tensors_hooks, each storage once); peak RSS rise = "
            "process peak resident set over the same iteration minus its start") if cpu else (
            "memory = torch.cuda.max_memory_allocated over one iteration")
    console.print(f"[dim]{kind}; FLOPs by torch.utils.flop_counter.FlopCounterMode over one iteration.[/dim]")


def write_json(path: str, env: dict, results: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    doc = {"environment": env, "results": results, "paired_differences": paired_differences(results)}
    Path(path).write_text(json.dumps(doc, indent=2, default=str) + "\n")


def write_csv(path: str, results: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in results:
            w.writerow({k: r.get(k) for k in CSV_FIELDS})


def main(argv: list[str] | None = None) -> int:
    from mim4dd_fast.errors import run_command

    return run_command(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from mim4dd_fast import __version__, profiling
    from mim4dd_fast.allocator import tune
    from mim4dd_fast.runner import load_run_dataset, resolve_device

    tune()  # as the CLI runs (mim4dd_fast/allocator.py; MIM4DD_MALLOC=system to compare without)

    console = Console(width=None if sys.stdout.isatty() else 200)
    err = Console(stderr=True)
    args = parse_args(argv)
    device = resolve_device(args.device)
    plans = [(m, *resolve_settings(m, args)) for m in args.method_list]
    env = {"mim4dd_fast": __version__, **profiling.environment(device)}
    budgets = {name: s.run.iterations for name, _, s in plans}
    if len(set(budgets.values())) > 1:
        console.print(f"note: the methods run different budgets {budgets} (their presets); "
                      "give --iterations to compare at the same budget.")
    first = plans[0][2].run
    console.print(f"[bold]compare[/bold] {', '.join(args.method_list)} on {first.dataset}, IPC {first.ipc}; "
                  f"torch {env['torch']}, {env['device_name']}, {env['threads']} threads")
    datasets: dict = {}
    baselines: dict = {}
    results = []
    t_all = time.perf_counter()
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=err, transient=True) as progress:
        for name, preset, settings in plans:
            run = settings.run
            dkey = (run.dataset, run.data_dir, run.image_size, run.zca, run.seed)
            if dkey not in datasets:
                datasets[dkey] = (random_dataset(RANDOM, seed=run.seed) if run.dataset == RANDOM
                                  else load_run_dataset(run))
            dataset = datasets[dkey]
            dataset.class_index.check_ipc(run.ipc)
            results.append(run_method(name, preset, settings, dataset, device, args, progress, baselines))
    env["wall_seconds"] = time.perf_counter() - t_all
    render(results, console)
    console.print(f"total wall-clock {env['wall_seconds']:.1f} s (experts, distillation, evaluation)")
    if args.json:
        write_json(args.json, env, results)
        console.print(f"wrote {args.json}")
    if args.csv:
        write_csv(args.csv, results)
        console.print(f"wrote {args.csv}")
    if args.profile:
        console.print(f"traces in {args.profile}: view with  tensorboard --logdir {args.profile}  "
                      f"(needs torch-tb-profiler), or open the .pt.trace.json files in https://ui.perfetto.dev")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

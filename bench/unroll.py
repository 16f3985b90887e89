"""Checkpointed vs full MTT unroll: seconds per iteration, bytes saved for backward, peak RSS rise.

CIFAR-10-shaped random data by default (3x32x32, 10 classes, ConvNet-3 width 128, IPC 10, all
synthetic images in every student step, DSA on): the setting of the MTT rows in bench/baselines.py.
Each (mode, syn_steps) setting runs in a fresh subprocess so its peak RSS is its own.

Measured per setting (one warm-up iteration, then the median of ``--repeats``):
* s/iteration: one unroll with its gradient for the images and the step size;
* saved peak: the most bytes saved for backward alive at once (saved_tensors_hooks, each storage
  counted once); for ``checkpointed`` this includes the buffer of stored parameter vectors theta_k,
  since each recomputed step saves views of it;
* peak RSS rise: ru_maxrss at the end minus the RSS after setup.

Targets: checkpointed peak RSS at the largest syn_steps <= 1.3x its value at the smallest, and
checkpointed time <= 1.6x full at the same setting.

    .venv/bin/python bench/unroll.py                          # full measurement (long: minutes)
    .venv/bin/python bench/unroll.py --syn-steps 2 4 --ipc 1 --width 16 --image-size 16   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def worker(args: argparse.Namespace) -> dict:
    """One setting, in this process: returns the measurements as a dict."""
    from mim4dd_fast.methods.mtt import UNROLLS
    from mim4dd_fast.models import build_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = args.classes * args.ipc
    model = build_model(args.channels, args.classes, args.image_size, width=args.width, depth=args.depth)
    model.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    target = start + 0.01 * torch.randn(n_params)
    images = torch.randn(n, args.channels, args.image_size, args.image_size, requires_grad=True)
    labels = torch.arange(args.classes).repeat_interleave(args.ipc)
    syn_lr = torch.tensor(0.01, requires_grad=True)
    gen = torch.Generator().manual_seed(1)
    unroll = UNROLLS[args.mode]
    import mim4dd_fast.augment  # noqa: F401  (imported before the baseline, as in a real run)
    from mim4dd_fast.profiling import PeakRSS, SavedTensorBytes

    def one(count_saved: bool) -> tuple[float, int]:
        batches = [(torch.randperm(n, generator=gen), int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                   for _ in range(args.syn_steps)]
        t0 = time.perf_counter()
        if count_saved:
            with SavedTensorBytes() as counter:
                unroll(model, start, target, images, labels, syn_lr, batches)
            return time.perf_counter() - t0, counter.peak
        unroll(model, start, target, images, labels, syn_lr, batches)
        return time.perf_counter() - t0, 0

    _, saved_peak = one(count_saved=True)  # warm-up, and the saved-for-backward count
    # RSS and time without the counting hooks: the hooks' own bookkeeping would inflate RSS
    with PeakRSS() as rss:
        runs = [one(count_saved=False) for _ in range(args.repeats)]
    return {
        "mode": args.mode,
        "syn_steps": args.syn_steps,
        "ipc": args.ipc,
        "images_per_step": n,
        "params": n_params,
        "s_per_iter": statistics.median(r[0] for r in runs),
        "saved_peak_bytes": saved_peak,
        "rss_rise_bytes": rss.delta,
        "rss_method": rss.method,
    }


def _mib(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    from mim4dd_fast.errors import run_command

    return run_command(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    from mim4dd_fast.errors import OneSentenceParser

    p = OneSentenceParser(description=__doc__.split("\n")[0])
    p.add_argument("--syn-steps", type=int, nargs="+", default=[10, 20, 40, 80])
    p.add_argument("--modes", nargs="+", default=["checkpointed", "full"], choices=["checkpointed", "full"])
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--json", default=None, help="write all rows as JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="checkpointed", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.syn_steps = args.syn_steps[0]
        print(json.dumps(worker(args)))
        return 0

    from rich.console import Console
    from rich.table import Table

    console = Console()
    common = ["--ipc", args.ipc, "--classes", args.classes, "--channels", args.channels, "--image-size",
              args.image_size, "--width", args.width, "--depth", args.depth, "--repeats", args.repeats,
              "--threads", args.threads]
    rows = []
    for steps in args.syn_steps:
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--syn-steps", steps, *common]
            with console.status(f"{mode}, syn_steps {steps}"):
                out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
            if out.returncode != 0:
                console.print(f"[red]{mode} syn_steps {steps} failed:[/red] {out.stderr.strip()[-2000:]}")
                return 1
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))

    table = Table(title=f"MTT unroll, {args.channels}x{args.image_size}x{args.image_size}, ConvNet-{args.depth} "
                        f"width {args.width}, IPC {args.ipc}, {args.threads} threads")
    for col in ("mode", "syn_steps", "s / iteration", "saved for backward (peak)", "peak RSS rise"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["mode"], str(r["syn_steps"]), f"{r['s_per_iter']:.3f}", _mib(r["saved_peak_bytes"]),
                      _mib(r["rss_rise_bytes"]))
    console.print(table)

    checks = {}
    ck = {r["syn_steps"]: r for r in rows if r["mode"] == "checkpointed"}
    full = {r["syn_steps"]: r for r in rows if r["mode"] == "full"}
    if len(ck) >= 2:
        lo, hi = min(ck), max(ck)
        ratio = ck[hi]["rss_rise_bytes"] / max(ck[lo]["rss_rise_bytes"], 1)
        checks[f"checkpointed peak RSS, syn_steps {hi} / {lo}"] = (ratio, 1.3)
    for s in sorted(set(ck) & set(full)):
        checks[f"checkpointed / full time, syn_steps {s}"] = (ck[s]["s_per_iter"] / full[s]["s_per_iter"], 1.6)
    for name, (value, limit) in checks.items():
        verdict = "[green]ok[/green]" if value <= limit else "[red]over target[/red]"
        console.print(f"{name}: {value:.2f} (target <= {limit}) {verdict}")
    if args.json:
        from mim4dd_fast.io import atomic_write_json

        atomic_write_json(args.json, {"rows": rows, "checks": {k: {"value": v, "target": t}
                                                                 for k, (v, t) in checks.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())

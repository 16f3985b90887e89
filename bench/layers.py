"""Where an MTT iteration goes: torch's ConvNet layers vs ours (mim4dd_fast/layers.py), glibc's heap vs tuned.

    python bench/layers.py                         # mtt1_s10_full: the four variants, 2 rounds
    python bench/layers.py --rows mtt1_s10_full,dc1 --rounds 3 --json runs/bench/layers.json
    python bench/layers.py --smoke --rounds 1 --repeats 1      # tiny shapes: checks the script runs

One bench/baselines.py row of OUR method (CIFAR-10 shapes, ConvNet-3 width 128, DSA) timed four ways,
each in a fresh process (the heap setting is per process), interleaved over ``--rounds``:

    layers  torch: the ConvNet with nn.GroupNorm / nn.AvgPool2d (the originals' layers)
            ours:  InstanceNorm / AvgPool2 (a fused first-order norm backward under create_graph, a
                   hand-written second derivative, strided-add pooling)
    heap    system: glibc's defaults (MIM4DD_MALLOC=system)
            tuned:  mim4dd_fast/allocator.py (what the CLI and bench/compare.py run with)

Per process: 2 untimed iterations, then the median of ``--repeats`` timed ones; per variant the median
over rounds. The op-level profile of one variant: ``--profile VARIANT`` (e.g. ``torch/system``) prints
torch.profiler's table of two iterations, the self time per op.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ArgError, Parser  # noqa: E402

VARIANTS = ("torch/system", "ours/system", "torch/tuned", "ours/tuned")


def build_parser() -> Parser:
    p = Parser(prog="bench/layers.py", description="torch's ConvNet layers vs ours, glibc's heap vs tuned.")
    p.add_argument("--rows", default="mtt1_s10_full", help="comma list of bench/baselines.py rows (ours side)")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per variant, interleaved (median)")
    p.add_argument("--repeats", type=int, default=5, help="timed iterations per process (median; after 2 untimed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny shapes (baselines.SMOKE): checks the script runs")
    p.add_argument("--profile", default=None, choices=VARIANTS, help="print the op profile of one variant and exit")
    p.add_argument("--worker", default=None, help="internal: ROW:VARIANT measured in this process")
    return p


def _step(row_name: str, layers: str, smoke: bool = False):
    import baselines

    row = baselines.ROWS[row_name]
    step, _ = baselines.build_ours(row, baselines.SMOKE if smoke else baselines.Shapes())()
    if layers == "torch":
        from mim4dd_fast.layers import with_torch_layers

        method = step.__self__
        nets = [m for m in (getattr(method, "model", None), getattr(method, "net", None)) if m is not None]
        if not nets and hasattr(method, "fresh_net"):  # DC/DM build a fresh net each iteration
            build = method.fresh_net
            method.fresh_net = lambda *a, **k: with_torch_layers(build(*a, **k))
        for net in nets:
            with_torch_layers(net, in_place=True)
    return step


def worker(spec: str, repeats: int, threads: int, smoke: bool = False) -> dict[str, Any]:
    import torch

    from mim4dd_fast.allocator import tune

    row_name, variant = spec.split(":")
    layers, heap = variant.split("/")
    tuned = tune()  # MIM4DD_MALLOC (set by the parent) decides
    assert tuned == (heap == "tuned"), "the heap setting did not take"
    torch.set_num_threads(threads)
    step = _step(row_name, layers, smoke)
    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"row": row_name, "variant": variant, "s_per_iter": statistics.median(times), "all": times}


def run(spec: str, args) -> dict[str, Any]:
    heap = spec.rsplit("/", 1)[1]
    env = {**os.environ, "MIM4DD_MALLOC": heap}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", spec, "--repeats", str(args.repeats),
           "--threads", str(args.threads)] + (["--smoke"] if args.smoke else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines()
        return {"spec": spec, "error": lines[-1] if lines else f"exit code {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from mim4dd_fast.errors import run_command

    return run_command(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    import baselines

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for r in rows:
        if r not in baselines.ROWS:
            raise ArgError(f"Unknown row {r!r}; rows are: {', '.join(baselines.ROWS)}.")
    for flag in ("rounds", "repeats", "threads"):
        if getattr(args, flag) < 1:
            raise ArgError(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.repeats, args.threads, args.smoke)))
        return 0
    if args.profile is not None:
        return _profile(rows[0], args)
    results: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
        for row in rows:
            for variant in order:
                res = run(f"{row}:{variant}", args)
                if "error" in res:
                    print(f"{row} {variant}: failed: {res['error']}")
                    continue
                results.setdefault((row, variant), []).append(res["s_per_iter"])
                print(f"round {r + 1}: {row} {variant}: {res['s_per_iter']:.3f} s/iter", flush=True)
    summary = []
    print("\n| row | layers / heap | s/iter (median over rounds) | vs torch/system |\n|---|---|---|---|")
    for row in rows:
        base = statistics.median(results.get((row, "torch/system"), [float("nan")]))
        for variant in VARIANTS:
            xs = results.get((row, variant), [])
            s = statistics.median(xs) if xs else float("nan")
            summary.append({"row": row, "variant": variant, "s_per_iter": s, "rounds": xs})
            print(f"| {row} | {variant} | {s:.3f} ({min(xs, default=s):.3f}-{max(xs, default=s):.3f}) | "
                  f"{s / base:.2f}x |")
    if args.json:
        from mim4dd_fast.io import atomic_write_json
        from mim4dd_fast.profiling import environment

        atomic_write_json(args.json, {"environment": environment("cpu") | {"threads": args.threads},
                                      "command": ["python", "bench/layers.py", *(argv or sys.argv[1:])],
                                      "repeats": args.repeats, "rounds": args.rounds, "smoke": args.smoke,
                                      "results": summary})
    return 1 if any(len(r["rounds"]) < args.rounds for r in summary) else 0


def _profile(row: str, args) -> int:
    """The op table of two iterations of one variant, in a fresh process with that heap setting."""
    if os.environ.get("MIM4DD_MALLOC") != args.profile.split("/")[1]:
        env = {**os.environ, "MIM4DD_MALLOC": args.profile.split("/")[1]}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--rows", row, "--profile", args.profile,
               "--threads", str(args.threads)] + (["--smoke"] if args.smoke else [])
        return subprocess.run(cmd, env=env).returncode
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mim4dd_fast.allocator import tune

    tune()
    torch.set_num_threads(args.threads)
    step = _step(row, args.profile.split("/")[0], args.smoke)
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return 0


if __name__ == "__main__":
    sys.exit(main())

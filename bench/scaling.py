"""Expert generation on N processes (torchrun, gloo) vs one process, on this machine, end to end.

Each configuration runs the real CLI as a user would, in a fresh output directory, ``--repeats``
times (the median is reported):

* ``single, default threads``: ``python -m mim4dd_fast experts ...`` with torch's default thread count;
* ``single, 1 thread``:       the same with OMP_NUM_THREADS=1;
* ``torchrun N x 1 thread``:  ``python -m torch.distributed.run --standalone --nproc-per-node N -m mim4dd_fast
  experts ...`` (torchrun gives every rank OMP_NUM_THREADS=1; set here explicitly).

``wall`` is the whole command (process start, imports, dataset, process-group join, training, the
manifest). ``fixed`` is the same command rerun on the finished directory, where nothing is left to
train (everything but the training), so ``train = wall - fixed`` is the part that parallelises.
The expert files of the 1-thread run and the N-process run are compared byte for byte (expert k is
seeded seed + k on whichever rank trains it; the thread count changes float reductions, so the
default-thread run is not expected to match them).

    .venv/bin/python bench/scaling.py                                   # digits, 4 experts, 15 epochs, width 128
    .venv/bin/python bench/scaling.py --experts 2 --epochs 1 --width 16 --repeats 1 --json /tmp/s.json   # smoke
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, ArgError, Parser, write_json_result  # noqa: E402


def build_parser() -> Parser:
    p = Parser(prog="bench/scaling.py", description="Speed-up of expert generation with torchrun vs one process.")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--experts", type=int, default=4, help="number of experts (spread over the processes)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--nproc", type=int, default=2, help="torchrun processes (one thread each)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dist-timeout", type=float, default=600.0)
    p.add_argument("--json", default="runs/bench/scaling.json", help="write the results here ('' to skip)")
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one, removed)")
    return p


def _env(threads: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                        "MASTER_PORT")}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _timed(cmd: list[str], env: dict[str, str], failures: list[dict], clear: Path | None = None) -> float:
    """Seconds of one run (``clear`` removed first). A failed run is recorded in ``failures`` and run again."""
    for _ in range(3):
        if clear is not None:
            shutil.rmtree(clear, ignore_errors=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode == 0:
            return seconds
        failures.append({"command": shlex.join(cmd), "exit_code": proc.returncode, "seconds": seconds,
                         "stderr_tail": proc.stderr[-1500:]})
        print(f"  run failed (exit code {proc.returncode}); recorded and run again", flush=True)
    raise RuntimeError(f"{shlex.join(cmd)} failed 3 times:\n{proc.stderr[-3000:]}")


def _shas(out: Path) -> dict[str, str]:
    return json.loads((out / "manifest.json").read_text())["experts"]


def _ratio(a: float, b: float) -> float | None:
    """a / b, or None when a run was too short for ``wall - fixed`` to be positive (noise)."""
    return a / b if a > 0 and b > 0 else None


def main(argv: list[str] | None = None) -> int:
    from mim4dd_fast.errors import run_command

    return run_command(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("experts", "epochs", "width", "nproc", "repeats"):
        if getattr(args, flag) < 1:
            raise ArgError(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    import torch

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="scaling-"))
    py = sys.executable
    cli = ["experts", "--dataset", args.dataset, "--num-experts", str(args.experts), "--epochs", str(args.epochs),
           "--width", str(args.width), "--device", "cpu", "--seed", "0"]
    configs = [
        ("single, default threads", None, [py, "-m", "mim4dd_fast", *cli]),
        ("single, 1 thread", 1, [py, "-m", "mim4dd_fast", *cli]),
        (f"torchrun {args.nproc} x 1 thread", 1,
         [py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}", "-m", "mim4dd_fast",
          *cli, "--dist-timeout", f"{args.dist_timeout:g}"]),
    ]
    load_before = os.getloadavg()
    rows: list[dict] = []
    failures: list[dict] = []
    try:
        for name, threads, cmd in configs:
            walls, fixed = [], []
            out = work / name.replace(" ", "_").replace(",", "")
            for _ in range(args.repeats):
                walls.append(_timed([*cmd, "--out", str(out)], _env(threads), failures, clear=out))
                fixed.append(_timed([*cmd, "--out", str(out)], _env(threads), failures))  # nothing left to train
            row = {"config": name, "omp_num_threads": threads, "processes": args.nproc if "torchrun" in name else 1,
                   "command": shlex.join([*([f"OMP_NUM_THREADS={threads}"] if threads else []), *cmd, "--out", "OUT"]),
                   "wall_s": walls, "fixed_s": fixed, "wall_median_s": statistics.median(walls),
                   "fixed_median_s": statistics.median(fixed), "shas": _shas(out)}
            row["train_median_s"] = row["wall_median_s"] - row["fixed_median_s"]
            rows.append(row)
            print(f"{name:26s} wall {row['wall_median_s']:7.2f} s ({min(walls):.2f}-{max(walls):.2f})  "
                  f"fixed {row['fixed_median_s']:6.2f} s ({min(fixed):.2f}-{max(fixed):.2f})  "
                  f"train {row['train_median_s']:7.2f} s", flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    base_default, base_one, multi = rows
    result = {
        "what": f"{args.dataset}, {args.experts} experts x {args.epochs} epochs, ConvNet width {args.width}, CPU",
        "bench_command": shlex.join([py, "bench/scaling.py", *(argv if argv is not None else sys.argv[1:])]),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_default_threads": torch.get_num_threads(),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "repeats": args.repeats,
        "rows": [{k: v for k, v in r.items() if k != "shas"} for r in rows],
        "speedup_wall_vs_default_threads": base_default["wall_median_s"] / multi["wall_median_s"],
        "speedup_wall_vs_1_thread": base_one["wall_median_s"] / multi["wall_median_s"],
        "speedup_train_vs_default_threads": _ratio(base_default["train_median_s"], multi["train_median_s"]),
        "speedup_train_vs_1_thread": _ratio(base_one["train_median_s"], multi["train_median_s"]),
        "files_identical_1_thread_vs_torchrun": base_one["shas"] == multi["shas"],
        "files_identical_default_threads_vs_1_thread": base_default["shas"] == base_one["shas"],
        "failed_runs": failures,  # not timed; each was run again
    }
    for key in ("speedup_wall_vs_default_threads", "speedup_wall_vs_1_thread", "speedup_train_vs_default_threads",
                "speedup_train_vs_1_thread", "files_identical_1_thread_vs_torchrun",
                "files_identical_default_threads_vs_1_thread"):
        value = result[key]
        print(f"{key}: {value:.2f}x" if isinstance(value, float) else f"{key}: {value}")  # None: too short
    if failures:
        print(f"{len(failures)} run(s) failed and were run again (see failed_runs in the JSON)")
    print(f"load average before/after: {load_before} / {result['loadavg_after']}")
    if args.json:
        write_json_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

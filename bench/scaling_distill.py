"""Data-parallel distillation on N processes (torchrun, gloo) vs one process: seconds per iteration.

For each method, the real CLI runs ``mim4dd-fast distill`` on the embedded digits (the method's
default preset, ``--iterations K``) as one process with torch's default threads, as one process on
one thread, and under ``torchrun --nproc-per-node N`` (one thread per rank). The figure is the
median of rank 0's per-iteration ``seconds`` in metrics.jsonl over the iterations after the first
two (start-up, expert training and the final evaluation are excluded: bench/scaling.py measures
whole commands). The final synthetic images of the 1-thread and N-process runs are compared.

    .venv/bin/python bench/scaling_distill.py                      # mim4dd and dm at IPC 10, 30 iterations
    .venv/bin/python bench/scaling_distill.py --methods dm --ipc 1 --iterations 4 --json ''   # smoke
    .venv/bin/python bench/scaling_distill.py --shape cifar --methods mtt --iterations 4   # 32x32 RGB, width 128

``--shape cifar`` writes a random image folder (10 classes x 50 RGB 32x32 PNGs) and distils it with
a CIFAR-sized student (ConvNet width 128, depth 3, 5 student steps per iteration, one 2-epoch
expert): per-step work large enough for splitting the minibatch to matter.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, ArgError, Parser, write_json_result  # noqa: E402
from scaling import _env  # noqa: E402


def build_parser() -> Parser:
    p = Parser(prog="bench/scaling_distill.py", description="Seconds per distillation iteration: torchrun vs one.")
    p.add_argument("--methods", default="mim4dd,dm", help="comma list of methods")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--shape", choices=["digits", "cifar"], default="digits",
                   help="digits (8x8, presets) or cifar (random 32x32 RGB image folder, CIFAR-sized student)")
    p.add_argument("--json", default="runs/bench/scaling_distill.json", help="write the results here ('' to skip)")
    return p


CIFAR_SHAPE = """
num_experts = 1
expert_epochs = 2
[method_config]
syn_steps = 5
lr_img = 10.0
max_start_epoch = 1
expert_epochs = 1
width = 128
depth = 3
[eval]
epochs = 2
"""


def _random_image_folder(root: Path, classes: int = 10, per_class: int = 50) -> Path:
    """Random RGB 32x32 PNGs, one sub-folder per class (the imagefolder format)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def _run(cmd: list[str], threads: int | None, out: Path) -> list[float]:
    """Run one distillation into a fresh ``out``; rank 0's per-iteration seconds."""
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, env=_env(threads), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return [json.loads(line)["seconds"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def main(argv: list[str] | None = None) -> int:
    from mim4dd_fast.errors import run_command

    return run_command(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.ipc, args.iterations - 2, args.nproc) < 1:
        raise ArgError("--ipc and --nproc must be at least 1 and --iterations at least 3.")
    import torch

    from mim4dd_fast.io import load_tensors

    py = sys.executable
    work = Path(tempfile.mkdtemp(prefix="scaling-distill-"))
    rows = []
    try:
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            dataset = ["--dataset", "digits"]
            if args.shape == "cifar":
                (work / "cifar-shape.toml").write_text(CIFAR_SHAPE)
                folder = work / "images" if (work / "images").exists() else _random_image_folder(work / "images")
                dataset = ["--dataset", f"imagefolder:{folder}", "--config", str(work / "cifar-shape.toml")]
            cli = ["distill", "--method", method, *dataset, "--ipc", str(args.ipc), "--iterations",
                   str(args.iterations), "--evals", "1", "--checkpoint-every", str(args.iterations), "--device", "cpu"]
            configs = [("single, default threads", None, [py, "-m", "mim4dd_fast", *cli]),
                       ("single, 1 thread", 1, [py, "-m", "mim4dd_fast", *cli]),
                       (f"torchrun {args.nproc} x 1 thread", 1,
                        [py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}", "-m",
                         "mim4dd_fast", *cli])]
            medians, images = {}, {}
            for name, threads, cmd in configs:
                out = work / f"{method}-{name.replace(' ', '_').replace(',', '')}"
                seconds = _run(cmd, threads, out)[2:]
                medians[name] = statistics.median(seconds)
                images[name] = load_tensors(out / "synthetic.safetensors")["images"]
                rows.append({"method": method, "config": name, "median_iteration_s": medians[name],
                             "iteration_s": seconds,
                             "command": shlex.join([*([f"OMP_NUM_THREADS={threads}"] if threads else []), *cmd,
                                                    "--out", "OUT"])})
                print(f"{method:8s} {name:26s} {medians[name] * 1000:8.1f} ms/iteration", flush=True)
            one, many = images["single, 1 thread"], images[f"torchrun {args.nproc} x 1 thread"]
            rows[-1].update({
                "speedup_vs_1_thread": medians["single, 1 thread"] / rows[-1]["median_iteration_s"],
                "speedup_vs_default_threads": medians["single, default threads"] / rows[-1]["median_iteration_s"],
                "max_image_difference_vs_1_thread": float((one - many).abs().max()),
            })
            print(f"{method:8s} speed-up {rows[-1]['speedup_vs_1_thread']:.2f}x vs 1 thread, "
                  f"{rows[-1]['speedup_vs_default_threads']:.2f}x vs default threads; final images differ by at "
                  f"most {rows[-1]['max_image_difference_vs_1_thread']:.2g}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    given = argv if argv is not None else sys.argv[1:]
    result = {"what": f"{args.shape} IPC {args.ipc}, {args.iterations} iterations, median of iterations 3..",
              "bench_command": shlex.join([py, "bench/scaling_distill.py", *given]),
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "loadavg_after": os.getloadavg(), "rows": rows}
    if args.json:
        write_json_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

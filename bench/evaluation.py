"""Batched evaluation nets and experts vs one by one: wall-clock side by side, and how equal the results are.

Evaluation: the n nets of the protocol (``EvalConfig``, default 100 epochs) on the embedded digits, at
each IPC, trained one by one (``train_net`` + ``split_accuracy`` per net: ``nets_per_pass = 1``) and
all at once (``train_stacked`` + ``stacked_accuracies``: the default), on a random real subset as
the training set (the cost does not depend on the pixel values). Experts: ``train_experts`` with
``experts_per_pass = 1`` vs the default, into fresh directories. Within one run, every repeat times
both paths back to back in alternating order (ABBA), so a busy machine slows both alike; the
figures are the median and the minimum over repeats and their ratios. The last repeat's nets are
compared: max |difference| of the parameters and of the test accuracies (float summation order is
the only difference between the paths).

    .venv/bin/python bench/evaluation.py                                  # IPC 1 and 10, 5 nets, 3 repeats
    .venv/bin/python bench/evaluation.py --ipcs 1 --epochs 4 --repeats 1 --experts 0 --json ''   # smoke
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ArgError, Parser, write_json_result  # noqa: E402


def build_parser() -> Parser:
    p = Parser(prog="bench/evaluation.py", description="Batched evaluation nets and experts vs one by one.")
    p.add_argument("--ipcs", type=int, nargs="+", default=[1, 10])
    p.add_argument("--nets", type=int, default=5)
    p.add_argument("--epochs", type=int, default=100, help="evaluation epochs per net")
    p.add_argument("--model", default="convnet", help="evaluation architecture (convnet, mlp, lenet, resnet18)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--experts", type=int, default=8, help="experts to train per path (0 skips the experts)")
    p.add_argument("--expert-epochs", type=int, default=2)
    p.add_argument("--expert-width", type=int, default=32, help="expert ConvNet width (the digits presets' 32)")
    p.add_argument("--experts-per-pass", type=int, default=None, help="default: experts.EXPERTS_PER_PASS")
    p.add_argument("--json", default="runs/bench/evaluation.json", help="write the results here ('' to skip)")
    return p


def _side_by_side(paths: dict, repeats: int) -> tuple[dict[str, list[float]], dict]:
    """Time each path once per repeat, alternating which goes first; seconds per path and each path's last result."""
    names = list(paths)
    times: dict[str, list[float]] = {name: [] for name in names}
    last = {}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            last[name] = paths[name]()
            times[name].append(time.perf_counter() - t0)
    return times, last


def _ratios(times: dict[str, list[float]], ref: str, new: str) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    return {"seconds": times, "median_s": med, "min_s": low,
            "speedup_median": med[ref] / med[new], "speedup_min": low[ref] / low[new]}


def bench_evaluation(dataset, ipc: int, args) -> dict:
    import torch

    from mim4dd_fast.evaluation import (
        EvalConfig,
        random_subset,
        split_accuracy,
        stacked_accuracies,
        train_net,
        train_stacked,
    )
    from mim4dd_fast.models import flatten_params

    cfg = EvalConfig(epochs=args.epochs, n_nets=args.nets, model=args.model)
    x, y = random_subset(dataset, ipc, seed=0)
    seeds = list(range(args.nets))

    def one_by_one():
        nets = [train_net(x, y, dataset, cfg, seed=s) for s in seeds]
        return torch.stack([flatten_params(n) for n in nets]), [split_accuracy(n, dataset) for n in nets]

    def stacked():
        st = train_stacked([(x, y)] * len(seeds), dataset, cfg, seeds=seeds)
        return st.flat_params(), stacked_accuracies(st, dataset)

    warm = EvalConfig(epochs=1, n_nets=args.nets, model=args.model)  # one-time kernel set-up outside the timings
    train_net(x, y, dataset, warm, seed=0)
    train_stacked([(x, y)] * len(seeds), dataset, warm, seeds=seeds)
    times, last = _side_by_side({"one_by_one": one_by_one, "stacked": stacked}, args.repeats)
    (p_ref, a_ref), (p_new, a_new) = last["one_by_one"], last["stacked"]
    return {"ipc": ipc, "images": int(x.shape[0]), **_ratios(times, "one_by_one", "stacked"),
            "max_abs_param_diff": float((p_ref - p_new).abs().max()), "max_abs_param": float(p_ref.abs().max()),
            "accuracies_one_by_one": a_ref, "accuracies_stacked": a_new,
            "max_abs_accuracy_diff": max(abs(a - b) for a, b in zip(a_ref, a_new, strict=True))}


def bench_experts(dataset, args) -> dict:
    from mim4dd_fast.experts import EXPERTS_PER_PASS, load_experts, train_experts

    k = args.experts_per_pass or EXPERTS_PER_PASS
    kw = {"num_experts": args.experts, "epochs": args.expert_epochs,
          "model_kwargs": {"width": args.expert_width, "depth": 2}}
    with tempfile.TemporaryDirectory(prefix="bench-experts-") as tmp:
        counter = iter(range(10**6))

        def run(per_pass: int):
            out = Path(tmp) / f"run{next(counter)}"
            train_experts(dataset, out, experts_per_pass=per_pass, **kw)
            return load_experts(out)

        times, last = _side_by_side({"one_by_one": lambda: run(1), "stacked": lambda: run(k)}, args.repeats)
    diff = max(float((a - b).abs().max()) for a, b in zip(last["one_by_one"], last["stacked"], strict=True))
    return {"experts": args.experts, "epochs": args.expert_epochs, "width": args.expert_width, "experts_per_pass": k,
            "train_images": int(dataset.x_train.shape[0]), **_ratios(times, "one_by_one", "stacked"),
            "max_abs_param_diff": diff}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if min(args.nets, args.epochs, args.repeats, args.threads, args.expert_epochs, args.expert_width,
               *args.ipcs) < 1 or args.experts < 0 or (args.experts_per_pass is not None and args.experts_per_pass < 1):
            raise ArgError("--ipcs, --nets, --epochs, --repeats, --threads, --expert-epochs, --expert-width and "
                           "--experts-per-pass must be at least 1 and --experts at least 0.")
    except ArgError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch

    from mim4dd_fast.data import load_dataset
    from mim4dd_fast.errors import UserError
    from mim4dd_fast.profiling import environment

    torch.set_num_threads(args.threads)
    dataset = load_dataset("digits")
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    try:
        rows = [bench_evaluation(dataset, ipc, args) for ipc in args.ipcs]
        experts = bench_experts(dataset, args) if args.experts else None
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = {"environment": environment("cpu"), "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "wall_seconds": time.perf_counter() - t0,
              "command": "python bench/evaluation.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "evaluation": rows, "experts": experts}
    print(f"{args.nets} evaluation nets ({args.model}, {args.epochs} epochs) on digits, {args.threads} threads, "
          f"{args.repeats} repeats; load average {load_before[0]:.1f} before, "
          f"{result['load_average_after'][0]:.1f} after")
    print("| what | one by one s (median / min) | batched s (median / min) | speed-up (median / min) | "
          "max abs param diff | max abs accuracy diff |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| eval IPC {r['ipc']} | {r['median_s']['one_by_one']:.2f} / {r['min_s']['one_by_one']:.2f} | "
              f"{r['median_s']['stacked']:.2f} / {r['min_s']['stacked']:.2f} | {r['speedup_median']:.2f}x / "
              f"{r['speedup_min']:.2f}x | {r['max_abs_param_diff']:.2e} (of {r['max_abs_param']:.2f}) | "
              f"{r['max_abs_accuracy_diff']:.4f} |")
    if experts:
        e = experts
        print(f"| {e['experts']} experts x {e['epochs']} epochs, width {e['width']}, "
              f"{e['experts_per_pass']} per pass | "
              f"{e['median_s']['one_by_one']:.2f} / {e['min_s']['one_by_one']:.2f} | "
              f"{e['median_s']['stacked']:.2f} / {e['min_s']['stacked']:.2f} | {e['speedup_median']:.2f}x / "
              f"{e['speedup_min']:.2f}x | {e['max_abs_param_diff']:.2e} | - |")
    if args.json:
        write_json_result(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

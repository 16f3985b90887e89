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

Roofline: the one-by-one path runs once more under FlopCounterMode (torch.utils.flop_counter: its
convolutions and matrix products, forward and backward; both paths do this work), and the machine's
fp32 peak is measured in the same run at the same thread count (``profiling.peak_flops``: the best of
a large matrix product and a large convolution). Counted FLOPs over that rate is the least time any path doing this
work can take, so one-by-one seconds over it is the largest speed-up batching could bring on this
machine (``speedup_ceiling``); each path's achieved FLOP/s is reported as a fraction of the rate. A
tighter, measured ceiling: the batched path runs once more under torch.profiler, and one-by-one seconds
over the batched path's time inside its convolutions alone (forward and backward) is the largest speed-up
it could reach if all its other work took no time (``conv_ceiling``).

    .venv/bin/python bench/evaluation.py                                  # IPC 1 and 10, 5 nets, 3 repeats
    .venv/bin/python bench/evaluation.py --ipcs 1 --epochs 4 --repeats 1 --experts 0 --json ''   # smoke
    python bench/evaluation.py --device cuda                              # on a GPU (bench/gpu_check.sh runs it)
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
    p.add_argument("--device", default="cpu", help="cpu or cuda (every path, the FLOP count and the peak run there)")
    p.add_argument("--experts", type=int, default=8, help="experts to train per path (0 skips the experts)")
    p.add_argument("--expert-epochs", type=int, default=2)
    p.add_argument("--expert-width", type=int, default=32, help="expert ConvNet width (the digits presets' 32)")
    p.add_argument("--experts-per-pass", type=int, default=None, help="default: experts.EXPERTS_PER_PASS")
    p.add_argument("--vmap", action="store_true",
                   help="also time the torch.func alternative (functional_call + vmap(grad)) for the evaluation nets")
    p.add_argument("--peak-size", type=int, default=2048,
                   help="side of the fp32 matrix product (and size // 32 images of the convolution) that measure "
                        "the machine's peak FLOP/s")
    p.add_argument("--json", default="runs/bench/evaluation.json", help="write the results here ('' to skip)")
    return p


def _side_by_side(paths: dict, repeats: int, device) -> tuple[dict[str, list[float]], dict]:
    """Time each path once per repeat, alternating which goes first (device synchronised around each); seconds
    per path and each path's last result."""
    from mim4dd_fast.profiling import timed

    names = list(paths)
    times: dict[str, list[float]] = {name: [] for name in names}
    last = {}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            last[name], seconds = timed(paths[name], device)
            times[name].append(seconds)
    return times, last


def _ratios(times: dict[str, list[float]], ref: str, new: str) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    return {"seconds": times, "median_s": med, "min_s": low,
            "speedup_median": med[ref] / med[new], "speedup_min": low[ref] / low[new]}


def roofline(flops: int, median_s: dict[str, float], reference: str, rates: dict[str, float]) -> dict:
    """Counted ``flops`` of one run of every path against the machine's peak (``rates["peak"]`` FLOP/s, from
    ``profiling.peak_flops``): achieved FLOP/s and fraction of the peak per path, the floor (``flops / peak``
    seconds) and the speed-up ceiling of ``reference``'s median seconds over that floor."""
    peak = rates["peak"]
    floor = flops / peak
    return {"flops": int(flops), "peak_flops_per_s": peak, "kernel_flops_per_s": dict(rates), "floor_s": floor,
            "flops_per_s": {k: flops / v for k, v in median_s.items()},
            "peak_fraction": {k: flops / v / peak for k, v in median_s.items()},
            "speedup_ceiling": median_s[reference] / floor}


def conv_ceiling(reference_s: float, conv_s: float) -> dict:
    """The batched path's seconds in its convolutions and ``reference_s`` over them (None when the profiler saw no
    convolution time, e.g. a profiler without device timings)."""
    return {"stacked_conv_s": conv_s, "conv_ceiling": reference_s / conv_s if conv_s > 0 else None}


def train_vmap(x, y, dataset, cfg, seeds):
    """The alternative to StackedNets: stacked parameters, torch.func.functional_call under vmap(grad(.)).

    Same protocol and per-net generators as ``train_net``; SGD on the stacked parameters. Returns [n, P].
    """
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap

    from mim4dd_fast.augment import dsa
    from mim4dd_fast.evaluation import epoch_lr, fresh_net

    nets = [fresh_net(dataset, cfg, s) for s in seeds]
    template = nets[0]
    params = {name: torch.stack([dict(n.named_parameters())[name].detach() for n in nets]).requires_grad_()
              for name, _ in template.named_parameters()}
    opt = torch.optim.SGD(params.values(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    step = vmap(grad(lambda p, xb, yb: F.cross_entropy(functional_call(template, p, (xb,)), yb)))
    n = x.shape[0]
    for epoch in range(cfg.epochs):
        for group in opt.param_groups:
            group["lr"] = epoch_lr(epoch, cfg.epochs, cfg.lr)
        orders = [torch.randperm(n, generator=g) for g in gens]
        for start in range(0, n, cfg.batch_size):
            idx = [o[start : start + cfg.batch_size] for o in orders]
            xb = torch.stack([dsa(x[i], generator=g) for i, g in zip(idx, gens, strict=True)])
            grads = step({k: v.detach() for k, v in params.items()}, xb, torch.stack([y[i] for i in idx]))
            for name, value in params.items():
                value.grad = grads[name]
            opt.step()
    return torch.cat([v.detach().reshape(len(seeds), -1) for v in params.values()], 1)


def bench_evaluation(dataset, ipc: int, args, peak: dict[str, float]) -> dict:
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
    from mim4dd_fast.profiling import measure_flops, op_seconds

    cfg = EvalConfig(epochs=args.epochs, n_nets=args.nets, model=args.model)
    x, y = random_subset(dataset, ipc, seed=0)
    seeds, device = list(range(args.nets)), args.device

    def one_by_one():
        nets = [train_net(x, y, dataset, cfg, seed=s, device=device) for s in seeds]
        return (torch.stack([flatten_params(n) for n in nets]).cpu(),
                [split_accuracy(n, dataset, device) for n in nets])

    def stacked():
        st = train_stacked([(x, y)] * len(seeds), dataset, cfg, seeds=seeds, device=device)
        return st.flat_params().cpu(), stacked_accuracies(st, dataset, device)

    paths = {"one_by_one": one_by_one, "stacked": stacked}
    if args.vmap:
        paths["vmap"] = lambda: (train_vmap(x, y, dataset, cfg, seeds), None)
    warm = EvalConfig(epochs=1, n_nets=args.nets, model=args.model)  # one-time kernel set-up outside the timings
    train_net(x, y, dataset, warm, seed=0, device=device)
    train_stacked([(x, y)] * len(seeds), dataset, warm, seeds=seeds, device=device)
    _, counted = measure_flops(one_by_one)
    _, conv_s = op_seconds(stacked, "convolution", device)
    times, last = _side_by_side(paths, args.repeats, device)
    (p_ref, a_ref), (p_new, a_new) = last["one_by_one"], last["stacked"]
    ratios = _ratios(times, "one_by_one", "stacked")
    row = {"ipc": ipc, "images": int(x.shape[0]), **ratios,
           "roofline": {**roofline(counted.total, ratios["median_s"], "one_by_one", peak),
                        **conv_ceiling(ratios["median_s"]["one_by_one"], conv_s)},
           "max_abs_param_diff": float((p_ref - p_new).abs().max()), "max_abs_param": float(p_ref.abs().max()),
           "accuracies_one_by_one": a_ref, "accuracies_stacked": a_new,
           "max_abs_accuracy_diff": max(abs(a - b) for a, b in zip(a_ref, a_new, strict=True))}
    if args.vmap:
        row["vmap"] = {**_ratios({k: times[k] for k in ("one_by_one", "vmap")}, "one_by_one", "vmap"),
                       "max_abs_param_diff": float((p_ref - last["vmap"][0]).abs().max())}
    return row


def bench_experts(dataset, args, peak: dict[str, float]) -> dict:
    from mim4dd_fast.experts import EXPERTS_PER_PASS, load_experts, train_experts
    from mim4dd_fast.profiling import measure_flops, op_seconds

    k = args.experts_per_pass or EXPERTS_PER_PASS
    kw = {"num_experts": args.experts, "epochs": args.expert_epochs,
          "model_kwargs": {"width": args.expert_width, "depth": 2}}
    with tempfile.TemporaryDirectory(prefix="bench-experts-") as tmp:
        counter = iter(range(10**6))

        def run(per_pass: int):
            out = Path(tmp) / f"run{next(counter)}"
            train_experts(dataset, out, experts_per_pass=per_pass, device=args.device, **kw)
            return load_experts(out)

        _, counted = measure_flops(lambda: run(1))  # also the warm-up
        _, conv_s = op_seconds(lambda: run(k), "convolution", args.device)
        times, last = _side_by_side({"one_by_one": lambda: run(1), "stacked": lambda: run(k)}, args.repeats,
                                    args.device)
    diff = max(float((a - b).abs().max()) for a, b in zip(last["one_by_one"], last["stacked"], strict=True))
    ratios = _ratios(times, "one_by_one", "stacked")
    return {"experts": args.experts, "epochs": args.expert_epochs, "width": args.expert_width, "experts_per_pass": k,
            "train_images": int(dataset.x_train.shape[0]), **ratios,
            "roofline": {**roofline(counted.total, ratios["median_s"], "one_by_one", peak),
                         **conv_ceiling(ratios["median_s"]["one_by_one"], conv_s)},
            "max_abs_param_diff": diff}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        sizes = (args.nets, args.epochs, args.repeats, args.threads, args.expert_epochs, args.expert_width,
                 args.peak_size, *args.ipcs)
        if min(sizes) < 1 or args.experts < 0 or (args.experts_per_pass is not None and args.experts_per_pass < 1):
            raise ArgError("--ipcs, --nets, --epochs, --repeats, --threads, --expert-epochs, --expert-width, "
                           "--peak-size and --experts-per-pass must be at least 1 and --experts at least 0.")
    except ArgError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch

    from mim4dd_fast.data import load_dataset
    from mim4dd_fast.errors import UserError
    from mim4dd_fast.io import atomic_write_json
    from mim4dd_fast.profiling import environment, peak_flops
    from mim4dd_fast.runner import resolve_device

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    try:
        args.device = resolve_device(args.device)
        dataset = load_dataset("digits")
        result = {"environment": environment(args.device), "load_average_before": load_before,
                  "command": "python bench/evaluation.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  "evaluation": [], "experts": None, "complete": False}

        def save_partial() -> None:  # each row as it finishes: a run cut short keeps what it measured
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(args.json, result)

        for ipc in args.ipcs:
            result["evaluation"].append(bench_evaluation(dataset, ipc, args, peak_flops(args.peak_size,
                                                                                         device=args.device)))
            save_partial()
        if args.experts:
            result["experts"] = bench_experts(dataset, args, peak_flops(args.peak_size, device=args.device))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result.update(load_average_after=os.getloadavg(), wall_seconds=time.perf_counter() - t0, complete=True)
    rows, experts = result["evaluation"], result["experts"]
    where = f"{args.threads} threads" if args.device == "cpu" else args.device
    print(f"{args.nets} evaluation nets ({args.model}, {args.epochs} epochs) on digits, {where}, "
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
        if "vmap" in r:
            v = r["vmap"]
            print(f"| eval IPC {r['ipc']}, vmap instead | {v['median_s']['one_by_one']:.2f} / "
                  f"{v['min_s']['one_by_one']:.2f} | {v['median_s']['vmap']:.2f} / {v['min_s']['vmap']:.2f} | "
                  f"{v['speedup_median']:.2f}x / {v['speedup_min']:.2f}x | {v['max_abs_param_diff']:.2e} | - |")
    if experts:
        e = experts
        print(f"| {e['experts']} experts x {e['epochs']} epochs, width {e['width']}, "
              f"{e['experts_per_pass']} per pass | "
              f"{e['median_s']['one_by_one']:.2f} / {e['min_s']['one_by_one']:.2f} | "
              f"{e['median_s']['stacked']:.2f} / {e['min_s']['stacked']:.2f} | {e['speedup_median']:.2f}x / "
              f"{e['speedup_min']:.2f}x | {e['max_abs_param_diff']:.2e} | - |")
    print_roofline(rows, experts)
    if args.json:
        write_json_result(args.json, result)
    return 0


def print_roofline(rows: list[dict], experts: dict | None) -> None:
    print("\nRoofline: counted FLOPs of one run (torch.utils.flop_counter) against this machine's fp32 peak (best of a "
          "large matrix product and a large convolution), measured before each row at the same threads")
    print("| what | counted GFLOP | peak GFLOP/s (matmul / conv) | one by one GFLOP/s (of peak) | "
          "batched GFLOP/s (of peak) | floor s | speed-up ceiling | batched s in convolutions | "
          "ceiling if all else were free |")
    print("|---|---|---|---|---|---|---|---|---|")
    named = [(f"eval IPC {r['ipc']}", r["roofline"]) for r in rows]
    if experts:
        named.append((f"{experts['experts']} experts x {experts['epochs']} epochs", experts["roofline"]))
    for what, f in named:
        rate, frac = f["flops_per_s"], f["peak_fraction"]
        kernels = f["kernel_flops_per_s"]
        print(f"| {what} | {f['flops'] / 1e9:.1f} | {f['peak_flops_per_s'] / 1e9:.0f} ({kernels['matmul'] / 1e9:.0f} / "
              f"{kernels['conv3x3'] / 1e9:.0f}) | "
              f"{rate['one_by_one'] / 1e9:.0f} ({frac['one_by_one']:.0%}) | {rate['stacked'] / 1e9:.0f} "
              f"({frac['stacked']:.0%}) | {f['floor_s']:.2f} | {f['speedup_ceiling']:.2f}x | "
              f"{f['stacked_conv_s']:.2f} | "
              + (f"{f['conv_ceiling']:.2f}x |" if f["conv_ceiling"] is not None else "- |"))


if __name__ == "__main__":
    raise SystemExit(main())

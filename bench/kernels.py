"""Benchmark and check the fused kernels, every figure measured side by side in one run.

Subcommands (``python bench/kernels.py SUBCOMMAND -h`` lists the flags):

grid       forward + backward of the contrastive loss for sizes x dims x precisions x impls: seconds per
           step (the impls timed round-robin, median), useful TFLOP/s (6NMD), peak memory beyond the
           inputs (CUDA: max_memory_allocated; CPU: peak-RSS rise, each impl in a fresh process),
           bytes saved for backward, and the relative-norm error of the loss and both gradients
           against the float64 chunked path (itself tested equal to the reference). Baselines:
           "eager" (the plain reference) and "compile" (torch.compile of it), at the matching matmul
           precision; "mm" rows give the machine's GEMM rate at each precision.
crossover  eager vs the fused path at small sizes: where impl="auto" should stop using eager.
tap        feature_reduce vs the plain pooling op in the MIM term of a real distillation step.
summary    read a bench/gpu_check.sh output directory and write summary.json, PASS/FAIL per target.

    python bench/kernels.py grid --device cpu --sizes 16384 --dims 128 --impls eager chunked --repeats 5
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

from _common import ArgError, Parser, random_dataset, random_experts

GRID_IMPLS = ("eager", "compile", "chunked", "triton", "auto")
PRECISIONS = ("ieee", "tf32x3", "tf32", "bf16")
TARGET_N, TARGET_D = 16384, 128
TENSOR_CORE_PRECISIONS = ("tf32x3", "tf32", "bf16")


# --------------------------------------------------------------------------------------------------
# grid: the contrastive loss
# --------------------------------------------------------------------------------------------------
def _inputs(N: int, D: int, device: str, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, D, generator=g).to(device).requires_grad_(True)
    b = torch.randn(N, D, generator=g).to(device).requires_grad_(True)
    ya = torch.randint(0, 10, (N,), generator=g).to(device)
    yb = torch.randint(0, 10, (N,), generator=g).to(device)
    return a, b, ya, yb


_COMPILED: dict = {}


def _loss_fn(impl: str, precision: str, critic: str):
    """loss(a, b, ya, yb) of one implementation at one precision. eager/compile run the plain reference
    (no checks, no host syncs); bf16 casts its matmul operands, the TF32 switch is set by the caller."""
    import torch
    from mim4dd_fast.kernels import contrastive_loss
    from mim4dd_fast.kernels.reference import contrastive_loss_reference

    kw = dict(critic=critic, matmul_dtype=torch.bfloat16 if precision == "bf16" else None)
    if impl == "eager":
        return lambda a, b, ya, yb: contrastive_loss_reference(a, b, ya, yb, **kw)
    if impl == "compile":
        if "fn" not in _COMPILED:
            torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
            _COMPILED["fn"] = torch.compile(contrastive_loss_reference, dynamic=True)
        compiled = _COMPILED["fn"]
        return lambda a, b, ya, yb: compiled(a, b, ya, yb, **kw)
    return lambda a, b, ya, yb: contrastive_loss(a, b, ya, yb, critic=critic, impl=impl, precision=precision)


def _step(loss_fn, a, b, ya, yb):
    def step():
        loss_fn(a, b, ya, yb).backward()
        a.grad = b.grad = None

    return step


def gemm_rate(precision: str, device: str, n: int) -> float:
    """TFLOP/s of a square n x n x n torch.mm at ``precision`` (tf32x3: a third of the TF32 rate, the
    three TF32 products it takes)."""
    import torch
    from mim4dd_fast.kernels.contrastive import torch_matmul_precision

    from mim4dd_fast.profiling import summarize_times, time_interleaved

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    x = torch.randn(n, n, device=device).to(dtype)
    with torch_matmul_precision(torch.device(device), "tf32" if precision in ("tf32", "tf32x3") else "ieee"):
        times = time_interleaved({"mm": lambda: torch.mm(x, x)}, repeats=5, device=device)["mm"]
    rate = 2 * n**3 / summarize_times(times)["median"] / 1e12
    return rate / 3 if precision == "tf32x3" else rate


def _accuracy(loss_fn, oracle, a, b, ya, yb) -> dict:
    from mim4dd_fast.kernels.testing import loss_and_grads, rel_err

    got = loss_and_grads(loss_fn, a, b, ya, yb)
    return {f"err_{name}": rel_err(g, w) for name, g, w in zip(("loss", "grad_a", "grad_b"), got, oracle, strict=True)}


def _memory(loss_fn, a, b, ya, yb, device: str) -> dict:
    """One warmed-up step under the memory counters. CUDA: allocation peak above what was alive before
    (the inputs); CPU: peak-RSS rise (meaningful in a fresh process only)."""
    import torch

    from mim4dd_fast.profiling import CudaPeak, PeakRSS, SavedTensorBytes

    step = _step(loss_fn, a, b, ya, yb)
    step()
    if device == "cuda":
        torch.cuda.empty_cache()
        with CudaPeak() as peak, SavedTensorBytes() as saved:
            step()
        return {"peak_bytes": peak.delta, "peak_kind": "cuda max_memory_allocated above the inputs",
                "saved_bytes": saved.peak}
    with PeakRSS() as rss, SavedTensorBytes() as saved:
        step()
    return {"peak_bytes": rss.delta, "peak_kind": f"peak RSS rise, fresh process ({rss.method})",
            "saved_bytes": saved.peak}


def _memory_in_child(impl, precision, N, D, critic, threads) -> dict:
    spec = json.dumps(dict(impl=impl, precision=precision, N=N, D=D, critic=critic, threads=threads))
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_memory", spec], capture_output=True,
                         text=True)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"memory_error": tail[0]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child_memory(spec: str) -> int:
    import torch

    s = json.loads(spec)
    torch.set_num_threads(s["threads"])
    a, b, ya, yb = _inputs(s["N"], s["D"], "cpu")
    print(json.dumps(_memory(_loss_fn(s["impl"], s["precision"], s["critic"]), a, b, ya, yb, "cpu")))
    return 0


def _oracle(a, b, ya, yb, critic):
    """Loss and gradients from the float64 chunked path (exact; no N x M matrix, so it fits at any size)."""
    from mim4dd_fast.kernels import contrastive_loss
    from mim4dd_fast.kernels.testing import loss_and_grads

    return loss_and_grads(lambda *t: contrastive_loss(*t, critic=critic, impl="chunked", precision="ieee"),
                          a.double(), b.double(), ya, yb)


def measure_group(N: int, D: int, precision: str, impls: list[str], args) -> list[dict]:
    """Every impl at one (N, D, precision): warm-up, round-robin timing, memory, accuracy."""
    import torch
    from mim4dd_fast.kernels.contrastive import resolve_impl, torch_matmul_precision
    from mim4dd_fast.kernels.contrastive_triton import MAX_D

    from mim4dd_fast.profiling import summarize_times, time_interleaved, timed

    device = args.device
    a, b, ya, yb = _inputs(N, D, device)
    base = {"N": N, "M": N, "D": D, "precision": precision, "device": device, "critic": args.critic}
    rows, steps, fns, inner = {}, {}, {}, {}
    with torch_matmul_precision(torch.device(device), precision):
        for impl in impls:
            row = rows[impl] = {**base, "impl": impl}
            if impl == "triton" and (D > MAX_D or device != "cuda"):
                row["skipped"] = f"the Triton kernels cover D <= {MAX_D} on CUDA"
                continue
            if impl == "auto":
                row["resolved_impl"] = resolve_impl("auto", a, b)
            fn = _loss_fn(impl, precision, args.critic)
            try:
                _, first = timed(_step(fn, a, b, ya, yb), device)  # warm-up: compilation, autotuning
                _, once = timed(_step(fn, a, b, ya, yb), device)
            except Exception as exc:  # e.g. out of memory: recorded, the others go on
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                _free(device)
                continue
            row["first_call_s"] = first
            fns[impl], steps[impl] = fn, _step(fn, a, b, ya, yb)
            inner[impl] = max(1, min(50, math.ceil(args.min_sample_s / max(once, 1e-9))))
        times = time_interleaved(steps, repeats=args.repeats, warmup=0, inner=inner, device=device)
        for impl, samples in times.items():
            stats = summarize_times(samples)
            rows[impl].update(median_s=stats["median"], p90_s=stats["p90"], samples=samples,
                              calls_per_sample=inner[impl], useful_tflops=6 * N * N * D / stats["median"] / 1e12)
            if "eager" in times:  # per-round ratios: each round timed both within seconds of each other
                ratios = sorted(t / e for t, e in zip(samples, times["eager"], strict=True))
                rows[impl].update(vs_eager_median=summarize_times(ratios)["median"], vs_eager_min=ratios[0],
                                  vs_eager_max=ratios[-1])
        oracle = _oracle(a, b, ya, yb, args.critic) if args.accuracy else None
        for impl, fn in fns.items():
            try:
                if oracle is not None:
                    rows[impl].update(_accuracy(fn, oracle, a, b, ya, yb))
                if device == "cuda" or args.no_isolate:
                    rows[impl].update(_memory(fn, a, b, ya, yb, device))
            except Exception as exc:
                rows[impl]["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            _free(device)
    if device == "cpu" and not args.no_isolate:
        for impl in fns:
            rows[impl].update(_memory_in_child(impl, precision, N, D, args.critic, torch.get_num_threads()))
    return list(rows.values())


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def render(rows: list[dict], rates: dict) -> None:
    """A plain-text table (no optional dependency)."""
    print(f"GEMM rate (TFLOP/s) by precision: {json.dumps({k: round(v, 2) for k, v in rates.items()})}")
    head = ("N=M", "D", "prec", "impl", "median s", "TFLOP/s", "% rate", "peak MB", "saved MB", "err grad")
    lines = [head]
    for r in rows:
        note = r.get("error") or r.get("skipped")
        if note:
            lines.append((str(r["N"]), str(r["D"]), r["precision"], r["impl"], note[:60], "", "", "", "", ""))
            continue
        rate = rates.get(r["precision"])
        grad_err = max(r.get("err_grad_a", math.nan), r.get("err_grad_b", math.nan)) if "err_grad_a" in r else None
        impl = r["impl"] + (f"->{r['resolved_impl']}" if "resolved_impl" in r else "")
        lines.append((str(r["N"]), str(r["D"]), r["precision"], impl, _fmt(r.get("median_s"), ".4f"),
                      _fmt(r.get("useful_tflops"), ".2f"),
                      _fmt(100 * r["useful_tflops"] / rate if rate else None, ".0f"),
                      _fmt(r.get("peak_bytes", math.nan) / 1e6 if "peak_bytes" in r else None, ",.1f"),
                      _fmt(r.get("saved_bytes", math.nan) / 1e6 if "saved_bytes" in r else None, ",.1f"),
                      _fmt(grad_err, ".1e")))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)))


def cmd_grid(args) -> int:
    import torch

    from mim4dd_fast.io import atomic_write_json
    from mim4dd_fast.profiling import environment

    torch.set_num_threads(args.threads)
    precisions = args.precisions or (list(PRECISIONS) if args.device == "cuda" else ["ieee"])
    impls = args.impls or [i for i in GRID_IMPLS if args.device == "cuda" or i in ("eager", "compile", "chunked")]
    rates = {p: gemm_rate(p, args.device, args.rate_size) for p in precisions}
    meta = {"environment": environment(args.device), "command": " ".join(sys.argv), "gemm_rate_tflops": rates,
            "useful_flops": "6*N*M*D (logits 2NMD + two gradients 2NMD each)", "critic": args.critic,
            "repeats": args.repeats}
    rows = []
    for N in args.sizes:
        for D in args.dims:
            for precision in precisions:
                group = measure_group(N, D, precision, impls, args)
                rows += group
                for row in group:
                    print(json.dumps({k: v for k, v in row.items() if k != "samples"}), file=sys.stderr, flush=True)
                if args.json:  # rewritten after every group: a run cut short keeps what it measured
                    atomic_write_json(args.json, {"meta": meta, "rows": rows})
    render(rows, rates)
    return 0


# --------------------------------------------------------------------------------------------------
# crossover: where the fused path starts to beat eager
# --------------------------------------------------------------------------------------------------
def cmd_crossover(args) -> int:
    import torch
    from mim4dd_fast.kernels.contrastive import EAGER_MAX_LOGITS, resolve_impl, torch_matmul_precision

    from mim4dd_fast.io import atomic_write_json
    from mim4dd_fast.profiling import environment, summarize_times, time_interleaved, timed

    torch.set_num_threads(args.threads)
    fused = "triton" if args.device == "cuda" else "chunked"
    rows = []
    for N in args.sizes:
        a, b, ya, yb = _inputs(N, args.dim, args.device)
        steps, inner = {}, {}
        with torch_matmul_precision(torch.device(args.device), args.precision):
            for impl in ("eager", fused, "auto"):
                step = _step(_loss_fn(impl, args.precision, "infonce"), a, b, ya, yb)
                timed(step, args.device)
                _, once = timed(step, args.device)
                steps[impl], inner[impl] = step, max(1, min(200, math.ceil(args.min_sample_s / max(once, 1e-9))))
            times = time_interleaved(steps, repeats=args.repeats, warmup=0, inner=inner, device=args.device)
        row = {"N": N, "M": N, "D": args.dim, "logits": N * N, "auto_picks": resolve_impl("auto", a, b),
               **{f"{impl}_s": summarize_times(t)["median"] for impl, t in times.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    faster = [r["logits"] for r in rows if r[f"{fused}_s"] < r["eager_s"]]
    # the crossover: the smallest size from which the fused path wins at every larger size measured
    crossover = None
    for r in reversed(rows):
        if r[f"{fused}_s"] >= r["eager_s"]:
            break
        crossover = r["logits"]
    result = {"meta": {"environment": environment(args.device), "command": " ".join(sys.argv),
                       "precision": args.precision, "fused": fused},
              "rows": rows, "eager_max_logits": EAGER_MAX_LOGITS, "measured_crossover_logits": crossover,
              "fused_faster_at_logits": faster}
    if args.json:
        atomic_write_json(args.json, result)
    print(f"fused ({fused}) faster than eager from {crossover} logits; auto's threshold is {EAGER_MAX_LOGITS}")
    return 0


# --------------------------------------------------------------------------------------------------
# tap: feature_reduce vs plain pooling inside a distillation step
# --------------------------------------------------------------------------------------------------
def _tap_setting(args):
    """The MIM term's inputs and two methods on CIFAR-10-shaped random data (ConvNet-3, width 128)."""
    import torch

    from mim4dd_fast.methods.mim import MIMConfig, MIMTerm
    from mim4dd_fast.methods.registry import build_method, resolve
    from mim4dd_fast.models import build_model

    data = random_dataset(n_per_class=max(args.n_real, args.batch_real) + 1, seed=0)
    torch.manual_seed(0)
    net = build_model(3, 10, 32)
    for p in net.parameters():  # the term trains its heads and the images, never the network
        p.requires_grad_(False)
    term = MIMTerm(MIMConfig(n_real=args.n_real), net, 10)
    x_syn = torch.randn(10 * args.ipc, 3, 32, 32, requires_grad=True)
    y_syn = torch.arange(10).repeat_interleave(args.ipc)
    x_real = torch.randn(10 * args.n_real, 3, 32, 32)
    y_real = torch.arange(10).repeat_interleave(args.n_real)
    mim = {"n_real": args.n_real}
    mtt = resolve("mtt").spec
    mtt_cfg = mtt.config_class(syn_steps=5, max_start_epoch=1, expert_epochs=1)
    methods = {
        "dm+mim": build_method("dm+mim", data, args.ipc, config={"batch_real": args.batch_real}, mim=mim),
        "mtt+mim": build_method("mtt+mim", data, args.ipc, config=mtt_cfg, mim=mim,
                                experts=random_experts(data, mtt.expert_plan(mtt_cfg, data))),
    }
    return net, term, (x_syn, y_syn, x_real, y_real), methods


def cmd_tap(args) -> int:
    """For each pooling op of the tap, round-robin: the term's synthetic side (forward with graph through
    the tapped net, backward of the features), its real side (no_grad forward in chunks), the whole term
    (features, heads, loss, backward) and whole method steps. Bytes saved for backward and the peak-RSS
    rise are taken over one call after a warm-up call."""
    import torch

    from mim4dd_fast import hooks
    from mim4dd_fast.hooks import FeatureTap
    from mim4dd_fast.io import atomic_write_json
    from mim4dd_fast.profiling import PeakRSS, SavedTensorBytes, environment, summarize_times, time_interleaved

    torch.set_num_threads(args.threads)
    net, term, (x_syn, y_syn, x_real, y_real), methods = _tap_setting(args)
    cfg = term.config

    def tap():
        return FeatureTap(net, term.layers, cfg.pool, term.feature_dtype)

    def synthetic():
        with tap() as t:
            net(x_syn)
            feats = t.features
        sum(f.float().square().sum() for f in feats.values()).backward()
        x_syn.grad = None

    def real():
        with torch.no_grad(), tap() as t:
            for chunk in x_real.split(cfg.real_chunk):
                net(chunk)
                t.clear()

    def whole_term():
        loss, _ = term.loss(net, net, net, x_syn, y_syn, x_real, y_real)
        loss.backward()
        x_syn.grad = None
        term.zero_grad()

    def use(pool, fn):
        def run():
            hooks.POOL = pool
            return fn()

        return run

    pools = [p for p in hooks.POOLS if p != "auto"]
    parts = {"synthetic side": synthetic, "real side": real, "MIM term": whole_term,
             **{f"{name} step": method.step for name, method in methods.items()}}
    result = {"meta": {"environment": environment("cpu"), "command": " ".join(sys.argv), "ipc": args.ipc,
                       "n_real": args.n_real, "pool": cfg.pool, "repeats": args.repeats,
                       "model": "ConvNet-3 width 128 on 3x32x32, taps on the three block outputs"}, "rows": []}
    before = hooks.POOL
    try:
        for part, fn in parts.items():
            row = {"part": part}
            for pool in pools:
                use(pool, fn)()
                with PeakRSS() as rss, SavedTensorBytes() as saved:
                    use(pool, fn)()
                row[f"{pool}_saved_bytes"], row[f"{pool}_rss_rise_bytes"] = saved.peak, rss.delta
            times = time_interleaved({pool: use(pool, fn) for pool in pools}, repeats=args.repeats)
            for pool, samples in times.items():
                row[f"{pool}_median_s"] = summarize_times(samples)["median"]
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                atomic_write_json(args.json, result)
    finally:
        hooks.POOL = before
    return 0


# --------------------------------------------------------------------------------------------------
# summary: the verdict of bench/gpu_check.sh
# --------------------------------------------------------------------------------------------------
def _find(rows, **want):
    for r in rows:
        if all(r.get(k) == v for k, v in want.items()) and "median_s" in r:
            return r
    return None


def _ratio(num: dict | None, den: dict | None, key: str) -> float | None:
    if not num or not den or not num.get(key) or not den.get(key):
        return None
    return num[key] / den[key]


def verdict(value: float | None, op: str, bound: float, detail: str = "") -> dict:
    """One target of the summary: PASS when ``value`` is finite and ``value op bound`` (">=" or "<=") holds."""
    ok = value is not None and math.isfinite(value) and (value >= bound if op == ">=" else value <= bound)
    return {"value": value, "bound": f"{op} {bound}", "status": "PASS" if ok else "FAIL", "detail": detail}


def kernel_targets(kernels: dict) -> tuple[dict, dict]:
    """(targets, info) at N = M = 16384, D = 128 from a grid run: each target has value, bound, status."""
    rows, rates = kernels.get("rows", []), kernels.get("meta", {}).get("gemm_rate_tflops", {})
    targets, info = {}, {}

    def judge(name, value, op, bound, detail=""):
        targets[name] = verdict(value, op, bound, detail)

    for p in PRECISIONS:
        at = dict(N=TARGET_N, D=TARGET_D, precision=p)
        tri, eager, comp = (_find(rows, impl=impl, **at) for impl in ("triton", "eager", "compile"))
        info[p] = {
            "triton_s": tri and tri["median_s"], "eager_s": eager and eager["median_s"],
            "compile_s": comp and comp["median_s"], "triton_useful_tflops": tri and tri["useful_tflops"],
            "gemm_rate_tflops": rates.get(p), "triton_peak_bytes": tri and tri.get("peak_bytes"),
            "eager_peak_bytes": eager and eager.get("peak_bytes"),
            "triton_err_grad": tri and max(tri.get("err_grad_a", math.inf), tri.get("err_grad_b", math.inf)),
        }
        if p not in TENSOR_CORE_PRECISIONS:
            continue
        judge(f"speed_vs_eager@{p}", _ratio(eager, tri, "median_s"), ">=", 3.0,
              "eager median / triton median, forward + backward")
        judge(f"speed_vs_compile@{p}", _ratio(comp, tri, "median_s"), ">=", 1.5,
              "torch.compile(reference) median / triton median")
        util = tri["useful_tflops"] / rates[p] if (tri and rates.get(p)) else None
        judge(f"tensor_core_share@{p}", util, ">=", 0.5, "useful 6NMD FLOP/s over the measured GEMM rate")
        judge(f"peak_memory_vs_eager@{p}", _ratio(tri, eager, "peak_bytes"), "<=", 0.02,
              "allocation peak beyond the inputs, triton / eager")
    judge("tf32x3_grad_rel_err", info["tf32x3"]["triton_err_grad"], "<=", 1e-4,
          "max over both gradients of ||g - g64|| / ||g64||")
    failed = [r for r in rows if r.get("impl") in ("triton", "auto", "chunked") and "error" in r]
    detail = "; ".join(f"{r['impl']} {r['N']}x{r['D']} {r['precision']}: {r['error']}" for r in failed)
    targets["fused_paths_ran"] = {"value": len(failed), "bound": "== 0", "status": "FAIL" if failed else "PASS",
                                  "detail": detail[:500]}
    return targets, info


def crossover_target(cross: dict) -> dict:
    """auto must be within 25% of the faster of eager and the fused path at every measured size."""
    worst = None
    for r in cross.get("rows", []):
        fused = r.get("triton_s", r.get("chunked_s"))
        ratio = r["auto_s"] / min(r["eager_s"], fused)
        worst = ratio if worst is None else max(worst, ratio)
    ok = worst is not None and worst <= 1.25
    return {"value": worst, "bound": "<= 1.25", "status": "PASS" if ok else "FAIL",
            "detail": f"auto / min(eager, fused) at worst; measured crossover {cross.get('measured_crossover_logits')}"
                      f" logits, provisional threshold {cross.get('eager_max_logits')}"}


EVAL_SPEEDUP, EXPERT_SPEEDUP = 2.5, 2.0  # issue 15: 5 evaluation nets at once vs one by one; experts k per pass
EVAL_PARAM_RTOL, EVAL_ACCURACY_ATOL = 1e-2, 0.01  # batched = one by one up to float summation order


def evaluation_targets(ev: dict | None) -> dict:
    """Batched evaluation nets and experts (bench/evaluation.py) against one by one: the speed-up of each
    row (median seconds), and that the batched nets are the one-by-one nets (largest parameter
    difference relative to the largest parameter, largest accuracy difference)."""
    if ev is None:
        return {"batched_evaluation": {"value": None, "bound": "ran", "status": "FAIL", "detail": "no evaluation.json"}}
    targets = {}

    def judge(name, value, op, bound, detail=""):
        targets[name] = verdict(value, op, bound, detail)

    rows = ev.get("evaluation") or []
    judge("batched_evaluation_complete", float(bool(ev.get("complete"))), ">=", 1.0,
          "bench/evaluation.py finished every row (a step cut at its time limit leaves complete = false)")
    for r in rows:
        ceiling = r.get("roofline", {}).get("speedup_ceiling")
        judge(f"batched_eval_ipc{r['ipc']}", r.get("speedup_median"), ">=", EVAL_SPEEDUP,
              f"one by one / stacked, median seconds; roofline ceiling {ceiling}")
    experts = ev.get("experts")
    if experts:
        judge("batched_experts", experts.get("speedup_median"), ">=", EXPERT_SPEEDUP,
              f"{experts.get('experts')} experts, {experts.get('experts_per_pass')} per pass vs one by one")
    param = max((r["max_abs_param_diff"] / max(r["max_abs_param"], 1e-12) for r in rows), default=None)
    judge("batched_eval_params", param, "<=", EVAL_PARAM_RTOL, "max |param diff| / max |param|, stacked vs alone")
    accuracy = max((r["max_abs_accuracy_diff"] for r in rows), default=None)
    judge("batched_eval_accuracy", accuracy, "<=", EVAL_ACCURACY_ATOL, "max |accuracy diff|, stacked vs alone")
    return targets


def compare_runs(cpu_dir: Path, gpu_dir: Path, rtol: float) -> dict:
    """Per-iteration losses and the final synthetic images of a CUDA run against the CPU run."""
    from mim4dd_fast.io import load_tensors

    def metrics(d):
        return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]

    try:
        cpu, gpu = metrics(cpu_dir), metrics(gpu_dir)
        losses = [abs(g["loss"] - c["loss"]) / max(abs(c["loss"]), 1e-12) for c, g in zip(cpu, gpu, strict=True)]
        ci, gi = load_tensors(cpu_dir / "synthetic.safetensors"), load_tensors(gpu_dir / "synthetic.safetensors")
        images = float((gi["images"].double() - ci["images"].double()).norm() / ci["images"].double().norm())
    except (OSError, ValueError, KeyError) as exc:
        return {"value": None, "bound": f"<= {rtol}", "status": "FAIL", "detail": f"{type(exc).__name__}: {exc}"}
    worst = max([*losses, images])
    return {"value": worst, "bound": f"<= {rtol}", "status": "PASS" if worst <= rtol else "FAIL",
            "detail": f"loss rel. diff per iteration {[round(x, 6) for x in losses]}, images {images:.2e}"}


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_steps(path: Path) -> dict:
    """bench/gpu_check.sh's log of its steps: one line per step, 'name<TAB>exit code<TAB>seconds'."""
    steps = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return steps
    for line in lines:
        name, code, seconds = (line.split("\t") + ["", ""])[:3]
        steps[name] = {"exit_code": int(code) if code.lstrip("-").isdigit() else None, "seconds": seconds}
    return steps


def cmd_summary(args) -> int:
    from mim4dd_fast.io import atomic_write_json

    out = Path(args.outdir)
    steps = read_steps(out / "steps.tsv")
    targets, info = {}, {"steps": steps}
    kernels = _load(out / "kernels.json")
    if kernels is None:
        targets["kernel_benchmark"] = {"value": None, "bound": "ran", "status": "FAIL", "detail": "no kernels.json"}
    else:  # the grid's other files join for "fused_paths_ran"
        for extra in sorted(out.glob("kernels_*.json")):
            kernels["rows"] = kernels["rows"] + (_load(extra) or {}).get("rows", [])
        k_targets, info["kernels"] = kernel_targets(kernels)
        targets.update(k_targets)
    bench = {name: s for name, s in steps.items() if name.startswith("bench")}
    unfinished = [name for name, s in bench.items() if s.get("exit_code") != 0]
    targets["benchmark_complete"] = {
        "value": len(unfinished), "bound": "== 0", "status": "PASS" if bench and not unfinished else "FAIL",
        "detail": "steps that failed or ran out of time: " + (", ".join(unfinished) or "none")}
    cross = _load(out / "crossover.json")
    targets["auto_dispatch"] = crossover_target(cross) if cross else {
        "value": None, "bound": "ran", "status": "FAIL", "detail": "no crossover.json"}
    if cross:
        info["crossover"] = {k: cross.get(k) for k in ("measured_crossover_logits", "eager_max_logits")}
    targets.update(evaluation_targets(_load(out / "evaluation.json")))
    code = steps.get("tests", {}).get("exit_code")
    targets["gpu_tests"] = {"value": code, "bound": "== 0", "status": "PASS" if code == 0 else "FAIL",
                            "detail": "the GPU tests (tests.txt)"}
    for method in args.methods:
        runs = out / "distill"
        targets[f"distill_{method}"] = compare_runs(runs / f"{method}-cpu", runs / f"{method}-{args.other_device}",
                                                    args.distill_rtol)
    if args.dry_run:  # the GPU figures of a CPU dry run mean nothing: report them, judge nothing
        for t in targets.values():
            t["status"] = "DRY"
        failed = [name for name, s in steps.items() if s.get("exit_code") != 0]
    else:
        failed = [name for name, t in targets.items() if t["status"] != "PASS"]
    summary = {"verdict": "FAIL" if failed else ("DRY-RUN OK" if args.dry_run else "PASS"), "failed": failed,
               "targets": targets, "info": info}
    atomic_write_json(out / "summary.json", summary)
    for name, t in targets.items():
        value = t["value"] if not isinstance(t["value"], float) else f"{t['value']:.4g}"
        print(f"{t['status']:5} {name:28} {value} (bound {t['bound']}) {t['detail'][:100]}")
    print(f"verdict: {summary['verdict']}" + (f" ({', '.join(failed)})" if failed else ""))
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------
def build_parser() -> Parser:
    import torch

    cuda = torch.cuda.is_available()
    p = Parser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("grid", help="the contrastive loss: sizes x dims x precisions x impls")
    g.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    g.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    g.add_argument("--precisions", nargs="+", choices=PRECISIONS, help="default: all on CUDA, ieee on CPU")
    g.add_argument("--impls", nargs="+", choices=GRID_IMPLS, help="default: all that apply to the device")
    g.add_argument("--critic", default="infonce")
    g.add_argument("--no-accuracy", dest="accuracy", action="store_false", help="skip the float64 comparison")
    g.add_argument("--no-isolate", action="store_true", help="CPU: measure memory in this process")
    g.add_argument("--rate-size", type=int, default=8192 if cuda else 1024, help="square GEMM for the rate")
    c = sub.add_parser("crossover", help="eager vs the fused path at small sizes")
    c.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 1448, 2048, 2896, 4096])
    c.add_argument("--dim", type=int, default=128)
    c.add_argument("--precision", default="tf32x3" if cuda else "ieee", choices=PRECISIONS)
    t = sub.add_parser("tap", help="feature_reduce vs plain pooling in distillation steps (CPU)")
    t.add_argument("--ipc", type=int, default=10)
    t.add_argument("--n-real", type=int, default=64)
    t.add_argument("--batch-real", type=int, default=64)
    for s in (g, c, t):
        s.add_argument("--device", default="cuda" if cuda else "cpu", choices=("cpu", "cuda"))
        s.add_argument("--repeats", type=int, default=5)
        s.add_argument("--threads", type=int, default=torch.get_num_threads())
        s.add_argument("--min-sample-s", type=float, default=0.05 if cuda else 0.0,
                       help="repeat fast steps inside one timed sample up to this long")
        s.add_argument("--json", metavar="PATH")
    s = sub.add_parser("summary", help="judge a bench/gpu_check.sh output directory")
    s.add_argument("outdir")
    s.add_argument("--methods", nargs="*", default=["mim4dd", "mtt", "dc", "dm"])
    s.add_argument("--distill-rtol", type=float, default=1e-2)
    s.add_argument("--other-device", default="cuda", help="the runs compared with the CPU runs")
    s.add_argument("--dry-run", action="store_true")
    m = sub.add_parser("_memory")
    m.add_argument("spec")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # no subcommand: say what there is (every subcommand runs for minutes)
        build_parser().print_help()
        return 0
    try:
        args = build_parser().parse_args(argv)
        if args.cmd in ("grid", "crossover", "tap") and args.repeats < 1:
            raise ArgError(f"--repeats must be at least 1, got {args.repeats}.")
        if getattr(args, "device", "cpu") == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ArgError("--device cuda needs a CUDA device; none is visible.")
    except ArgError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    commands = {"grid": cmd_grid, "crossover": cmd_crossover, "tap": cmd_tap, "summary": cmd_summary}
    if args.cmd == "_memory":
        return _child_memory(args.spec)
    t0 = time.perf_counter()
    code = commands[args.cmd](args)
    print(f"{args.cmd} took {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

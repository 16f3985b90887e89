"""Benchmark the contrastive loss: reference vs chunked vs Triton (CUDA) vs torch.compile(reference).

Forward + backward of the InfoNCE (or NCE) loss on random float32 data, N = M, 10 classes. For each
(size, impl) it reports the median time, the useful GFLOP/s (6*N*M*D matmul FLOPs: 2NMD forward,
4NMD backward; recomputation not counted) against a plain torch.mm of [N,D]x[D,M] timed in the same
run, the bytes autograd saves for backward (each storage once) and the peak memory:
CUDA max_memory_allocated above the inputs, or on CPU the peak-RSS rise over the steady state
(VmHWM reset through /proc/self/clear_refs right before the timed loop), each impl in a fresh
subprocess so that one impl's heap does not flatter the next.

    python bench/kernels.py --sizes 1024 4096 --dims 128 --impls reference chunked compile --json out.json
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

IMPLS = ("reference", "chunked", "triton", "compile")


def _rss_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _make_inputs(N: int, D: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, D, generator=g).to(device).requires_grad_(True)
    b = torch.randn(N, D, generator=g).to(device).requires_grad_(True)
    ya = torch.randint(0, 10, (N,), generator=g).to(device)
    yb = torch.randint(0, 10, (N,), generator=g).to(device)
    return a, b, ya, yb


def _loss_fn(impl: str, critic: str):
    """reference / compile use the check-free reference math (no host syncs, no graph breaks)."""
    from mim4dd_fast.kernels import contrastive_loss
    from mim4dd_fast.kernels.reference import contrastive_loss_reference_unchecked as reference

    if impl == "reference":
        return lambda a, b, ya, yb: reference(a, b, ya, yb, critic=critic)
    if impl == "compile":
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
        compiled = torch.compile(reference, dynamic=False)
        return lambda a, b, ya, yb: compiled(a, b, ya, yb, critic=critic)
    return lambda a, b, ya, yb: contrastive_loss(a, b, ya, yb, critic=critic, impl=impl)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, device: str, repeats: int) -> tuple[float, float]:
    """Median wall-clock seconds and median process CPU seconds (all threads) per call."""
    walls, cpus = [], []
    for _ in range(repeats):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def _saved_bytes(loss_fn, a, b, ya, yb) -> int:
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(a, b, ya, yb)
    return sum(seen.values())


def measure(impl: str, N: int, D: int, device: str, repeats: int, critic: str) -> dict:
    """One (impl, size) measurement; impl "mm" times the plain matmul ceiling."""
    a, b, ya, yb = _make_inputs(N, D, device)
    row = {"impl": impl, "N": N, "M": N, "D": D, "device": device, "critic": critic}
    if impl == "mm":
        x, y = a.detach(), b.detach().T.contiguous()
        torch.mm(x, y)
        row["median_s"], row["cpu_s"] = _median_time(lambda: torch.mm(x, y), device, repeats)
        row["gflops"] = 2 * N * N * D / row["median_s"] / 1e9
        return row

    loss_fn = _loss_fn(impl, critic)

    def step():
        loss_fn(a, b, ya, yb).backward()
        a.grad = b.grad = None

    step()  # warm-up (and compilation for "compile" / Triton JIT)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        row["median_s"], row["cpu_s"] = _median_time(step, device, repeats)
        row["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        row["peak_kind"] = "cuda max_memory_allocated above inputs"
    else:
        reset = _reset_peak_rss()
        base = _rss_bytes("VmRSS")
        row["median_s"], row["cpu_s"] = _median_time(step, device, repeats)
        peak = _rss_bytes("VmHWM")
        if reset and base is not None and peak is not None:
            row["peak_bytes"] = max(0, peak - base)
            row["peak_kind"] = "peak RSS rise over steady state (fresh process)"
        else:
            row["peak_bytes"] = None
            row["peak_kind"] = "unavailable (no /proc/self/clear_refs)"
    row["saved_bytes"] = _saved_bytes(loss_fn, a, b, ya, yb)
    row["gflops"] = 6 * N * N * D / row["median_s"] / 1e9
    return row


def _run_isolated(impl, N, D, device, repeats, critic, threads) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps([impl, N, D, device, repeats, critic]),
           "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"impl": impl, "N": N, "M": N, "D": D, "device": device, "critic": critic, "error": tail[0]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt_mb(n):
    return "-" if n is None else f"{n / 1e6:,.1f}"


def render(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    ceiling = {(r["N"], r["D"]): r["gflops"] for r in rows if r["impl"] == "mm" and "gflops" in r}
    table = Table(title="contrastive loss, forward + backward (useful FLOPs = 6*N*M*D)")
    for col in ("N=M", "D", "impl", "median s", "cpu s", "GFLOP/s", "% of mm", "saved MB", "peak MB"):
        table.add_column(col, justify="right")
    for r in rows:
        if "error" in r:
            table.add_row(str(r["N"]), str(r["D"]), r["impl"], "error", r["error"][:60], "", "", "", "")
            continue
        ceil = ceiling.get((r["N"], r["D"]))
        pct = f"{100 * r['gflops'] / ceil:.0f}%" if ceil and r["impl"] != "mm" else "-"
        table.add_row(str(r["N"]), str(r["D"]), r["impl"], f"{r['median_s']:.4f}", f"{r['cpu_s']:.4f}",
                      f"{r['gflops']:.1f}", pct,
                      _fmt_mb(r.get("saved_bytes")), _fmt_mb(r.get("peak_bytes")))
    console = Console(width=max(120, Console().width))
    console.print(table)
    kinds = sorted({r["peak_kind"] for r in rows if "peak_kind" in r})
    if kinds:
        console.print("peak MB: " + "; ".join(kinds))
    console.print("median s: wall clock; cpu s: process CPU time, all threads (less sensitive to a shared "
                  "machine); GFLOP/s from wall clock.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384], help="N = M values")
    p.add_argument("--dims", type=int, nargs="+", default=[128, 512], help="feature sizes D")
    p.add_argument("--impls", nargs="+", default=None, choices=IMPLS,
                   help="default: all that apply (triton only on CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--critic", default="infonce", choices=("infonce", "nce"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-isolate", action="store_true", help="measure in this process (default on CUDA)")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.child:
        impl, N, D, device, repeats, critic = json.loads(args.child)
        print(json.dumps(measure(impl, N, D, device, repeats, critic)))
        return 0

    impls = args.impls or [i for i in IMPLS if i != "triton" or args.device == "cuda"]
    if "triton" in impls and args.device != "cuda":
        p.error("--impls triton needs --device cuda (the interpreter is for tests, not timing)")
    isolate = args.device == "cpu" and not args.no_isolate
    rows = []
    for D in args.dims:
        for N in args.sizes:
            for impl in ["mm", *impls]:
                if isolate:
                    row = _run_isolated(impl, N, D, args.device, args.repeats, args.critic, args.threads)
                else:
                    try:
                        row = measure(impl, N, D, args.device, args.repeats, args.critic)
                    except Exception as exc:  # e.g. out of memory: report and keep going
                        row = {"impl": impl, "N": N, "M": N, "D": D, "device": args.device,
                               "critic": args.critic, "error": f"{type(exc).__name__}: {exc}"}
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                if args.json:  # rewritten after every row: a run cut short still leaves its results
                    _write_json(args.json, rows, args, isolate)
    render(rows)
    return 0


def _write_json(path: str, rows: list[dict], args, isolate: bool) -> None:
    meta = {"torch": torch.__version__, "threads": args.threads, "device": args.device,
            "cuda_name": torch.cuda.get_device_name() if args.device == "cuda" else None,
            "isolated_processes": isolate, "useful_flops": "6*N*M*D (2NMD forward + 4NMD backward)"}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())

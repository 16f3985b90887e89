"""Measuring instruments: timers, FLOP counting, bytes held for backward, peak RSS, profiler traces.

Every number the benchmark suite prints comes from one of these, measured in that run. Each tool is
a small context manager or function so a method's ``step()`` can be measured without touching it:

- ``SavedTensorBytes``: bytes autograd keeps for backward (``saved_tensors_hooks``), each storage
  counted once; reports both the peak held at any moment and the total ever saved.
- ``PeakRSS``: the process resident-set peak over a phase, minus the RSS at its start. On Linux the
  kernel's high-water mark (VmHWM) is reset through ``/proc/self/clear_refs`` so the peak is exact
  and per phase; elsewhere a background thread samples RSS every few milliseconds (a lower bound
  that can miss spikes shorter than the interval). ``PeakRSS.method`` says which one ran.
  ``ru_maxrss_bytes()`` is the process-lifetime peak (never reset), kept for reference only.
- ``CudaPeak``: ``torch.cuda.max_memory_allocated`` over a phase (reset at its start).
- ``measure_flops``: ``torch.utils.flop_counter.FlopCounterMode`` over one call (forward and
  backward; conv/matmul/attention plus custom ops with a registered formula; elementwise ops,
  norms and pooling count zero by that convention).
- ``peak_flops``: the fp32 FLOP/s this machine reaches on a large matrix product and a large
  convolution, the roofline counted FLOPs cannot beat (counted FLOPs over it is the least time a path
  doing them can take).
- ``op_seconds``: the time one call of a function spends inside the ops whose name contains a given
  text (torch.profiler, self time: CPU time on CPU, kernel time on CUDA), e.g. its convolutions.
- ``time_calls``: wall-clock per call with CUDA synchronisation, split into warm-up and measured.
- ``time_interleaved``: several functions timed side by side (round-robin), so load changes on a
  shared machine hit all of them alike and their ratio is meaningful.
- ``trace``: ``torch.profiler`` run written through ``tensorboard_trace_handler``.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# -- bytes held for backward ------------------------------------------------------------------


class _Held:
    """What the pack hook returns: holds the tensor; its deletion means autograd released it."""

    __slots__ = ("tensor", "key", "owner")

    def __init__(self, tensor: torch.Tensor, key: tuple[str, int] | None, owner: SavedTensorBytes) -> None:
        self.tensor, self.key, self.owner = tensor, key, owner

    def __del__(self) -> None:
        if self.key is not None:
            self.owner._release(self.key)


class SavedTensorBytes:
    """Count the bytes autograd saves for backward inside the ``with`` block.

    Each underlying storage (keyed by device and ``untyped_storage().data_ptr()``) is counted once,
    however many graph nodes save it or views of it. ``peak`` is the most bytes held at any moment
    (a storage is released when the last graph node saving it is freed, e.g. after backward);
    ``total`` is every distinct storage ever saved while active. ``current`` is what is held now.
    Tensors saved inside nested hooks of their own (e.g. non-reentrant checkpointing) are not seen.
    """

    def __init__(self) -> None:
        self._refs: dict[tuple[str, int], int] = {}
        self._sizes: dict[tuple[str, int], int] = {}
        self._lock = threading.RLock()  # re-entrant: a GC-run __del__ may release inside _pack
        self.current = 0
        self.peak = 0
        self.total = 0
        self._ctx: Any = None

    def _pack(self, tensor: torch.Tensor) -> _Held:
        try:
            storage = tensor.untyped_storage()
            key = (str(tensor.device), storage.data_ptr())
            nbytes = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without a storage (e.g. wrappers)
            return _Held(tensor, None, self)
        with self._lock:
            count = self._refs.get(key, 0)
            self._refs[key] = count + 1
            if count == 0:
                self._sizes[key] = nbytes
                self.current += nbytes
                self.total += nbytes
                self.peak = max(self.peak, self.current)
        return _Held(tensor, key, self)

    @staticmethod
    def _unpack(held: _Held) -> torch.Tensor:
        return held.tensor

    def _release(self, key: tuple[str, int]) -> None:
        with self._lock:
            count = self._refs.get(key, 0) - 1
            if count <= 0:
                self._refs.pop(key, None)
                self.current -= self._sizes.pop(key, 0)
            else:
                self._refs[key] = count

    def __enter__(self) -> SavedTensorBytes:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


# -- resident set size ------------------------------------------------------------------------


def rss_bytes() -> int:
    """Current resident set size of this process."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def ru_maxrss_bytes() -> int:
    """Process-lifetime peak RSS from getrusage (KiB on Linux, bytes on macOS). Never resets."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _vm_hwm() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _vm_hwm() is not None


class PeakRSS:
    """Peak RSS over the ``with`` block minus the RSS at its start (``delta``, bytes).

    ``method`` is ``"vmhwm"`` (exact kernel high-water mark, reset at entry) or ``"sampled"`` (a
    thread reading RSS every ``interval`` seconds: a lower bound).
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.start = 0
        self.peak = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.start)

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, int(proc.memory_info().rss))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start = rss_bytes()
        self.peak = self.start
        if _reset_hwm():
            self.method = "vmhwm"
        else:
            self.method = "sampled"
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.method == "vmhwm":
            self.peak = max(self.start, _vm_hwm() or 0)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak = max(self.peak, rss_bytes())


class CudaPeak:
    """``torch.cuda.max_memory_allocated`` over the block (``peak``) and above its start (``delta``)."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cuda")
        self.start = self.peak = 0

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.start)

    def __enter__(self) -> CudaPeak:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device)


@dataclass
class MemoryReport:
    """Memory of one measured call. ``peak_bytes``/``kind`` is the headline figure for the device."""

    saved_peak: int  # most bytes held for backward at once (each storage once)
    saved_total: int  # every distinct storage saved during the call
    rss_delta: int  # process peak RSS rise over the call (0 on CUDA runs is meaningful: host only)
    rss_method: str
    cuda_peak: int | None  # max_memory_allocated during the call (CUDA only)
    cuda_delta: int | None

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.cuda_peak is not None else "cpu_saved_for_backward"

    @property
    def peak_bytes(self) -> int:
        return int(self.cuda_peak) if self.cuda_peak is not None else int(self.saved_peak)


def measure_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, MemoryReport]:
    """Run ``fn()`` once under every memory counter that applies to ``device``."""
    device = torch.device(device)
    cuda = CudaPeak(device) if device.type == "cuda" else None
    with PeakRSS() as rss, SavedTensorBytes() as saved:
        if cuda is not None:
            with cuda:
                out = fn()
        else:
            out = fn()
    return out, MemoryReport(
        saved_peak=saved.peak,
        saved_total=saved.total,
        rss_delta=rss.delta,
        rss_method=rss.method,
        cuda_peak=cuda.peak if cuda else None,
        cuda_delta=cuda.delta if cuda else None,
    )


# -- FLOPs ------------------------------------------------------------------------------------


@dataclass
class FlopReport:
    total: int
    by_op: dict[str, int] = field(default_factory=dict)  # aten op name -> FLOPs (all modules)


def measure_flops(fn: Callable[[], Any]) -> tuple[Any, FlopReport]:
    """FLOPs of one call of ``fn()`` (forward and whatever backward it runs) by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    by_op: dict[str, int] = {}
    for op, n in counter.get_flop_counts().get("Global", {}).items():
        name = str(getattr(op, "__name__", op))
        by_op[name] = by_op.get(name, 0) + int(n)
    return out, FlopReport(total=int(counter.get_total_flops()), by_op=by_op)


# -- time -------------------------------------------------------------------------------------


def synchronize(device: torch.device | str) -> None:
    """Wait for queued device work so wall-clock covers it (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, float]:
    """``(fn(), seconds)`` with the device synchronised before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


def peak_flops(size: int = 2048, repeats: int = 10, device: torch.device | str = "cpu") -> dict[str, float]:
    """Best fp32 FLOP/s of a large matrix product and of a large 3x3 convolution, and the larger of the two.

    Why: the FLOPs ``measure_flops`` counts run in matrix-product and convolution kernels, and large,
    regular shapes are the best case those kernels reach on a machine at the current thread count; so
    counted FLOPs over ``peak`` is a floor on the seconds any path doing them can take. Both kernels
    are measured because on a CPU they come from different libraries that can be 2x apart (MKL's
    sgemm vs oneDNN's convolutions on an AMD Zen 5, measured). The product is ``size`` x ``size``;
    the convolution is 256 -> 256 channels on 8x8 maps, ``max(1, size // 32)`` images (2 FLOPs per
    multiply-add in both). The best of ``repeats`` timed calls after one untimed one, so the floor
    errs low (generous to the path measured against it).
    """
    if size < 1 or repeats < 1:
        raise ValueError("peak_flops needs size >= 1 and repeats >= 1")
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    a, b, out = rand(size, size), rand(size, size), torch.empty(size, size, device=device)
    images, channels, side = max(1, size // 32), 256, 8
    x, w = rand(images, channels, side, side), rand(channels, channels, 3, 3)
    work = {"matmul": (lambda: torch.mm(a, b, out=out), 2.0 * size**3),
            "conv3x3": (lambda: F.conv2d(x, w, padding=1), 2.0 * images * side * side * channels * channels * 9)}
    rates = {}
    for name, (call, flops) in work.items():
        call()
        best = min(timed(call, device)[1] for _ in range(repeats))
        rates[name] = flops / max(best, 1e-9)
    rates["peak"] = max(rates.values())
    return rates


def op_seconds(fn: Callable[[], Any], match: str, device: torch.device | str = "cpu") -> tuple[Any, float]:
    """``(fn(), seconds)``: the self time of every op whose name contains ``match`` during one call of ``fn``.

    Why: a path's time in its convolutions alone is a ceiling no cut of its other work can pass (the
    path minus everything but these ops). On CPU the ops' self CPU time (the calling thread's wall time
    in them, their worker threads included), on CUDA their kernels' device time. Profiler overhead
    lands mostly on the many small ops, not on the matched ones when those are large.
    """
    from torch.profiler import ProfilerActivity, profile

    on_cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        out = fn()
        synchronize(device)
    field = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    micro = sum(getattr(e, field, 0.0) for e in prof.key_averages() if match in e.key)
    return out, micro / 1e6


def time_calls(
    fn: Callable[[], Any], n: int, warmup: int = 1, device: torch.device | str = "cpu"
) -> tuple[list[Any], list[float]]:
    """Run ``fn`` ``warmup + n`` times; return all outputs and the ``n`` measured durations."""
    outs, times = [], []
    for i in range(warmup + n):
        out, dt = timed(fn, device)
        outs.append(out)
        if i >= warmup:
            times.append(dt)
    return outs, times


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, *, warmup: int = 1, inner: dict[str, int] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin: ``repeats`` rounds, each timing every
    function once (``inner[name]`` calls per sample, default 1, divided back out) after ``warmup``
    untimed rounds."""
    inner = inner or {}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            k = max(1, int(inner.get(name, 1)))
            _, dt = timed(lambda fn=fn, k=k: [fn() for _ in range(k)], device)
            if r >= warmup:
                times[name].append(dt / k)
    return times


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]), as numpy's default."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize_times(times: list[float]) -> dict[str, float]:
    """Median, p90, mean and total seconds of measured durations."""
    return {
        "median": percentile(times, 50),
        "p90": percentile(times, 90),
        "mean": sum(times) / len(times) if times else math.nan,
        "total": float(sum(times)),
    }


# -- profiler traces --------------------------------------------------------------------------


def trace(
    out_dir: str | Path,
    fn: Callable[[], Any],
    steps: int = 3,
    *,
    warmup: int = 1,
    name: str = "run",
    device: torch.device | str = "cpu",
) -> list[Path]:
    """Profile ``steps`` calls of ``fn`` (after ``warmup`` untraced-but-scheduled calls).

    Writes ``<out_dir>/<name>.*.pt.trace.json`` through ``tensorboard_trace_handler``: view with
    ``tensorboard --logdir out_dir`` (torch-tb-profiler) or open the JSON in https://ui.perfetto.dev.
    Returns the trace files written by this call.
    """
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    before = set(out_dir.glob("*.pt.trace.json*"))
    activities = [ProfilerActivity.CPU]
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(
        activities=activities,
        schedule=schedule(wait=0, warmup=warmup, active=steps, repeat=1),
        on_trace_ready=tensorboard_trace_handler(str(out_dir), worker_name=name),
        record_shapes=True,
        profile_memory=True,
        with_stack=True,
    ) as prof:
        for _ in range(warmup + steps):
            fn()
            synchronize(device)
            prof.step()
    return sorted(set(out_dir.glob("*.pt.trace.json*")) - before)


# -- environment ------------------------------------------------------------------------------


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Versions, device name and thread count: recorded once per benchmark run."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional on CPU
        triton_version = None
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine() or "cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    device_name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": device_name,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.version.cuda,
    }

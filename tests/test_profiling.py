"""The measuring instruments against values computed by hand."""

import json
import math

import pytest
import torch

from mim4dd_fast import profiling
from mim4dd_fast.models import ConvNet


def test_saved_bytes_of_a_product_counts_both_operands():
    x = torch.randn(1000, requires_grad=True)
    y = torch.randn(1000, requires_grad=True)
    with profiling.SavedTensorBytes() as saved:
        z = x * y  # mul saves x (for dy) and y (for dx)
    assert saved.total == 2 * 1000 * 4
    assert saved.peak == 2 * 1000 * 4
    assert saved.current == 2 * 1000 * 4
    z.sum().backward()
    del z
    assert saved.current == 0  # freeing the graph releases what it held


def test_saved_bytes_counts_a_storage_once_across_views_and_nodes():
    x = torch.randn(4, 256, requires_grad=True)
    w = torch.randn(256, requires_grad=True)
    with profiling.SavedTensorBytes() as saved:
        a = x[0] * w  # saves a view of x and w
        b = x[1] * w  # another view of the same x storage, and w again
    assert saved.total == 4 * 256 * 4 + 256 * 4
    del a, b


def test_saved_bytes_peak_is_below_total_when_graphs_are_freed_between_steps():
    w = torch.randn(500, requires_grad=True)
    with profiling.SavedTensorBytes() as saved:
        for _ in range(3):
            x = torch.randn(500)
            (x * w).sum().backward()  # saves x only (w's grad needs x); graph freed each time
    assert saved.total == 3 * 500 * 4
    assert saved.peak == 500 * 4


def _return_free_heap_to_the_os() -> None:
    """glibc serves even a 64 MiB request from free, still-resident heap left by earlier tests (e.g. the
    ResNet-18 stack in test_models.py), which raises no RSS; malloc_trim hands that memory back first."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to trim
        pass


def test_peak_rss_sees_a_large_temporary_allocation():
    n = 64 * 2**20
    _return_free_heap_to_the_os()
    with profiling.PeakRSS() as rss:
        t = torch.ones(n // 4)  # 64 MiB touched
        del t
    assert rss.method in ("vmhwm", "sampled")
    assert rss.delta >= 0.9 * n
    assert profiling.ru_maxrss_bytes() >= rss.peak * 0.9


def _convnet_hand_flops(batch, cin, width, classes, size, depth):
    """Hand arithmetic: each 3x3 conv 2*Cin*Cout*9*H*W per image (H, W: its output = input size),
    pooling halves the side, then the linear layer 2*in*out."""
    total, c, h = 0, cin, size
    for _ in range(depth):
        total += 2 * c * width * 9 * h * h
        c, h = width, h // 2
    total += 2 * (width * h * h) * classes
    return batch * total


def test_flops_of_one_convnet_forward_match_hand_computation():
    torch.manual_seed(0)
    net = ConvNet(3, 10, 32, width=16, depth=3)
    x = torch.randn(2, 3, 32, 32)
    _, report = profiling.measure_flops(lambda: net(x))
    # Written out: 2 images x [2*3*16*9*32*32 + 2*16*16*9*16*16 + 2*16*16*9*8*8 + 2*(16*4*4)*10]
    #            = 2 x [884736 + 1179648 + 294912 + 5120] = 4728832
    per_image = 2 * 3 * 16 * 9 * 32 * 32 + 2 * 16 * 16 * 9 * 16 * 16 + 2 * 16 * 16 * 9 * 8 * 8 + 2 * 256 * 10
    assert 2 * per_image == 4728832
    assert report.total == 4728832
    assert report.total == _convnet_hand_flops(2, 3, 16, 10, 32, 3)


def test_flops_of_forward_and_backward_are_three_forwards_when_input_needs_grad():
    # backward = grad wrt weights + grad wrt inputs, each the forward's cost per layer
    net = ConvNet(1, 10, 8, width=8, depth=2)
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    _, fwd = profiling.measure_flops(lambda: net(x))
    _, both = profiling.measure_flops(lambda: net(x).sum().backward())
    assert fwd.total == _convnet_hand_flops(4, 1, 8, 10, 8, 2)
    assert both.total == 3 * fwd.total


def test_time_calls_splits_warmup_and_summary_statistics():
    calls = []
    outs, times = profiling.time_calls(lambda: calls.append(1) or len(calls), n=4, warmup=2)
    assert outs == [1, 2, 3, 4, 5, 6] and len(times) == 4
    assert all(t >= 0 for t in times)
    s = profiling.summarize_times([1.0, 2.0, 3.0, 4.0, 10.0])
    assert s["median"] == 3.0
    assert s["p90"] == pytest.approx(4.0 + 0.6 * 6.0)  # numpy-style linear interpolation
    assert s["total"] == 20.0
    assert math.isnan(profiling.percentile([], 50))


def test_time_interleaved_runs_round_robin_and_divides_inner_calls(monkeypatch):
    calls = []
    clock = iter(range(1000))
    monkeypatch.setattr(profiling.time, "perf_counter", lambda: float(next(clock)))  # +1 s per reading
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = profiling.time_interleaved(fns, repeats=3, warmup=1, inner={"b": 4})
    # one warm-up round then three measured rounds, each a then b; b runs 4 calls per sample
    assert calls == (["a"] + ["b"] * 4) * 4
    assert times == {"a": [1.0] * 3, "b": [0.25] * 3}  # one clock tick per sample, / inner calls


def test_measure_memory_reports_saved_bytes_on_cpu():
    w = torch.randn(256, 256, requires_grad=True)
    x = torch.randn(64, 256)

    def step():
        y = torch.tanh(x @ w)  # mm saves x (w needs grad); tanh saves its output
        y.sum().backward()

    _, mem = profiling.measure_memory(step)
    assert mem.kind == "cpu_saved_for_backward"
    assert mem.saved_total == 64 * 256 * 4 * 2
    assert mem.peak_bytes == mem.saved_peak == 64 * 256 * 4 * 2
    assert mem.cuda_peak is None


def test_trace_writes_a_chrome_trace_that_perfetto_can_read(tmp_path):
    net = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    files = profiling.trace(tmp_path, lambda: net(x).sum().backward(), steps=2, name="lin")
    assert len(files) == 1 and files[0].name.startswith("lin") and files[0].name.endswith(".pt.trace.json")
    data = json.loads(files[0].read_text())
    names = {ev.get("name") for ev in data["traceEvents"]}
    assert "aten::addmm" in names or "aten::linear" in names


def test_environment_lists_versions_and_threads():
    env = profiling.environment("cpu")
    assert env["torch"] == torch.__version__
    assert env["threads"] == torch.get_num_threads()
    assert env["device"] == "cpu" and env["device_name"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_sees_an_allocation():
    with profiling.CudaPeak() as peak:
        t = torch.empty(2**20, device="cuda")
        del t
    assert peak.delta >= 4 * 2**20

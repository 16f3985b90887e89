"""bench/evaluation.py: its roofline arithmetic, what its FLOP count covers, and a smoke run end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import mim4dd_fast.profiling as profiling
from mim4dd_fast.data import load_dataset
from mim4dd_fast.evaluation import EvalConfig, random_subset, train_net

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "evaluation.py"
sys.path.insert(0, str(SCRIPT.parent))
import evaluation as bench_evaluation  # noqa: E402  (bench/evaluation.py)


def test_peak_is_the_textbook_flops_over_the_best_call_of_each_kernel(monkeypatch):
    seconds = iter([0.5, 0.25, 0.4, 0.1, 0.3, 0.2])  # matmul's three calls, then the convolution's
    monkeypatch.setattr(profiling, "timed", lambda fn, device="cpu": (fn(), next(seconds)))
    rates = profiling.peak_flops(size=64, repeats=3)
    assert rates["matmul"] == pytest.approx(2 * 64**3 / 0.25)  # 2 n^3 for an n x n product
    assert rates["conv3x3"] == pytest.approx(2 * 2 * 8 * 8 * 256 * 256 * 9 / 0.1)  # 64 // 32 = 2 images
    assert rates["peak"] == max(rates["matmul"], rates["conv3x3"])
    with pytest.raises(ValueError):
        profiling.peak_flops(size=0)


def test_peak_measures_real_rates():
    rates = profiling.peak_flops(size=128, repeats=2)
    assert all(1e8 < r < 1e15 for r in rates.values())  # at least 0.1 GFLOP/s, below any machine's fp32 peak


def test_op_seconds_counts_the_named_ops_only():
    import time

    import torch

    a = torch.randn(512, 512)

    def work():
        time.sleep(0.2)  # not an op: never counted
        return [torch.mm(a, a) for _ in range(5)]

    t0 = time.perf_counter()
    out, mm_s = profiling.op_seconds(work, "aten::mm")
    wall = time.perf_counter() - t0
    assert len(out) == 5
    assert 0 < mm_s < wall - 0.2 + 0.05  # the products' time, not the sleep
    assert profiling.op_seconds(work, "no_such_op")[1] == 0.0


def test_roofline_by_hand():
    f = bench_evaluation.roofline(600, {"one_by_one": 4.0, "stacked": 2.0}, "one_by_one",
                                  {"matmul": 200.0, "conv3x3": 300.0, "peak": 300.0})
    assert f["floor_s"] == pytest.approx(2.0)  # 600 FLOPs at 300 FLOP/s
    assert f["speedup_ceiling"] == pytest.approx(2.0)  # 4 s one by one over the 2 s floor
    assert f["flops_per_s"] == pytest.approx({"one_by_one": 150.0, "stacked": 300.0})
    assert f["peak_fraction"] == pytest.approx({"one_by_one": 0.5, "stacked": 1.0})


def test_conv_ceiling_by_hand():
    assert bench_evaluation.conv_ceiling(3.0, 1.5) == {"stacked_conv_s": 1.5, "conv_ceiling": 2.0}
    assert bench_evaluation.conv_ceiling(3.0, 0.0)["conv_ceiling"] is None  # no convolution time seen


def test_counted_flops_of_a_training_step_are_the_textbook_count():
    """What the roofline counts: every conv and linear forward, its weight gradient, and its input gradient
    except the first conv's (the images need none); 2 FLOPs per multiply-add. Elementwise work counts 0."""
    digits = load_dataset("digits")
    x, y = random_subset(digits, 1, seed=0)  # 10 images of 1x8x8: one minibatch, so one step per epoch
    width, classes, b = 8, 10, x.shape[0]
    cfg = EvalConfig(epochs=2, width=width, depth=2, dsa=False)  # DSA's affine grids would add batched matmuls
    _, counted = profiling.measure_flops(lambda: train_net(x, y, digits, cfg, seed=0))
    conv1 = 2 * b * 8 * 8 * width * 1 * 9  # 3x3, padding 1, on 8x8
    conv2 = 2 * b * 4 * 4 * width * width * 9  # after one 2x2 pool
    linear = 2 * b * (width * 2 * 2) * classes  # after the second pool
    per_step = 2 * conv1 + 3 * conv2 + 3 * linear
    assert counted.total == cfg.epochs * per_step


def test_smoke_run_reports_the_roofline(tmp_path):
    out = tmp_path / "evaluation.json"
    res = subprocess.run([sys.executable, str(SCRIPT), "--ipcs", "1", "--nets", "2", "--epochs", "2", "--repeats", "1",
                          "--threads", "1", "--experts", "2", "--expert-epochs", "1", "--expert-width", "8",
                          "--peak-size", "128", "--json", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    assert data["complete"] is True  # rows are saved as they finish; the last write marks the run whole
    for f in (data["evaluation"][0]["roofline"], data["experts"]["roofline"]):
        assert f["flops"] > 0 and f["peak_flops_per_s"] > 0
        assert f["floor_s"] == pytest.approx(f["flops"] / f["peak_flops_per_s"])
        assert set(f["peak_fraction"]) == {"one_by_one", "stacked"}
        assert 0 < f["stacked_conv_s"] and f["conv_ceiling"] > 0
    row = data["evaluation"][0]
    ceiling = row["median_s"]["one_by_one"] / row["roofline"]["floor_s"]
    assert row["roofline"]["speedup_ceiling"] == pytest.approx(ceiling)
    assert "speed-up ceiling" in res.stdout


def test_bad_peak_size_is_one_sentence_and_exit_2():
    res = subprocess.run([sys.executable, str(SCRIPT), "--peak-size", "0"], capture_output=True, text=True)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and "--peak-size" in res.stderr

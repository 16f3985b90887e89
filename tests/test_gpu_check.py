"""bench/gpu_check.sh: its dry run (the non-GPU parts, on CPU) passes, and its verdict logic says
PASS or FAIL from the figures it is given."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mim4dd_fast.io import save_tensors

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench_kernels():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "kernels.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_dry_run_passes_on_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [line.split("\t") for line in (tmp_path / "steps.tsv").read_text().splitlines()]
    assert {name for name, *_ in steps} == {"env", "tests", "distill_dm-cpu", "bench_targets", "crossover",
                                            "evaluation"}
    assert all(code == "0" for _, code, _ in steps), steps
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["verdict"] == "DRY-RUN OK" and summary["failed"] == []
    for name in ("speed_vs_eager@tf32x3", "speed_vs_compile@bf16", "tensor_core_share@tf32",
                 "peak_memory_vs_eager@tf32x3", "tf32x3_grad_rel_err", "auto_dispatch", "gpu_tests", "distill_dm",
                 "batched_eval_ipc1", "batched_experts", "batched_eval_params", "batched_eval_accuracy"):
        assert summary["targets"][name]["status"] == "DRY"
    rows = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    assert {(r["impl"], r["D"]) for r in rows} == {(i, d) for i in ("eager", "chunked", "auto") for d in (16, 40)}
    assert all(r["err_grad_a"] < 1e-5 and r["err_grad_b"] < 1e-5 for r in rows)


def _row(impl, precision, median_s, peak, err=1e-6, N=16384, D=128):
    return {"impl": impl, "precision": precision, "N": N, "D": D, "median_s": median_s, "peak_bytes": peak,
            "useful_tflops": 6 * N * N * D / median_s / 1e12, "err_grad_a": err, "err_grad_b": err}


def _kernels(triton_s, triton_peak=10e6, tf32x3_err=5e-5):
    rows = []
    for p in ("ieee", "tf32x3", "tf32", "bf16"):
        rows += [_row("eager", p, 0.010, 2e9), _row("compile", p, 0.006, 1e9),
                 _row("triton", p, triton_s, triton_peak, err=tf32x3_err if p == "tf32x3" else 1e-3)]
    # rates chosen so that 6NMD / 2 ms is 51% of each
    rate = 6 * 16384 * 16384 * 128 / 0.002 / 1e12 / 0.51
    return {"rows": rows, "meta": {"gemm_rate_tflops": {p: rate for p in ("ieee", "tf32x3", "tf32", "bf16")}}}


def test_kernel_targets_pass_and_fail_on_the_figures(bench_kernels):
    targets, info = bench_kernels.kernel_targets(_kernels(triton_s=0.002))
    assert {t["status"] for t in targets.values()} == {"PASS"}, targets
    assert targets["speed_vs_eager@tf32x3"]["value"] == pytest.approx(5.0)
    assert targets["speed_vs_compile@bf16"]["value"] == pytest.approx(3.0)
    assert targets["peak_memory_vs_eager@tf32"]["value"] == pytest.approx(10e6 / 2e9)
    slow, _ = bench_kernels.kernel_targets(_kernels(triton_s=0.005, triton_peak=100e6, tf32x3_err=2e-4))
    for p in ("tf32x3", "tf32", "bf16"):
        assert slow[f"speed_vs_eager@{p}"]["status"] == "FAIL"  # 2x < 3x
        assert slow[f"speed_vs_compile@{p}"]["status"] == "FAIL"  # 1.2x < 1.5x
        assert slow[f"tensor_core_share@{p}"]["status"] == "FAIL"  # 20% < 50%
        assert slow[f"peak_memory_vs_eager@{p}"]["status"] == "FAIL"  # 5% > 2%
    assert slow["tf32x3_grad_rel_err"]["status"] == "FAIL"
    missing, _ = bench_kernels.kernel_targets({"rows": [], "meta": {}})
    assert {t["status"] for t in missing.values() if t["value"] is None} == {"FAIL"}


def test_speed_vs_compile_bound_is_inclusive(bench_kernels):
    targets, _ = bench_kernels.kernel_targets(_kernels(triton_s=0.004))
    assert targets["speed_vs_compile@tf32x3"]["value"] == pytest.approx(1.5)
    assert targets["speed_vs_compile@tf32x3"]["status"] == "PASS"


def test_auto_dispatch_target(bench_kernels):
    good = {"rows": [{"eager_s": 1.0, "triton_s": 2.0, "auto_s": 1.1},
                     {"eager_s": 3.0, "triton_s": 1.0, "auto_s": 1.0}]}
    bad = {"rows": [{"eager_s": 1.0, "triton_s": 2.0, "auto_s": 2.0}]}
    assert bench_kernels.crossover_target(good)["status"] == "PASS"
    assert bench_kernels.crossover_target(bad)["status"] == "FAIL"


def _evaluation(speedups=(3.0, 2.6), experts=2.2, param_diff=1e-4, accuracy_diff=0.0):
    rows = [{"ipc": ipc, "speedup_median": v, "max_abs_param_diff": param_diff, "max_abs_param": 1.0,
             "max_abs_accuracy_diff": accuracy_diff, "roofline": {"speedup_ceiling": 10.0}}
            for ipc, v in zip((1, 10), speedups, strict=True)]
    return {"evaluation": rows, "experts": {"speedup_median": experts, "experts": 8, "experts_per_pass": 4},
            "complete": True}


def test_evaluation_targets_pass_and_fail_on_the_figures(bench_kernels):
    good = bench_kernels.evaluation_targets(_evaluation())
    assert set(good) == {"batched_evaluation_complete", "batched_eval_ipc1", "batched_eval_ipc10", "batched_experts",
                         "batched_eval_params", "batched_eval_accuracy"}
    assert {t["status"] for t in good.values()} == {"PASS"}, good
    edge = bench_kernels.evaluation_targets(_evaluation(speedups=(2.5, 2.5), experts=2.0))  # bounds inclusive
    assert {t["status"] for t in edge.values()} == {"PASS"}
    bad = bench_kernels.evaluation_targets(_evaluation(speedups=(2.4, 1.0), experts=1.9, param_diff=0.05,
                                                       accuracy_diff=0.02))
    assert {name for name, t in bad.items() if t["status"] == "PASS"} == {"batched_evaluation_complete"}
    assert bad["batched_eval_params"]["value"] == pytest.approx(0.05)
    missing = bench_kernels.evaluation_targets(None)
    assert [t["status"] for t in missing.values()] == ["FAIL"]
    cut = bench_kernels.evaluation_targets({**_evaluation(), "complete": False})  # a step cut at its time limit
    assert cut["batched_evaluation_complete"]["status"] == "FAIL" and cut["batched_eval_ipc1"]["status"] == "PASS"


def _run(path: Path, losses, images):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps({"iteration": i, "loss": v}) + "\n"
                                                for i, v in enumerate(losses)))
    save_tensors(path / "synthetic.safetensors", {"images": images, "labels": torch.arange(2)})


def test_distill_comparison(tmp_path, bench_kernels):
    images = torch.randn(2, 1, 4, 4)
    _run(tmp_path / "cpu", [1.0, 0.5], images)
    _run(tmp_path / "near", [1.001, 0.5005], images * 1.001)
    _run(tmp_path / "far", [1.0, 0.6], images)
    assert bench_kernels.compare_runs(tmp_path / "cpu", tmp_path / "near", 1e-2)["status"] == "PASS"
    far = bench_kernels.compare_runs(tmp_path / "cpu", tmp_path / "far", 1e-2)
    assert far["status"] == "FAIL" and far["value"] == pytest.approx(0.2)
    assert bench_kernels.compare_runs(tmp_path / "cpu", tmp_path / "absent", 1e-2)["status"] == "FAIL"

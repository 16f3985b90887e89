"""Data-parallel distillation under torch.distributed (gloo, 2 CPU processes) against one process.

The reference is always a single-process run of the same case: MTT/MIM must agree to float
rounding (the ranks sum partial gradients in another order), DC/DM too (they exchange exact rows).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from dist_helpers import ROOT, run_torchrun
from hypothesis import given
from hypothesis import strategies as st

from mim4dd_fast.cli import main
from mim4dd_fast.distributed import SINGLE, Dist
from mim4dd_fast.errors import ConfigError
from mim4dd_fast.io import load_tensors

sys.path.insert(0, str(ROOT / "tests" / "dist_helpers"))
import dp_cases  # noqa: E402

TINY_MIM4DD = """
method = "mim4dd"
dataset = "digits"
ipc = 1
iterations = 2
checkpoint_every = 1
evals = 2
num_experts = 2
expert_epochs = 2
[method_config]
width = 8
syn_steps = 3
max_start_epoch = 1
expert_epochs = 1
[mim]
n_real = 4
head_width = 8
[eval]
epochs = 2
n_nets = 1
"""


@given(n=st.integers(0, 200), world=st.integers(1, 9))
def test_shards_cover_the_batch_once_in_order(n, world):
    parts = [Dist(rank=r, world_size=world).shard(n) for r in range(world)]
    assert [p[0] for p in parts] == [0] + [p[1] for p in parts[:-1]]  # contiguous, in rank order
    assert parts[-1][1] == n
    assert [b - a for a, b in parts] == [t.numel() for t in torch.arange(n).tensor_split(world)]


def test_owned_is_round_robin():
    assert Dist(rank=1, world_size=3).owned(list(range(8))) == [1, 4, 7]
    assert SINGLE.owned([5, 6]) == [5, 6]


@pytest.mark.usefixtures("one_thread")
def test_data_parallel_matches_single_process(tmp_path):
    """Two ranks vs one process: unroll gradients, and images / step size / heads / momentum after two steps."""
    out = tmp_path / "dp.pt"
    proc = run_torchrun([out], script=ROOT / "tests" / "dist_helpers" / "dp_cases.py", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(out, weights_only=True)
    assert saved["world_size"] == 2
    got, ref = saved["results"], dp_cases.run_cases(SINGLE)
    assert set(got) == set(ref)
    for key, want in ref.items():
        have = got[key]
        assert have.shape == want.shape, key
        scale = float(want.abs().max()) or 1.0
        assert torch.allclose(have.double(), want.double(), rtol=1e-5, atol=1e-6 * scale), (
            f"{key}: max difference {float((have.double() - want.double()).abs().max()):.3g}")
    # the unroll really did something (a zero gradient would match trivially)
    assert float(ref["unroll/g_img"].abs().max()) > 0 and float(ref["unroll/g_lr"].abs()) > 0


def test_data_parallel_limits_are_one_sentence(digits):
    two = Dist(rank=0, world_size=2)
    experts = dp_cases.fake_experts(digits)
    cfg = dict(dp_cases.CONFIGS["mtt"])
    with pytest.raises(ConfigError, match="at most 1 processes"):
        dp_cases.build_method("mtt", digits, 2, config={**cfg, "batch_syn": 1}, experts=experts, dist=two)
    with pytest.raises(ConfigError, match="unroll = 'checkpointed'"):
        dp_cases.build_method("mtt", digits, 2, config={**cfg, "unroll": "full"}, experts=experts, dist=two)
    with pytest.raises(ConfigError, match="at most 10 processes"):
        dp_cases.build_method("dm", digits, 1, config=dict(dp_cases.CONFIGS["dm"]), dist=Dist(rank=0, world_size=11))


def _run_files(run: Path) -> dict:
    return {"manifest": json.loads((run / "manifest.json").read_text()),
            "metrics": [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()],
            "images": load_tensors(run / "synthetic.safetensors")["images"]}


@pytest.mark.usefixtures("one_thread")
def test_torchrun_distill_writes_once_matches_one_process_and_resumes_with_same_world_size(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_MIM4DD)
    run2 = tmp_path / "two"
    proc = run_torchrun(["distill", "--config", config, "--out", run2, "--device", "cpu", "--dist-timeout", 60],
                        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = _run_files(run2)
    assert two["manifest"]["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert [m["iteration"] for m in two["metrics"]] == [1, 2]  # rank 0 alone wrote the metrics
    assert proc.stdout.count("accuracy") == 1  # and the final line

    run1 = tmp_path / "one"
    assert main(["distill", "--config", str(config), "--out", str(run1), "--device", "cpu"]) == 0
    one = _run_files(run1)
    assert one["manifest"]["distributed"]["world_size"] == 1
    assert torch.allclose(two["images"], one["images"], rtol=1e-5, atol=1e-5)
    assert [m["loss"] for m in two["metrics"]] == pytest.approx([m["loss"] for m in one["metrics"]], rel=1e-5)
    # the final evaluation's nets were split over the ranks: net i is seeded i either way
    acc_two, acc_one = (json.loads((r / "eval.json").read_text())["accuracies"] for r in (run2, run1))
    assert len(acc_two) == 2 and acc_two == pytest.approx(acc_one, abs=0.01)

    # a run checkpointed by 2 processes is not resumed by 1 (nor the other way round)
    code = main(["distill", "--out", str(run2), "--resume", "--iterations", "3"])
    assert code == 2
    proc = run_torchrun(["distill", "--out", run1, "--resume", "--iterations", "3", "--dist-timeout", 60],
                        timeout=300)
    assert proc.returncode != 0
    for rank in (0, 1):  # every rank says it in one sentence; the only traceback is torchrun's own summary
        assert f"[rank {rank}] error: Run {run1} was checkpointed by 1 process(es) but is resumed with 2" in \
            " ".join(proc.stderr.split())
    assert 'mim4dd_fast/' not in proc.stderr.replace(str(run1), "")

    proc = run_torchrun(["distill", "--out", run2, "--resume", "--iterations", "3", "--dist-timeout", 60],
                        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["iteration"] for m in _run_files(run2)["metrics"]] == [1, 2, 3]


def test_sigterm_to_torchrun_checkpoints_every_rank_at_the_same_iteration_and_resumes(tmp_path):
    """torchrun forwards SIGTERM to the ranks; they agree on the iteration, rank 0 checkpoints it, all exit."""
    import signal
    import subprocess
    import time

    from dist_helpers import child_env

    config = tmp_path / "long.toml"
    config.write_text(TINY_MIM4DD.replace("iterations = 2", "iterations = 100000").replace(
        "checkpoint_every = 1", "checkpoint_every = 100000"))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "mim4dd_fast",
           "distill", "--config", str(config), "--out", str(run), "--device", "cpu", "--dist-timeout", "60"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            metrics = run / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "stopped by SIGTERM; the last checkpoint is saved" in " ".join(err.split())
    done = [json.loads(x)["iteration"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    saved = sorted(int(p.stem.split("-")[1]) for p in (run / "checkpoints").glob("ckpt-*.json"))
    assert saved[-1] == done[-1] >= 3  # the stop iteration itself was checkpointed, not the periodic one
    resumed = run_torchrun(["distill", "--out", run, "--resume", "--iterations", done[-1] + 1, "--dist-timeout", 60],
                           timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from iteration {done[-1]}" in resumed.stderr


@pytest.mark.parametrize("flag, env, message", [
    (["--dist-timeout", "-5"], {}, "must be a positive number of seconds, got -5.0"),
    (["--dist-timeout", "nan"], {}, "must be a positive number of seconds"),
    ([], {"MIM4DD_DIST_TIMEOUT": "soon"}, "must be a number of seconds, got 'soon'"),
])
def test_bad_distributed_timeout_is_one_sentence_exit_2(tmp_path, monkeypatch, capsys, flag, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "run"
    assert main(["distill", "--method", "dm", "--iterations", "1", "--out", str(out), *flag]) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not out.exists() or not any(out.iterdir())  # refused before anything was written

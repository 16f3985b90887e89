"""`mim4dd-fast distill`: run directory contents, resume equality, crashes, corruption, bad output dirs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mim4dd_fast import checkpoint as ckpt
from mim4dd_fast.cli import main
from mim4dd_fast.errors import DataError
from mim4dd_fast.io import load_tensors, sha256_file

# A tiny, fast DM run on the embedded digits: the point here is the machinery, not accuracy.
TINY = """
method = "dm"
dataset = "digits"
ipc = 1
iterations = 12
checkpoint_every = 1
evals = 1
[method_config]
width = 16
batch_real = 32
[eval]
epochs = 5
n_nets = 1
"""


def _config(tmp_path: Path, text: str = TINY) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return path


def _cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "mim4dd_fast.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _images(run: Path) -> torch.Tensor:
    return load_tensors(run / "synthetic.safetensors")["images"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    from reliability_helpers import finished_run

    return finished_run(tmp_path_factory, TINY)


def test_run_directory_holds_everything(reference_run: Path):
    for name in ("config.toml", "metrics.jsonl", "synthetic.safetensors", "synthetic.png", "eval.json",
                 "manifest.json"):
        assert (reference_run / name).exists(), name
    manifest = json.loads((reference_run / "manifest.json").read_text())
    for name, digest in manifest["files"].items():
        assert sha256_file(reference_run / name) == digest
    assert manifest["environment"]["torch"] == torch.__version__
    lines = [json.loads(x) for x in (reference_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == list(range(1, 13))
    assert all("loss" in r and "seconds" in r for r in lines)
    images = _images(reference_run)
    assert images.shape == (10, 1, 8, 8)
    # the PNG is a real PNG
    assert (reference_run / "synthetic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_toml_reproduces_the_run(reference_run: Path, tmp_path: Path):
    out = tmp_path / "again"
    assert main(["distill", "--config", str(reference_run / "config.toml"), "--out", str(out)]) == 0
    assert torch.equal(_images(out), _images(reference_run))


def test_show_and_evaluate_saved_run(reference_run: Path, capsys):
    assert main(["show", str(reference_run)]) == 0
    shown = capsys.readouterr().out
    assert "dm" in shown and "synthetic.png" in shown
    assert main(["evaluate", str(reference_run), "--nets", "1", "--epochs", "3"]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_resume_after_interrupt_is_bit_identical(reference_run: Path, tmp_path: Path):
    out = tmp_path / "run"
    cfg = _config(tmp_path, TINY.replace("iterations = 12", "iterations = 5"))
    assert main(["distill", "--config", str(cfg), "--out", str(out)]) == 0
    (out / "manifest.json").unlink()  # pretend it stopped at 5 of 12
    assert main(["distill", "--out", str(out), "--resume", "--iterations", "12"]) == 0
    assert torch.equal(_images(out), _images(reference_run))


KILL_CONFIG = TINY.replace("iterations = 12", "iterations = 6").replace("width = 16", "width = 8").replace(
    "batch_real = 32", "batch_real = 8").replace("epochs = 5", "epochs = 2")


def _same_run(a: Path, b: Path) -> None:
    """Bit-identical results: the files' bytes, and the metrics apart from their wall-clock seconds."""
    for name in ("config.toml", "synthetic.safetensors", "synthetic.png", "eval.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for meta in ckpt.list_checkpoints(b / "checkpoints"):
        for suffix in (".json", ".safetensors"):
            assert (a / "checkpoints" / meta.with_suffix(suffix).name).read_bytes() == \
                meta.with_suffix(suffix).read_bytes(), meta.name

    def metrics(run: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(x).items() if k != "seconds"}
                for x in (run / "metrics.jsonl").read_text().splitlines()]

    assert metrics(a) == metrics(b)


def test_sigkill_at_20_random_points_then_resume_is_bit_identical(tmp_path: Path):
    """SIGKILL at >= 20 random points (random times, inside atomic writes of checkpoints and results, in the
    middle of a metrics line), each followed by `--resume`: every run finishes bit-identical to an
    uninterrupted one, no checkpoint is ever half-written, and orphan temp files are cleaned up."""
    import multiprocessing

    from reliability_helpers import killed_child

    cfg = _config(tmp_path, KILL_CONFIG)
    ctx = multiprocessing.get_context("forkserver")  # imports once; each attempt forks in milliseconds
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "numpy", "sklearn.datasets", "matplotlib.pyplot",
                                "mim4dd_fast.cli", "mim4dd_fast.production", "mim4dd_fast.methods.registry",
                                "reliability_helpers"])
    reference = tmp_path / "reference"  # a fresh process too: checkpoints hold the global RNG state
    proc = ctx.Process(target=killed_child, args=(["distill", "--config", str(cfg), "--out", str(reference)],
                                                  "none", 0))
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode == 0
    rng = random.Random(17)
    kills = in_checkpoint_writes = finished = 0
    out = tmp_path / "run0"
    while kills < 20 or out.exists():
        resume = (out / "config.toml").exists()
        argv = ["distill", "--out", str(out), "--resume"] if resume else ["distill", "--config", str(cfg), "--out",
                                                                            str(out)]
        mode = "none" if kills >= 20 else rng.choice(["replace", "replace", "append", "time"])
        proc = ctx.Process(target=killed_child, args=(argv, mode, rng.randint(1, 20 if mode == "replace" else 6)))
        proc.start()
        if mode == "time":
            time.sleep(rng.uniform(0.05, 1.0))
            proc.kill()
        proc.join(timeout=300)
        assert proc.exitcode in (0, -signal.SIGKILL), proc.exitcode
        kills += proc.exitcode == -signal.SIGKILL
        for meta in ckpt.list_checkpoints(out / "checkpoints"):  # never half-written: every one verifies
            ckpt.read_checkpoint(meta)
        in_checkpoint_writes += any((out / "checkpoints").glob(".ckpt-*.tmp"))
        if (out / "manifest.json").exists():
            assert not list(out.rglob("*.tmp")), "orphan temp files were not cleaned up"
            _same_run(out, reference)
            finished += 1
            out = tmp_path / f"run{finished}"
    assert in_checkpoint_writes >= 3 and finished >= 2


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path: Path):
    out = tmp_path / "run"
    proc = _cli(["distill", "--config", str(_config(tmp_path, TINY.replace("12", "400"))), "--out", str(out)])
    deadline = time.time() + 60
    while time.time() < deadline and not ckpt.list_checkpoints(out / "checkpoints"):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "--resume" in err and "Traceback" not in err
    assert ckpt.load_latest_checkpoint(out / "checkpoints") is not None


def test_crash_during_checkpoint_write_leaves_previous_intact(tmp_path: Path, monkeypatch):
    state = {"images": torch.arange(6.0), "opt": {"state": {0: {"buf": torch.ones(3)}}, "lr": 0.5}}
    ckpt.save_checkpoint(tmp_path, 1, state)

    def boom(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, {"images": torch.zeros(6)})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    iteration, loaded = ckpt.load_latest_checkpoint(tmp_path)
    assert iteration == 1 and torch.equal(loaded["images"], state["images"])
    assert loaded["opt"]["state"][0]["buf"].tolist() == [1.0, 1.0, 1.0] and loaded["opt"]["lr"] == 0.5


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_checkpoint_detected_and_previous_used(tmp_path: Path, damage: str):
    ckpt.save_checkpoint(tmp_path, 1, {"x": torch.ones(100)})
    ckpt.save_checkpoint(tmp_path, 2, {"x": torch.full((100,), 2.0)})
    bad = tmp_path / "ckpt-00000002.safetensors"
    data = bytearray(bad.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-10] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError, match="ckpt-00000002"):
        ckpt.read_checkpoint(tmp_path / "ckpt-00000002.json")
    warnings = []
    iteration, state = ckpt.load_latest_checkpoint(tmp_path, warn=warnings.append)
    assert iteration == 1 and torch.equal(state["x"], torch.ones(100))
    assert "ckpt-00000002" in warnings[0]


def test_unwritable_run_dir_fails_before_work(tmp_path: Path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # running as root: simulate with a file in the way instead
            target = tmp_path / "file"
            target.write_text("x")
            out = target / "run"
        else:
            out = locked / "run"
        code = main(["distill", "--config", str(_config(tmp_path)), "--out", str(out)])
    finally:
        locked.chmod(0o700)
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err
    assert not (out / "config.toml").exists()


def test_existing_run_is_not_overwritten(reference_run: Path, capsys):
    before = sha256_file(reference_run / "synthetic.safetensors")
    assert main(["distill", "--config", str(reference_run / "config.toml"), "--out", str(reference_run)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert sha256_file(reference_run / "synthetic.safetensors") == before


def test_nonfinite_loss_names_setting_and_keeps_checkpoint(tmp_path: Path, capsys):
    cfg = _config(tmp_path, TINY.replace("batch_real = 32", "batch_real = 32\nlr_img = 1e30"))
    out = tmp_path / "run"
    code = main(["distill", "--config", str(cfg), "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "lr_img" in err and "Traceback" not in err
    found = ckpt.load_latest_checkpoint(out / "checkpoints")
    assert found is not None and torch.isfinite(found[1]["images"]).all()

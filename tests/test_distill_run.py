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
    tmp = tmp_path_factory.mktemp("ref")
    out = tmp / "run"
    assert main(["distill", "--config", str(_config(tmp)), "--out", str(out)]) == 0
    return out


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


def test_sigkill_at_random_points_then_resume_matches(reference_run: Path, tmp_path: Path):
    out = tmp_path / "run"
    cfg = _config(tmp_path)
    rng = random.Random(1234)
    args = ["distill", "--config", str(cfg), "--out", str(out)]
    for _attempt in range(8):
        proc = _cli(args)
        time.sleep(rng.uniform(2.0, 5.0))  # import + a few iterations; lands in checkpoint writes often
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        # no checkpoint is ever half-written: every JSON that exists verifies
        for meta in ckpt.list_checkpoints(out / "checkpoints"):
            ckpt.read_checkpoint(meta)
        if (out / "manifest.json").exists():
            break
        args = ["distill", "--out", str(out), "--resume"] if (out / "config.toml").exists() else args
    else:  # never finished: finish it here (a fresh start if no attempt got as far as writing config.toml)
        assert main(args) == 0
    assert torch.equal(_images(out), _images(reference_run))


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

"""Issue 17, one test per row of its table: never touch what is not ours, never crash on damaged files,
never blow up on small inputs. Every refusal is one line, exit code 2, and leaves the files as they were."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from reliability_helpers import TINY, copy_run, error_line, finished_run, last_error_line, snapshot, write_config

from mim4dd_fast import checkpoint as ckpt
from mim4dd_fast.cli import main
from mim4dd_fast.io import load_tensors, save_tensors, sha256_file
from mim4dd_fast.rundir import LOCK, MARKER, RunLock, read_config, read_marker, with_checksum


@pytest.fixture(scope="module")
def complete(tmp_path_factory, one_thread) -> Path:
    """A finished tiny run (checkpoints 2 and 3 on disk); tests copy it before changing anything."""
    return finished_run(tmp_path_factory)


@pytest.fixture
def run(complete, tmp_path) -> Path:
    return copy_run(complete, tmp_path / "run")


# -- an existing folder that is not a run; two distills at once; --out "" --------------------------------


def test_foreign_out_folder_is_refused_and_untouched(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    for name, text in (("manifest.json", '{"my": "manifest"}'), ("metrics.jsonl", "mine\n"), ("eval.json", "[1]")):
        (mine / name).write_text(text)
    before = snapshot(mine)
    for extra in ([], ["--resume"]):
        assert main(["distill", "--config", str(write_config(tmp_path)), "--out", str(mine), *extra]) == 2
        message = error_line(capsys.readouterr())
        assert str(mine) in message and ("not a mim4dd-fast run" in message or "new or empty" in message)
        assert snapshot(mine) == before


def test_second_distill_into_a_locked_run_is_refused(run, capsys):
    lock = RunLock(run)  # another process working there (flock is per open file: this one conflicts too)
    try:
        before = {k: v for k, v in snapshot(run).items() if k != LOCK}
        assert main(["distill", "--out", str(run), "--resume", "--iterations", "5"]) == 2
        message = error_line(capsys.readouterr())
        assert f"pid {os.getpid()}" in message and socket.gethostname() in message and "in use" in message
        assert {k: v for k, v in snapshot(run).items() if k != LOCK} == before
    finally:
        lock.release()


def test_two_processes_at_once_the_second_is_refused(tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tmp_path, TINY.replace("iterations = 3", "iterations = 100000"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "mim4dd_fast", "distill", "--config", str(cfg), "--out", str(out)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ckpt.list_checkpoints(out / "checkpoints"):
            time.sleep(0.2)
        second = subprocess.run([sys.executable, "-m", "mim4dd_fast", "distill", "--out", str(out), "--resume"],
                                env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"pid {first.pid}" in second.stderr and "in use" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM
    assert not (out / LOCK).exists()  # released on the way out


def test_stale_lock_of_a_dead_process_is_taken_over(run, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    assert main(["distill", "--out", str(run), "--resume", "--iterations", "4"]) == 0
    assert f"stale lock of pid {dead.pid}" in " ".join(capsys.readouterr().err.split())
    assert not (run / LOCK).exists()


def test_lock_recorded_by_another_host_is_refused(run, capsys):
    (run / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    before = snapshot(run)
    assert main(["distill", "--out", str(run), "--resume", "--iterations", "4"]) == 2
    assert "elsewhere.example" in error_line(capsys.readouterr())
    assert snapshot(run) == before


def test_empty_out_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path)
    before = snapshot(tmp_path)
    for extra in ([], ["--resume"]):
        assert main(["distill", "--config", "tiny.toml", "--out", "", *extra]) == 2
        assert "--out is empty" in error_line(capsys.readouterr())
    assert snapshot(tmp_path) == before


# -- output paths of evaluate / compare / ablate are checked before any work ------------------------------


def _no_work(monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("work started before the output path was checked")

    import mim4dd_fast.data
    import mim4dd_fast.runner

    monkeypatch.setattr(mim4dd_fast.data, "load_dataset", boom)
    monkeypatch.setattr(mim4dd_fast.runner, "load_run_dataset", boom)
    monkeypatch.setattr(mim4dd_fast.runner, "build_run", boom)


@pytest.mark.parametrize("target", ["folder", "under_a_file"])
def test_output_paths_are_checked_before_any_work(run, tmp_path, monkeypatch, capsys, target):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import ablate
    import compare

    (tmp_path / "afile").write_text("x")
    bad = str(tmp_path) if target == "folder" else str(tmp_path / "afile" / "out.json")
    _no_work(monkeypatch)
    before = snapshot(run)
    for argv, entry in ((["evaluate", str(run), "--json", bad], main),
                        (["evaluate", "--random", "--json", bad], main),
                        (["--methods", "dm", "--json", bad], compare.main),
                        (["--methods", "dm", "--csv", bad], compare.main)):
        assert entry(argv) == 2, argv
        assert "--json" in error_line(capsys.readouterr()) or "--csv" in " ".join(argv)
    assert main(["evaluate", str(run), "--json", str(run / "eval.json")]) == 2  # the run's own, checksummed file
    assert "inside the run directory" in error_line(capsys.readouterr())
    ablate_out = str(tmp_path / "afile") if target == "folder" else bad
    assert ablate.main(["--grid", "tau=0.1", "--out", ablate_out, "--seeds", "0"]) == 2
    assert "--out" in error_line(capsys.readouterr())
    assert snapshot(run) == before


def test_ablate_refuses_a_foreign_out_folder(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import ablate

    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    assert ablate.main(["--grid", "tau=0.1", "--out", str(tmp_path), "--seeds", "0"]) == 2
    assert "not a mim4dd-fast ablation sweep" in error_line(capsys.readouterr())
    assert snapshot(tmp_path) == before


# -- resume never silently restarts and never silently ignores ---------------------------------------------


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_every_checkpoint_corrupted_resume_is_refused_touching_nothing(run, capsys):
    for path in (run / "checkpoints").glob("*.safetensors"):
        _corrupt(path)
    (run / "manifest.json").unlink()  # an unfinished run
    before = snapshot(run)
    assert main(["distill", "--out", str(run), "--resume"]) == 2
    message = last_error_line(capsys.readouterr())
    assert "Every checkpoint" in message and "ckpt-0000000" in message
    assert snapshot(run) == before


@pytest.mark.parametrize("flags,keys", [
    (["--method", "dc"], ["method"]), (["--ipc", "2"], ["ipc"]), (["--seed", "7"], ["seed"]),
    (["--dataset", "mnist5k"], ["dataset"]), (["--set", "method.lr_img=2"], ["method_config.lr_img"]),
    (["--config", "OTHER"], ["method_config.width"]),
])
def test_resume_with_other_settings_is_refused_naming_the_keys(run, tmp_path, capsys, flags, keys):
    other = write_config(tmp_path, TINY.replace("width = 4", "width = 6"), "other.toml")
    flags = [str(other) if f == "OTHER" else f for f in flags]
    before = snapshot(run)
    assert main(["distill", "--out", str(run), "--resume", "--iterations", "5", *flags]) == 2
    message = error_line(capsys.readouterr())
    assert "--resume cannot change" in message and all(k in message for k in keys), message
    assert snapshot(run) == before


def test_resume_with_the_same_command_and_safe_keys_is_recorded(run, tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert main(["distill", "--config", str(cfg), "--out", str(run), "--resume", "--iterations", "5",
                 "--eval-every", "2"]) == 0
    settings = read_config(run)
    assert settings.run.iterations == 5 and settings.run.eval_every == 2
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["iterations"] == 5
    changes = manifest["resumes"][0]["changed"]
    assert changes == {"iterations": [3, 5], "eval_every": [0, 2]} and manifest["resumes"][0]["from_iteration"] == 3
    assert read_marker(run)["resumes"] == manifest["resumes"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [1, 2, 3, 4, 5] and "eval_accuracy" in lines[3]
    capsys.readouterr()


def test_fewer_iterations_than_done_and_nothing_to_do_are_refused(run, capsys):
    before = snapshot(run)
    assert main(["distill", "--out", str(run), "--resume", "--iterations", "2"]) == 2
    assert "has done 3 iterations" in error_line(capsys.readouterr())
    assert main(["distill", "--out", str(run), "--resume"]) == 2
    assert "already complete" in error_line(capsys.readouterr())
    assert snapshot(run) == before


def _rewrite_checkpoint(meta: Path, change) -> None:
    """Edit a checkpoint's metadata and re-sign it (what a careless tool, not bit rot, would do)."""
    body = json.loads(meta.read_text())
    body.pop("checksum")
    change(body)
    meta.write_text(json.dumps(with_checksum(body)))


@pytest.mark.parametrize("kind", ["other_method", "other_shape", "wrong_structure", "unsigned_edit"])
def test_foreign_or_malformed_checkpoint_is_refused_naming_the_file(run, capsys, kind):
    (run / "manifest.json").unlink()
    newest = run / "checkpoints" / "ckpt-00000003.json"
    if kind == "other_method":
        _rewrite_checkpoint(newest, lambda b: b["run"].update(method="dc"))
    elif kind == "other_shape":  # same run identity, but images of another shape inside (re-signed)
        tensors = load_tensors(newest.with_suffix(".safetensors"))
        tensors["/images"] = torch.zeros(20, 1, 8, 8)
        digest = save_tensors(newest.with_suffix(".safetensors"), tensors)
        _rewrite_checkpoint(newest, lambda b: b.update(sha256=digest))
    elif kind == "wrong_structure":
        _rewrite_checkpoint(newest, lambda b: b.update(state={"__dict__": [["images", {"__tensor__": "/nope"}]]}))
    else:
        body = json.loads(newest.read_text())
        body["iteration"] = 2
        newest.write_text(json.dumps(body))
    if kind in ("wrong_structure", "unsigned_edit"):  # damaged: the previous checkpoint is used, the bad one named
        (run / "checkpoints" / "ckpt-00000002.safetensors").write_bytes(b"")
    before = snapshot(run)
    assert main(["distill", "--out", str(run), "--resume"]) == 2
    message = last_error_line(capsys.readouterr())
    assert "ckpt-00000003" in message or "Every checkpoint" in message
    assert {"other_method": "belongs to another run", "other_shape": "does not fit this run",
            "wrong_structure": "Every checkpoint", "unsigned_edit": "Every checkpoint"}[kind] in message
    assert snapshot(run) == before


# -- damaged metrics / eval / synthetic files --------------------------------------------------------------


def test_torn_last_metrics_line_is_tolerated_on_resume(run, complete, capsys):
    (run / "manifest.json").unlink()
    metrics = run / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + b'{"iteration": 4, "loss": 0.')  # a kill mid-append
    assert main(["distill", "--out", str(run), "--resume"]) == 0
    assert "torn line" in " ".join(capsys.readouterr().err.split())
    assert metrics.read_text().count("\n") == 3 and metrics.read_text().endswith("\n")
    assert torch.equal(load_tensors(run / "synthetic.safetensors")["images"],
                       load_tensors(complete / "synthetic.safetensors")["images"])


@pytest.mark.parametrize("name", ["metrics.jsonl", "eval.json"])
@pytest.mark.parametrize("damage", ["folder", "not_json", "a_list", "strings"])
def test_damaged_metrics_or_eval_is_one_sentence_naming_it(run, capsys, name, damage):
    (run / "manifest.json").unlink()  # without a manifest only the file's own reader can tell
    path = run / name
    path.unlink()
    if damage == "folder":
        path.mkdir()
    else:
        content = {"not_json": "{{{ no", "a_list": "[1, 2]", "strings": '"a string"'}[damage]
        path.write_text(content + "\n")
    before = snapshot(run)
    assert main(["show", str(run)]) == 2
    assert name in error_line(capsys.readouterr())
    if name == "metrics.jsonl":
        assert main(["distill", "--out", str(run), "--resume"]) == 2
        assert name in last_error_line(capsys.readouterr())
    assert snapshot(run) == before


@pytest.mark.parametrize("damage", ["missing", "folder", "no_labels"])
def test_damaged_synthetic_set_is_refused_by_evaluate(run, capsys, damage):
    path = run / "synthetic.safetensors"
    (run / "manifest.json").unlink()
    if damage == "missing":
        path.unlink()
    elif damage == "folder":
        path.unlink()
        path.mkdir()
    else:
        save_tensors(path, {"images": load_tensors(path)["images"]})
    assert main(["evaluate", str(run), "--nets", "1", "--epochs", "1"]) == 2
    assert "synthetic.safetensors" in error_line(capsys.readouterr())


def test_a_tampered_file_of_a_finished_run_is_named(run, capsys):
    ev = json.loads((run / "eval.json").read_text())
    ev["mean"] = 0.99
    (run / "eval.json").write_text(json.dumps(ev))
    assert main(["show", str(run)]) == 2
    captured = capsys.readouterr()
    assert "eval.json" in error_line(captured) and "manifest.json" in error_line(captured)
    assert "method" in captured.out  # what could be read is still shown


# -- disk full, Ctrl-C, orphan temp files -------------------------------------------------------------------


def test_disk_full_mid_run_is_one_sentence_and_resumable(tmp_path, capsys, monkeypatch):
    import errno

    from mim4dd_fast import production

    real = production._append_jsonl
    calls = []

    def append(path, record):
        calls.append(record["iteration"])
        if record["iteration"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, record)

    monkeypatch.setattr(production, "_append_jsonl", append)
    out = tmp_path / "run"
    assert main(["distill", "--config", str(write_config(tmp_path)), "--out", str(out)]) == 2
    message = last_error_line(capsys.readouterr())
    assert "No space left on device" in message and "--resume" in message
    assert not (out / LOCK).exists()
    monkeypatch.setattr(production, "_append_jsonl", real)
    assert main(["distill", "--out", str(out), "--resume"]) == 0


@pytest.mark.parametrize("delay", [0.2, 0.5, 0.9])
def test_ctrl_c_during_the_first_second_says_interrupted(tmp_path, delay):
    """SIGINT while the CLI is still importing (torch, numpy, sklearn): one line, no traceback, exit 130."""
    out = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-m", "mim4dd_fast", "distill", "--config", str(write_config(tmp_path)),
                             "--out", str(out)], env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] in (
        "interrupted.", f"stopped by SIGINT; the last checkpoint is saved: continue with `mim4dd-fast distill --out "
        f"{out} --resume`.")


def test_orphan_temp_files_are_cleaned_on_the_next_start(run, capsys):
    (run / "manifest.json").unlink()
    orphans = [run / "checkpoints" / ".ckpt-00000004.json.a1b2c3d4.tmp", run / ".metrics.jsonl.zz99xx00.tmp"]
    for path in orphans:
        path.write_bytes(b"half")
    user_file = run / "checkpoints" / "notes.tmp"  # not one of ours: kept
    user_file.write_text("mine")
    assert main(["distill", "--out", str(run), "--resume", "--iterations", "4"]) == 0
    assert not any(p.exists() for p in orphans) and user_file.exists()


# -- bounds before work -------------------------------------------------------------------------------------


SEED = str(2**64)


@pytest.mark.parametrize("argv", [
    ["distill", "--method", "dm", "--seed", SEED, "--out", "{tmp}/r"],
    ["distill", "--config", "{tmp}/seed.toml", "--out", "{tmp}/r"],
    ["experts", "--seed", SEED, "--out", "{tmp}/r"],
    ["evaluate", "--random", "--seed", SEED],
    ["evaluate", "{run}", "--seed", "-1"],
])
def test_seeds_out_of_range_are_refused_with_nothing_written(run, tmp_path, capsys, argv):
    (tmp_path / "seed.toml").write_text(f'method = "dm"\nseed = {SEED}\n')
    before = snapshot(run)
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{run}", str(run)) for a in argv]
    assert main(argv) == 2
    assert "seed" in error_line(capsys.readouterr())
    assert not (tmp_path / "r").exists() and snapshot(run) == before


def test_ablate_and_compare_seeds_out_of_range(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import ablate
    import compare

    assert ablate.main(["--grid", "tau=0.1", "--seeds", f"0,{SEED}", "--out", str(tmp_path / "a")]) == 2
    assert "seeds" in error_line(capsys.readouterr())
    assert not (tmp_path / "a").exists()
    # compare distils seeds seed, seed + 1, ...: the last one must be in range too
    assert compare.main(["--methods", "dm", "--seed", str(2**32 - 1), "--seeds", "2"]) == 2
    assert "last distillation seed" in error_line(capsys.readouterr())


@pytest.mark.parametrize("argv", [
    ["distill", "--method", "dm", "--image-size", "100000", "--out", "{tmp}/r"],
    ["experts", "--width", "10000000", "--epochs", "1", "--num-experts", "1", "--out", "{tmp}/r"],
    ["distill", "--method", "dm+mim", "--set", "mim.pool=100000", "--out", "{tmp}/r"],
    ["distill", "--method", "dm+mim", "--set", "mim.head_width=1e9", "--out", "{tmp}/r"],
    ["distill", "--method", "mtt", "--set", "method.syn_steps=1e8", "--out", "{tmp}/r"],
])
def test_huge_sizes_are_refused_up_front_with_an_estimate(tmp_path, capsys, argv):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    message = error_line(capsys.readouterr())
    assert "needs at least" in message and "available" in message and "iB" in message
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("text,words", [
    ('method = "dm"\n[method_config]\nlr_img = 1e308\n', ["lr_img", "float32"]),
    ('method = "dm+mim"\n[mim]\ntau = 1e-300\n', ["tau", "float32"]),
    ('method = "dm+mim"\n[mim]\nlam = 1e300\n', ["lam", "float32"]),
    ("x = " + "[" * 5000 + "]" * 5000 + "\n", ["nest"]),
    ("a = {b = {c = {d = {e = {f = {g = 1}}}}}}\n", ["nest"]),
    ('method = "' + "m" * (50 << 20) + '"\n', ["larger than"]),
])
def test_absurd_config_values_are_refused_in_a_short_message(tmp_path, capsys, text, words):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    assert main(["distill", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    message = error_line(capsys.readouterr())
    assert all(w in message for w in words) and len(message) < 500, message[:500]


def test_long_values_are_shortened_in_messages(tmp_path, capsys):
    assert main(["distill", "--method", "x" * 100_000, "--out", str(tmp_path / "r")]) == 2
    assert len(error_line(capsys.readouterr())) < 600


def test_ablate_grid_file_nesting_and_size(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import ablate

    for text in ("[grid]\ntau = " + "[" * 3000 + "]" * 3000 + "\n", "[grid]\ntau = ['" + "1" * (2 << 20) + "']\n"):
        grid = tmp_path / "grid.toml"
        grid.write_text(text)
        assert ablate.main(["--grid-file", str(grid), "--out", str(tmp_path / "a")]) == 2
        message = error_line(capsys.readouterr())
        assert "Grid file" in message and len(message) < 500


# -- NaN causes, diverging experts and evaluations ---------------------------------------------------------


@pytest.mark.parametrize("setting,named", [("mim.tau=1e-37", "mim.tau"), ("mim.lam=1e37", "mim.lam")])
def test_nan_names_the_setting_that_caused_it(tmp_path, capsys, setting, named):
    cfg = write_config(tmp_path, TINY.replace('"dm"', '"dm+mim"') + "[mim]\nn_real = 4\nhead_width = 8\n")
    assert main(["distill", "--config", str(cfg), "--set", setting, "--out", str(tmp_path / "r")]) == 2
    message = last_error_line(capsys.readouterr())
    assert named in message and "lower lr_img" not in message, message


def test_nan_expert_trajectory_is_named(tmp_path, digits):
    from mim4dd_fast.errors import DataError
    from mim4dd_fast.experts import load_experts, train_experts

    small = digits
    train_experts(small, tmp_path, num_experts=1, epochs=1, model_kwargs={"width": 4, "depth": 1}, dsa=False)
    path = tmp_path / "expert_0000.safetensors"
    traj = load_tensors(path)["trajectory"]
    traj[1, 0] = float("nan")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["experts"][path.name] = save_tensors(path, {"trajectory": traj})  # a valid checksum, bad values
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="expert_0000.safetensors holds NaN/Inf"):
        load_experts(tmp_path)


def test_diverging_experts_stop_with_the_cause_and_save_nothing(tmp_path, capsys):
    out = tmp_path / "experts"
    assert main(["experts", "--lr", "1e30", "--epochs", "2", "--num-experts", "2", "--width", "4", "--depth", "1",
                 "--out", str(out)]) == 2
    message = last_error_line(capsys.readouterr())
    assert "diverged" in message and "1e+30" in message and "--lr" in message
    assert not list(out.glob("expert_*.safetensors"))
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {"experts": {}}
    assert manifest["experts"] == {}


def test_diverging_evaluation_is_an_error_not_a_score(tmp_path, capsys):
    cfg = write_config(tmp_path, TINY.replace("epochs = 1", "epochs = 2\nlr = 1e30"))
    assert main(["distill", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    message = last_error_line(capsys.readouterr())
    assert "evaluation net diverged" in message and "[eval] lr = 1e+30" in message
    assert not (tmp_path / "r" / "eval.json").exists()


# -- expert messages ----------------------------------------------------------------------------------------


def test_expert_messages_are_correct_and_consistent(tmp_path, capsys, digits):
    from mim4dd_fast.errors import ConfigError
    from mim4dd_fast.methods.mtt import MTT, MTTConfig

    assert main(["experts", "--depth", "-3", "--out", str(tmp_path / "e")]) == 2
    assert error_line(capsys.readouterr()) == "--depth must be at least 1, got -3."
    with pytest.raises(ConfigError, match=r"must be \[epochs \+ 1, parameters\] matrices, got shape \[3, 1, 10\]"):
        MTT(digits, 1, MTTConfig(width=4, depth=1, syn_steps=1, max_start_epoch=1, expert_epochs=1),
            experts=[torch.zeros(3, 1, 10)])
    out = tmp_path / "x"
    args = ["experts", "--epochs", "1", "--num-experts", "2", "--width", "4", "--depth", "1", "--no-dsa",
            "--out", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    _corrupt(out / "expert_0001.safetensors")
    assert main(args) == 2
    message = last_error_line(capsys.readouterr())
    assert "expert_0001.safetensors is corrupted" in message and "delete it and rerun" in message
    (out / "expert_0001.safetensors").unlink()  # what the message says: then rerunning trains it again
    first = sha256_file(out / "expert_0000.safetensors")
    assert main(args) == 0
    assert sha256_file(out / "expert_0000.safetensors") == first and (out / "expert_0001.safetensors").exists()


# -- ablation cells -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "key_missing", "tampered"])
def test_damaged_ablation_cell_is_named_and_recomputed(tmp_path, capsys, damage, one_thread):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import ablate

    out = tmp_path / "sweep"
    argv = ["--method", "dm+mim", "--grid", "tau=0.1", "--seeds", "0", "--iterations", "1", "--evals", "1",
            "--eval-epochs", "1", "--set", "method.width=4", "--set", "method.batch_real=4", "--set", "mim.n_real=2",
            "--set", "mim.head_width=4", "--out", str(out)]
    assert ablate.main(argv) == 0
    (cell,) = (out / "cells").glob("*.json")
    good = json.loads(cell.read_text())
    if damage == "truncated":
        cell.write_bytes(cell.read_bytes()[:40])
    elif damage == "key_missing":
        del good["accuracies"]
        cell.write_text(json.dumps(with_checksum(good)))
    else:
        good["accuracy_mean"] = 12345.0
        cell.write_text(json.dumps(good))
    capsys.readouterr()
    assert ablate.main(argv) == 0
    assert f"{cell} " in capsys.readouterr().err.replace("\n", "")
    assert "1234500" not in (out / "report.md").read_text()
    assert json.loads(cell.read_text())["accuracy_mean"] <= 1.0


def test_marker_and_config_checksum(run, capsys):
    """config.toml edited behind the run's back is named (the marker holds its sha256)."""
    (run / "config.toml").write_text((run / "config.toml").read_text().replace("iterations = 3", "iterations = 9"))
    (run / "manifest.json").unlink()
    before = snapshot(run)
    assert main(["distill", "--out", str(run), "--resume"]) == 2
    assert "config.toml was modified" in error_line(capsys.readouterr())
    assert snapshot(run) == before
    assert (run / MARKER).exists()


def test_experts_out_of_someone_else_is_refused(tmp_path, capsys):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "manifest.json").write_text('{"mine": true}')
    (theirs / "notes.txt").write_text("mine")
    before = snapshot(theirs)
    assert main(["experts", "--epochs", "1", "--num-experts", "1", "--out", str(theirs)]) == 2
    assert "not expert trajectories" in error_line(capsys.readouterr())
    assert snapshot(theirs) == before


def test_a_run_that_failed_before_its_first_checkpoint_can_be_started_again(tmp_path, capsys):
    out = tmp_path / "run"
    bad = write_config(tmp_path, TINY.replace('"dm"', '"dm+mim"') + "[mim]\nn_real = 1000\n", "bad.toml")
    assert main(["distill", "--config", str(bad), "--out", str(out)]) == 2  # found while building the run
    assert "n_real" in last_error_line(capsys.readouterr())
    assert (out / MARKER).exists() and not (out / "checkpoints").exists()  # claimed, never got going
    assert main(["distill", "--config", str(write_config(tmp_path)), "--out", str(out)]) == 0


def test_without_flock_the_lock_record_decides(tmp_path, monkeypatch):
    """Filesystems without flock (some network mounts): a live pid on this host holds the run, a dead one is
    stale."""
    import errno
    import fcntl

    from mim4dd_fast.errors import UserError

    def no_flock(*_a):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    (tmp_path / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with pytest.raises(UserError, match=f"in use by pid {os.getpid()}"):
        RunLock(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    lock = RunLock(tmp_path)
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK).exists()

"""Experts under torch.distributed (gloo, 2 CPU processes): the split, identical files, resume, a dead rank."""

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from dist_helpers import ROOT, kill_ranks, launch_ranks, run_torchrun

from mim4dd_fast.data import load_dataset
from mim4dd_fast.errors import DataError
from mim4dd_fast.experts import MANIFEST, PENDING, load_experts, train_experts
from mim4dd_fast.models import default_depth

N, EPOCHS, WIDTH = 3, 1, 8
CLI = ["experts", "--dataset", "digits", "--num-experts", N, "--epochs", EPOCHS, "--width", WIDTH, "--device", "cpu",
       "--dist-timeout", 60]
NAMES = [f"expert_{k:04d}.safetensors" for k in range(N)]


def _train_single(out: Path, progress=None) -> list[Path]:
    """What `mim4dd-fast experts` with the CLI flags above does in one process, on one thread as torchrun's ranks."""
    ds = load_dataset("digits", None, image_size=None, zca=False, seed=0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # float reductions depend on the thread count; torchrun gives each rank one
    try:
        return train_experts(ds, out, num_experts=N, epochs=EPOCHS, seed=0, progress=progress,
                             model_kwargs={"width": WIDTH, "depth": default_depth(ds.image_size)})
    finally:
        torch.set_num_threads(before)


def _manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    _train_single(out)
    return out


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> Path:
    """The directory a 2-rank run leaves when both ranks die right after their first expert."""
    out = tmp_path_factory.mktemp("crashed") / "experts"
    procs = launch_ranks([out, N, EPOCHS, WIDTH], script=ROOT / "tests/dist_helpers/crash_after_first.py")
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        kill_ranks(procs)
    assert [p.returncode for p in procs] == [3, 3], results
    return out


def test_two_ranks_split_the_experts_into_the_same_files(reference, tmp_path):
    out = tmp_path / "experts"
    proc = run_torchrun([*CLI, "--out", out], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("3 expert trajectories") == 1  # rank 0 alone prints the final line
    assert "(2 ranks)" in proc.stdout
    # byte-identical to one process: expert k is seeded seed + k whichever rank trains it
    assert _manifest(out) == _manifest(reference)
    for name in NAMES:
        assert (out / name).read_bytes() == (reference / name).read_bytes()
    assert not (out / PENDING).exists()  # rank 0 adopted every rank's record, then removed them
    assert len(load_experts(out)) == N


def test_crashed_run_left_one_expert_per_rank(crashed):
    """Each rank trained its round-robin share: rank 0 expert 0, rank 1 expert 1 (then both died)."""
    assert not (crashed / MANIFEST).exists()
    assert sorted(p.name for p in crashed.glob("*.safetensors")) == NAMES[:2]
    records = {p.name: json.loads(p.read_text()) for p in (crashed / PENDING).iterdir()}
    assert sorted(records) == ["expert_0000.json", "expert_0001.json"]
    assert {r["file"] for r in records.values()} == set(NAMES[:2])


def test_two_ranks_resume_a_crashed_run(crashed, reference, tmp_path):
    out = tmp_path / "experts"
    shutil.copytree(crashed, out)
    kept = {name: os.stat(out / name).st_ino for name in NAMES[:2]}
    procs = launch_ranks([*CLI, "--out", out])  # the ranks directly: torchrun's own start-up costs seconds
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        kill_ranks(procs)
    assert [p.returncode for p in procs] == [0, 0], results
    assert {name: os.stat(out / name).st_ino for name in NAMES[:2]} == kept  # adopted, not rewritten
    assert _manifest(out) == _manifest(reference)
    assert (out / NAMES[2]).read_bytes() == (reference / NAMES[2]).read_bytes()
    assert not (out / PENDING).exists()


def test_one_process_adopts_a_crashed_distributed_run(crashed, reference, tmp_path):
    out = tmp_path / "experts"
    shutil.copytree(crashed, out)
    trained = []
    _train_single(out, progress=lambda k, done, total: trained.append(k))
    assert set(trained) == {2}
    assert _manifest(out) == _manifest(reference)
    assert not (out / PENDING).exists()


def test_pending_record_of_a_corrupted_file_is_dropped_and_retrained(crashed, reference, tmp_path):
    out = tmp_path / "experts"
    shutil.copytree(crashed, out)
    data = bytearray((out / NAMES[1]).read_bytes())
    data[-1] ^= 0xFF
    (out / NAMES[1]).write_bytes(bytes(data))
    trained = []
    _train_single(out, progress=lambda k, done, total: trained.append(k))
    assert set(trained) == {1, 2}
    assert _manifest(out) == _manifest(reference)
    assert (out / NAMES[1]).read_bytes() == (reference / NAMES[1]).read_bytes()


def test_pending_records_of_other_settings_are_refused(crashed, tmp_path):
    out = tmp_path / "experts"
    shutil.copytree(crashed, out)
    ds = load_dataset("digits")
    with pytest.raises(DataError, match="other settings"):
        train_experts(ds, out, num_experts=N, epochs=EPOCHS, seed=1, model_kwargs={"width": WIDTH, "depth": 2})
    assert sorted(p.name for p in (out / PENDING).iterdir()) == ["expert_0000.json", "expert_0001.json"]


def _stop_rank1_mid_run(tmp_path: Path, sig: signal.Signals, timeout: int) -> tuple[int, str, float, Path]:
    """Two ranks started directly (no torchrun); ``sig`` to rank 1 once both train; rank 0's (rc, stderr, wait)."""
    out = tmp_path / "experts"
    # one expert per pass: rank 0 writes expert 0 while rank 1 still has experts 1 and 3 ahead of it; 20 epochs
    # make an expert take long enough (~1 s) that a quiet machine cannot finish rank 1's share before the signal
    procs = launch_ranks(["experts", "--dataset", "digits", "--num-experts", 4, "--epochs", 20, "--width", 8,
                          "--device", "cpu", "--dist-timeout", timeout, "--experts-per-pass", 1, "--out", out])
    try:
        deadline = time.monotonic() + 90
        while not (out / "expert_0000.safetensors").exists():  # both ranks passed the start collective
            assert procs[0].poll() is None and procs[1].poll() is None, procs[0].communicate()
            assert time.monotonic() < deadline, "rank 0 never wrote its first expert"
            time.sleep(0.05)
        os.killpg(procs[1].pid, sig)  # rank 1 still has expert 3 to train
        stopped = time.monotonic()
        _, err = procs[0].communicate(timeout=timeout + 60)
        waited = time.monotonic() - stopped
    finally:
        kill_ranks(procs)
    return procs[0].returncode, err, waited, out


def _one_sentence(err: str, timeout: int) -> None:
    assert "Traceback" not in err
    text = " ".join(err.split())  # rich wraps long lines
    assert text.count("error:") == 1 and "[rank 0] error:" in text, err
    sentence = text[text.index("[rank 0] error:"):]
    assert sentence.startswith("[rank 0] error: rank 0 of 2: waiting for the other ranks to finish their experts "
                               f"failed because another rank stopped or did not answer within {timeout} s"), err


def test_a_killed_rank_stops_the_other_with_one_sentence(tmp_path):
    """SIGKILL rank 1 mid-run: rank 0 finishes its share, then exits 1 with one sentence, never hangs."""
    rc, err, waited, out = _stop_rank1_mid_run(tmp_path, signal.SIGKILL, timeout=15)
    assert rc == 1, err
    assert waited < 15 + 30, waited  # its last expert + at most the timeout (gloo usually sees the closed socket)
    _one_sentence(err, 15)
    assert not (out / MANIFEST).exists()  # nothing claims the run is complete


def test_a_hung_rank_stops_the_other_after_the_timeout(tmp_path):
    """SIGSTOP rank 1 (alive but silent): rank 0 gives up after --dist-timeout at the barrier, exit 1."""
    rc, err, waited, _ = _stop_rank1_mid_run(tmp_path, signal.SIGSTOP, timeout=5)
    assert rc == 1, err
    assert 5 <= waited < 5 + 30, waited
    _one_sentence(err, 5)

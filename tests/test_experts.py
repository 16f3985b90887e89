"""Expert trajectories: shape and content, atomic files + manifest, resume, corruption, cache keys."""

import json
from types import SimpleNamespace

import pytest
import torch

from mim4dd_fast.data import load_dataset
from mim4dd_fast.errors import ConfigError, DataError
from mim4dd_fast.experts import (
    MANIFEST,
    ensure_experts,
    epochs_needed,
    load_experts,
    train_experts,
)
from mim4dd_fast.io import sha256_file
from mim4dd_fast.models import build_model, flatten_params

KW = {"width": 8, "depth": 2}


@pytest.fixture(scope="module")
def small():
    """Digits cut to 200 training images: one expert epoch is one SGD step at batch 256."""
    ds = load_dataset("digits")
    ds.x_train, ds.y_train = ds.x_train[:200], ds.y_train[:200]
    return ds


def test_trajectory_matches_a_hand_run_sgd(small, tmp_path):
    """Without DSA, expert 0's trajectory is plain SGD (lr 0.01, no momentum) from the seed-0 init."""
    paths = train_experts(small, tmp_path, num_experts=1, epochs=2, seed=0, dsa=False, model_kwargs=KW)
    traj = load_experts(tmp_path)[0]
    assert paths == [tmp_path / "expert_0000.safetensors"]
    torch.manual_seed(0)
    model = build_model(1, 10, 8, **KW)
    n_params = flatten_params(model).numel()
    assert traj.shape == (3, n_params)
    assert torch.equal(traj[0], flatten_params(model))
    gen = torch.Generator().manual_seed(0)
    for epoch in range(2):
        perm = torch.randperm(200, generator=gen)  # a single batch: order does not change the mean loss
        x, y = small.x_train[perm], small.y_train[perm]
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.01 * p.grad
        torch.testing.assert_close(traj[epoch + 1], flatten_params(model), rtol=1e-5, atol=1e-6)


def test_manifest_resume_and_corruption(small, tmp_path):
    calls = []

    def crash_after_expert_1(k, done, total):
        calls.append((k, done, total))
        if k == 1 and done == total:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_experts(small, tmp_path, num_experts=3, epochs=2, seed=5, model_kwargs=KW,
                      progress=crash_after_expert_1)
    # one pass trains experts 0-2 together (epoch progress for each), then writes 0, 1, ... and stops after 1
    assert calls == [(0, 1, 2), (1, 1, 2), (2, 1, 2), (0, 2, 2), (1, 2, 2)]
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert sorted(manifest["experts"]) == ["expert_0000.safetensors", "expert_0001.safetensors"]
    assert manifest["epochs"] == 2 and manifest["seed"] == 5 and manifest["lr"] == 0.01
    assert manifest["batch_size"] == 256 and manifest["model_kwargs"] == KW
    assert manifest["dataset"]["name"] == "digits"
    for name, sha in manifest["experts"].items():
        assert sha256_file(tmp_path / name) == sha
    first = (tmp_path / "expert_0000.safetensors").read_bytes()

    resumed = []
    train_experts(small, tmp_path, num_experts=3, epochs=2, seed=5, model_kwargs=KW,
                  progress=lambda k, d, t: resumed.append(k))
    assert set(resumed) == {2}  # experts 0 and 1 were kept, not retrained
    assert (tmp_path / "expert_0000.safetensors").read_bytes() == first

    # expert k is seeded with seed + k: an uninterrupted run writes the same expert 2
    fresh = tmp_path / "fresh"
    train_experts(small, fresh, num_experts=3, epochs=2, seed=5, model_kwargs=KW)
    assert (fresh / "expert_0002.safetensors").read_bytes() == (tmp_path / "expert_0002.safetensors").read_bytes()
    assert len(load_experts(tmp_path, expected_settings={"epochs": 2, "seed": 5})) == 3

    bad = tmp_path / "expert_0001.safetensors"
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError, match="expert_0001.safetensors"):
        load_experts(tmp_path)
    with pytest.raises(DataError, match="expert_0001.safetensors"):
        train_experts(small, tmp_path, num_experts=3, epochs=2, seed=5, model_kwargs=KW)
    bad.write_bytes(b"not a tensor file")
    with pytest.raises(DataError, match="expert_0001.safetensors"):
        load_experts(tmp_path)


def test_settings_mismatch_is_refused(small, tmp_path):
    train_experts(small, tmp_path, num_experts=1, epochs=1, seed=0, model_kwargs=KW)
    with pytest.raises(DataError, match="other settings"):
        train_experts(small, tmp_path, num_experts=1, epochs=1, seed=1, model_kwargs=KW)
    with pytest.raises(DataError, match="epochs"):
        load_experts(tmp_path, expected_settings={"epochs": 3})
    with pytest.raises(DataError, match="No expert manifest"):
        load_experts(tmp_path / "missing")
    with pytest.raises(ConfigError):
        train_experts(small, tmp_path / "x", num_experts=0, epochs=1)


def test_ensure_experts_caches_by_settings(small, tmp_path):
    a = ensure_experts(small, tmp_path, num_experts=1, epochs=1, seed=0, model_kwargs=KW)
    again = ensure_experts(small, tmp_path, num_experts=1, epochs=1, seed=0, model_kwargs=KW)
    other = ensure_experts(small, tmp_path, num_experts=1, epochs=1, seed=1, model_kwargs=KW)
    dirs = sorted(p.name for p in tmp_path.iterdir())
    assert len(dirs) == 2 and all(d.startswith("digits-") for d in dirs)
    assert torch.equal(a[0], again[0]) and not torch.equal(a[0], other[0])
    more = ensure_experts(small, tmp_path, num_experts=2, epochs=1, seed=0, model_kwargs=KW)
    assert len(more) == 2 and torch.equal(more[0], a[0])


def test_epochs_needed_covers_the_last_target():
    cfg = SimpleNamespace(max_start_epoch=20, expert_epochs=2)
    # start epochs 0..19, the latest target is epoch 21
    assert epochs_needed(cfg) == 21


def _trajectories(small, out, **kw):
    train_experts(small, out, **{"num_experts": 4, "epochs": 2, "seed": 3, "model_kwargs": KW, **kw})
    return load_experts(out)


def test_batched_experts_equal_one_by_one_and_would_catch_a_wrong_seed(small, tmp_path):
    """Experts trained 3 per pass (the last pass padded) vs alone: float summation order only."""
    alone = _trajectories(small, tmp_path / "alone", experts_per_pass=1)
    batched = _trajectories(small, tmp_path / "batched", experts_per_pass=3)
    diff = max(float((a - b).abs().max()) for a, b in zip(alone, batched, strict=True))
    assert diff <= 1e-5, diff  # measured ~6e-8 (parameters ~0.3)
    # expert k is seeded seed + k: a shifted seed (or a shared shuffle) is far outside that tolerance
    assert float((alone[1] - batched[2]).abs().max()) > 1e-2
    with pytest.raises(ConfigError, match="experts_per_pass"):
        train_experts(small, tmp_path / "bad", num_experts=1, epochs=1, model_kwargs=KW, experts_per_pass=0)


@pytest.mark.parametrize("threads", [1, 2])
def test_an_expert_is_the_same_file_whichever_experts_share_its_pass(tmp_path, threads):
    """Every pass is experts_per_pass nets wide (padded), so expert k's bytes do not depend on its partners
    or its slot: extending a directory, resuming and torchrun's round-robin shares give the same files.
    (These settings do catch a slot-dependent kernel: a batched-matmul classifier fails here.)"""
    ds = load_dataset("digits")
    ds.x_train, ds.y_train = ds.x_train[:256], ds.y_train[:256]
    kw = {"epochs": 1, "seed": 1, "model_kwargs": {"width": 32, "depth": 2}, "experts_per_pass": 4}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        train_experts(ds, tmp_path / "one", num_experts=7, **kw)  # passes [0-3], [4-6 + padding]
        train_experts(ds, tmp_path / "two", num_experts=3, **kw)  # passes [0-2 + padding], then [3-6]
        train_experts(ds, tmp_path / "two", num_experts=7, **kw)
    finally:
        torch.set_num_threads(before)
    for k in range(7):
        name = f"expert_{k:04d}.safetensors"
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name

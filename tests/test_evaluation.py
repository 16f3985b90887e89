"""The evaluation protocol: accuracy on digits, determinism, lr schedule, minibatching, validation."""

import math

import numpy as np
import pytest
import torch

import mim4dd_fast.evaluation as ev
from mim4dd_fast.config import from_mapping
from mim4dd_fast.data import load_dataset
from mim4dd_fast.errors import ConfigError, DataError
from mim4dd_fast.evaluation import (
    EvalConfig,
    epoch_lr,
    evaluate_synthetic,
    random_baseline,
    random_subset,
    train_and_test,
    train_net,
)
from mim4dd_fast.models import flatten_params

TINY = EvalConfig(epochs=4, n_nets=2, width=16)  # fast settings for the tests that check mechanics


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_random_real_ipc10_beats_chance_by_a_wide_margin(digits):
    # A CI-sized budget: 20 SGD steps per net, 2 nets. Chance is 10%.
    result = random_baseline(digits, 10, EvalConfig(epochs=20, n_nets=2), seed=0)
    assert len(result["accuracies"]) == 2
    assert result["mean"] > 0.5, result


def test_same_seed_same_net_and_accuracy_and_callers_rng_untouched(digits):
    x, y = random_subset(digits, 3, seed=1)
    state = torch.get_rng_state()
    a = train_net(x, y, digits, TINY, seed=7)
    b = train_net(x, y, digits, TINY, seed=7)
    c = train_net(x, y, digits, TINY, seed=8)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(flatten_params(a), flatten_params(b))
    assert not torch.equal(flatten_params(a), flatten_params(c))
    assert train_and_test(x, y, digits, TINY, seed=7) == train_and_test(x, y, digits, TINY, seed=7)


def test_lr_is_divided_by_ten_once_at_the_midpoint(digits):
    x, y = random_subset(digits, 1, seed=0)
    for epochs, lr, override in [(6, 0.01, None), (5, 0.01, None), (4, 0.01, 0.05), (1, 0.02, None)]:
        seen: list[float] = []
        cfg = EvalConfig(epochs=epochs, lr=lr, width=8, dsa=False)
        train_net(x, y, digits, cfg, seed=0, lr=override,
                  on_epoch=lambda e, opt, seen=seen: seen.append(opt.param_groups[0]["lr"]))
        base = override or lr
        mid = epochs // 2 if epochs >= 2 else epochs  # with one epoch there is no second half
        expected = [base] * mid + [base / 10] * (epochs - mid)
        assert seen == pytest.approx(expected, rel=1e-12), (epochs, seen)
    assert [epoch_lr(e, 300, 0.01) for e in (0, 149, 150, 299)] == pytest.approx([0.01, 0.01, 0.001, 0.001])


def test_minibatches_and_dsa_per_minibatch(digits, monkeypatch):
    calls = []
    real_dsa = ev.dsa_augment

    def spy(xb, **kw):
        calls.append(xb.shape[0])
        assert "seed" not in kw and kw.get("generator") is not None  # per-sample, from the local generator
        return real_dsa(xb, **kw)

    monkeypatch.setattr(ev, "dsa_augment", spy)
    x, y = random_subset(digits, 2, seed=0)  # 20 images
    train_net(x, y, digits, EvalConfig(epochs=2, batch_size=7, width=8), seed=0)
    assert calls == [7, 7, 6, 7, 7, 6]
    calls.clear()
    train_net(x, y, digits, EvalConfig(epochs=2, batch_size=7, width=8, dsa=False), seed=0)
    assert calls == []


def test_net_starts_from_the_seeded_init_and_training_moves_it(digits):
    from mim4dd_fast.models import build_model

    with torch.random.fork_rng():
        torch.manual_seed(3)
        init = flatten_params(build_model(1, 10, 8, width=8))
    start = []
    net = train_net(*random_subset(digits, 2, seed=0), digits, EvalConfig(epochs=3, width=8), seed=3,
                    on_epoch=lambda e, opt: start.append(torch.cat([p.detach().flatten().clone()
                                                                    for p in opt.param_groups[0]["params"]]))
                    if e == 0 else None)
    assert torch.equal(start[0], init)
    assert not torch.allclose(flatten_params(net), init)


def test_evaluate_synthetic_reports_mean_population_std_and_progress(digits):
    x, y = random_subset(digits, 2, seed=4)
    x = x.clone().requires_grad_(True)  # a learnable synthetic set is accepted as is
    seen = []
    result = evaluate_synthetic(x, y, digits, TINY, seed=5, progress=lambda i, acc: seen.append((i, acc)))
    accs = result["accuracies"]
    assert [i for i, _ in seen] == [0, 1] and [a for _, a in seen] == accs
    assert all(0.0 <= a <= 1.0 for a in accs)
    assert result["mean"] == pytest.approx(sum(accs) / 2)
    assert result["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2)  # population std of two values
    # net i is exactly train_and_test with seed + i
    assert accs[1] == train_and_test(x, y, digits, TINY, seed=6)


def test_accuracy_is_correct_fraction_of_test_split(digits):
    x, y = random_subset(digits, 2, seed=0)
    net = train_net(x, y, digits, TINY, seed=0)
    with torch.no_grad():
        manual = (net(digits.x_test).argmax(1) == digits.y_test).double().mean().item()
    assert ev.split_accuracy(net, digits) == pytest.approx(manual)


def test_random_baseline_draws_a_fresh_subset_per_net(digits):
    a, ya = random_subset(digits, 3, seed=0)
    b, _ = random_subset(digits, 3, seed=1)
    assert torch.equal(ya, torch.arange(10).repeat_interleave(3))
    assert not torch.equal(a, b)
    # every image really belongs to its class: each row is found among that class's training images
    for img, label in zip(a, ya, strict=True):
        pool = digits.x_train[digits.y_train == label]
        assert (pool == img).flatten(1).all(1).any()
    result = random_baseline(digits, 3, TINY, seed=0)
    expected = [train_and_test(*random_subset(digits, 3, seed=i), digits, TINY, seed=i) for i in (0, 1)]
    assert result["accuracies"] == expected
    assert result["std"] == pytest.approx(float(np.std(expected)))


@pytest.mark.parametrize(
    "field,value",
    [("epochs", 0), ("lr", -0.1), ("lr", math.nan), ("lr", math.inf), ("batch_size", 0), ("momentum", 1.0),
     ("momentum", -0.5), ("weight_decay", -1e-4), ("n_nets", 0), ("width", 0), ("depth", 0)],
)
def test_eval_config_rejects_bad_values(field, value):
    with pytest.raises(ConfigError, match=field):
        EvalConfig(**{field: value}).validate()
    with pytest.raises(ConfigError):
        from_mapping(EvalConfig, {field: value})


def test_eval_config_defaults_validate_and_unknown_keys_fail():
    EvalConfig().validate()
    assert from_mapping(EvalConfig, {"epochs": 10, "depth": None}).epochs == 10
    with pytest.raises(ConfigError, match="epoch"):
        from_mapping(EvalConfig, {"epoch": 10})


def test_bad_training_sets_and_lr_are_user_errors(digits):
    x, y = random_subset(digits, 1, seed=0)
    with pytest.raises(DataError, match="shape"):
        evaluate_synthetic(torch.zeros(10, 3, 8, 8), y, digits, TINY)
    with pytest.raises(DataError, match="label"):
        evaluate_synthetic(x, y[:5], digits, TINY)
    with pytest.raises(DataError, match="labels"):
        evaluate_synthetic(x, y + 1, digits, TINY)
    with pytest.raises(DataError, match="NaN"):
        evaluate_synthetic(x * math.nan, y, digits, TINY)
    with pytest.raises(ConfigError, match="lr"):
        evaluate_synthetic(x, y, digits, TINY, lr=-1.0)
    with pytest.raises(DataError, match="IPC"):
        random_baseline(digits, 10_000, TINY)


def test_cli_evaluate_random(digits, capsys):
    from mim4dd_fast.cli import main

    assert main(["evaluate", "--dataset", "digits", "--ipc", "1", "--random", "--nets", "1", "--epochs", "2",
                 "--device", "cpu"]) == 0
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_evaluation_runs_and_beats_chance(digits):
    result = random_baseline(digits, 10, EvalConfig(epochs=20, n_nets=1), seed=0, device="cuda")
    assert result["mean"] > 0.5

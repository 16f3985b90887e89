"""The evaluation protocol: accuracy on digits, determinism, lr schedule, minibatching, validation."""

import copy
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
    evaluate_splits,
    evaluate_synthetic,
    random_baseline,
    random_subset,
    sgd,
    split_accuracy,
    stacked_accuracies,
    train_and_test,
    train_net,
    train_stacked,
)
from mim4dd_fast.models import MODELS, flatten_params

TINY = EvalConfig(epochs=4, n_nets=2, width=16)  # fast settings for the tests that check mechanics
# Batched vs one-by-one nets differ only in float summation order: max |parameter difference| measured
# 6e-8 at these settings (parameters ~0.3); a wrong seed or a shared shuffle moves them by ~1e-2.
PARAM_ATOL = 1e-5
ONE_IMAGE = 1 / 359 + 1e-12  # one digits test image: accuracies may flip one near-tied prediction at most


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
    # net i is train_and_test with seed + i (trained alone), up to float summation order
    assert abs(accs[1] - train_and_test(x, y, digits, TINY, seed=6)) <= ONE_IMAGE


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
    assert result["accuracies"] == pytest.approx(expected, abs=ONE_IMAGE)
    assert result["std"] == pytest.approx(float(np.std(result["accuracies"])))
    one_by_one = random_baseline(digits, 3, EvalConfig(**{**vars(TINY), "nets_per_pass": 1}), seed=0)
    assert one_by_one["accuracies"] == expected  # the reference path is train_and_test itself


@pytest.mark.parametrize(
    "field,value",
    [("epochs", 0), ("lr", -0.1), ("lr", math.nan), ("lr", math.inf), ("batch_size", 0), ("momentum", 1.0),
     ("momentum", -0.5), ("weight_decay", -1e-4), ("n_nets", 0), ("width", 0), ("depth", 0), ("model", "vgg"),
     ("nets_per_pass", -1), ("nets_per_pass", 1.5)],
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


# -- batched evaluation (StackedNets) -----------------------------------------------------------


def _flat(nets):
    return torch.stack([flatten_params(n) for n in nets])


def test_stacked_training_equals_one_by_one_and_would_catch_a_wrong_stream(digits, monkeypatch):
    """Per-net subsets, 3 minibatches per epoch (shuffling matters), DSA and momentum on."""
    cfg = EvalConfig(epochs=3, batch_size=8, width=16)
    sets = [random_subset(digits, 2, seed=10 + i) for i in range(3)]  # 20 images each: batches 8, 8, 4
    state = torch.get_rng_state()
    stack = train_stacked(sets, digits, cfg, seeds=[4, 5, 6])
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is untouched
    alone = [train_net(x, y, digits, cfg, seed=s) for (x, y), s in zip(sets, [4, 5, 6], strict=True)]
    diff = (stack.flat_params() - _flat(alone)).abs().max()
    assert diff <= PARAM_ATOL, diff
    # the tolerance is far below what a bug would cause: net 0's init with net 1's shuffling and DSA stream
    real_fresh = ev.fresh_net
    monkeypatch.setattr(ev, "fresh_net", lambda dataset, cfg, seed: real_fresh(dataset, cfg, 4))
    wrong_stream = train_net(*sets[0], digits, cfg, seed=5)
    assert (flatten_params(wrong_stream) - flatten_params(alone[0])).abs().max() > 100 * PARAM_ATOL
    monkeypatch.undo()
    wrong_seed = train_net(*sets[0], digits, cfg, seed=5)
    assert (flatten_params(wrong_seed) - flatten_params(alone[0])).abs().max() > 100 * PARAM_ATOL
    # the accuracies of the stack are each net's own
    for i, net in enumerate(alone):
        assert abs(stacked_accuracies(stack, digits)[i] - split_accuracy(net, digits)) <= ONE_IMAGE


def test_stacked_nets_see_the_batches_they_would_see_alone(digits, monkeypatch):
    """Each net's DSA calls get its own generator, in the same order and with the same images as alone."""
    seen = {"alone": [], "stacked": []}
    real = ev.dsa_augment
    key = "alone"

    def spy(xb, generator):
        seen[key].append((xb.clone(), generator.initial_seed()))
        return real(xb, generator=generator)

    monkeypatch.setattr(ev, "dsa_augment", spy)
    cfg = EvalConfig(epochs=2, batch_size=7, width=8)
    x, y = random_subset(digits, 2, seed=0)
    for s in (3, 4):
        train_net(x, y, digits, cfg, seed=s)
    key = "stacked"
    train_stacked([(x, y), (x, y)], digits, cfg, seeds=[3, 4])
    by_seed = {s: [b for b, g in seen["stacked"] if g == s] for s in (3, 4)}
    alone = {s: [b for b, g in seen["alone"] if g == s] for s in (3, 4)}
    for s in (3, 4):
        assert len(by_seed[s]) == len(alone[s]) == 6  # 2 epochs x batches of 7, 7, 6
        assert all(torch.equal(a, b) for a, b in zip(alone[s], by_seed[s], strict=True))
    assert not torch.equal(by_seed[3][0], by_seed[4][0])  # each net its own shuffle


def test_nets_per_pass_chunks_and_one_by_one_reference(digits):
    x, y = random_subset(digits, 2, seed=1)
    base = dict(epochs=3, n_nets=3, width=8)
    runs = {k: [] for k in (0, 1, 2)}
    results = {k: evaluate_synthetic(x, y, digits, EvalConfig(**base, nets_per_pass=k), seed=7,
                                     progress=lambda i, a, k=k: runs[k].append(i)) for k in runs}
    assert all(order == [0, 1, 2] for order in runs.values())
    reference = [train_and_test(x, y, digits, EvalConfig(**base), seed=7 + i) for i in range(3)]
    assert results[1]["accuracies"] == reference  # nets_per_pass = 1 is exactly the one-by-one protocol
    for k in (0, 2):
        assert results[k]["accuracies"] == pytest.approx(reference, abs=ONE_IMAGE)


def test_unstackable_models_fall_back_to_one_by_one(digits, monkeypatch):
    def refuse(nets):
        raise ev.NotStackable("test")

    x, y = random_subset(digits, 1, seed=0)
    reference = evaluate_synthetic(x, y, digits, EvalConfig(**{**vars(TINY), "nets_per_pass": 1}), seed=2)
    monkeypatch.setattr(ev, "StackedNets", refuse)
    assert evaluate_synthetic(x, y, digits, TINY, seed=2) == reference


@pytest.mark.parametrize("model", [m for m in MODELS if m != "convnet"])
def test_cross_architecture_evaluation_batched_equals_one_by_one(digits, model):
    x, y = random_subset(digits, 1, seed=0)
    cfg = EvalConfig(epochs=2, n_nets=2, model=model)
    stack = train_stacked([(x, y)] * 2, digits, cfg, seeds=[0, 1])
    alone = [train_net(x, y, digits, cfg, seed=s) for s in (0, 1)]
    scale = _flat(alone).abs().max()
    assert (stack.flat_params() - _flat(alone)).abs().max() <= PARAM_ATOL * max(1.0, float(scale))
    assert type(stack.net(0)) is type(alone[0])
    assert stacked_accuracies(stack, digits) == pytest.approx([split_accuracy(n, digits) for n in alone],
                                                              abs=ONE_IMAGE)


def test_batchnorm_refuses_a_lone_image_per_minibatch(digits):
    x, y = random_subset(digits, 1, seed=0)  # 10 images
    with pytest.raises(DataError, match="BatchNorm"):
        evaluate_synthetic(x, y, digits, EvalConfig(epochs=1, n_nets=1, model="resnet18", batch_size=3))
    with pytest.raises(ConfigError, match="depth"):
        EvalConfig(model="mlp", depth=2).validate()


def test_validation_split(digits):
    x, y = random_subset(digits, 2, seed=0)
    no_val = copy.copy(digits)  # e.g. a Dataset built by hand without a validation split
    no_val.x_val = no_val.y_val = None
    with pytest.raises(DataError, match="no validation split"):
        evaluate_synthetic(x, y, no_val, TINY, split="val")
    with pytest.raises(DataError, match="no validation split"):
        random_baseline(no_val, 1, TINY, split="val")
    with pytest.raises(ConfigError, match="split"):
        train_and_test(x, y, digits, TINY, seed=0, split="train")
    with_val = copy.copy(digits)
    with_val.x_val, with_val.y_val = digits.x_test[:50], digits.y_test[:50]
    net = train_net(x, y, with_val, TINY, seed=0)
    with torch.no_grad():
        manual = (net(digits.x_test[:50]).argmax(1) == digits.y_test[:50]).double().mean().item()
    assert split_accuracy(net, with_val, split="val") == pytest.approx(manual)
    assert train_and_test(x, y, with_val, TINY, seed=0, split="val") == pytest.approx(manual)
    val = evaluate_synthetic(x, y, with_val, TINY, seed=0, split="val")["accuracies"][0]
    assert abs(val - manual) <= 1 / 50 + 1e-12
    empty = copy.copy(digits)
    empty.x_val, empty.y_val = digits.x_test[:0], digits.y_test[:0]
    with pytest.raises(DataError, match="empty"):
        evaluate_synthetic(x, y, empty, TINY, split="val")


def test_ranks_train_their_own_nets_together(digits):
    """Under torchrun (here a stand-in Dist) rank r trains nets r, r + N, ... as one stack."""

    class TwoRanks(ev.Dist):
        def all_gather_objects(self, obj, what=""):
            return [[(0, {"test": -1.0}), (2, {"test": -1.0})], obj]  # rank 0's nets 0 and 2 (placeholders)

    x, y = random_subset(digits, 1, seed=0)
    cfg = EvalConfig(**{**vars(TINY), "n_nets": 3})
    trained = []
    result = evaluate_synthetic(x, y, digits, cfg, seed=0, dist=TwoRanks(rank=1, world_size=2),
                                progress=lambda i, a: trained.append(i))
    assert trained == [1]
    full = evaluate_synthetic(x, y, digits, cfg, seed=0)["accuracies"]
    assert result["accuracies"][1] == pytest.approx(full[1], abs=ONE_IMAGE)


def test_several_splits_come_from_the_same_nets(digits):
    """evaluate_splits trains each net once: its validation and test accuracies equal evaluate_synthetic's
    on each split alone (same seeds), in one pass of training."""
    x, y = random_subset(digits, 2, seed=0)
    both = evaluate_splits(x, y, digits, TINY, splits=("val", "test"), seed=3)
    assert both["val"] == evaluate_synthetic(x, y, digits, TINY, seed=3, split="val")
    assert both["test"] == evaluate_synthetic(x, y, digits, TINY, seed=3, split="test")


def test_cpu_stacks_nets_only_for_small_minibatches(digits, monkeypatch):
    """nets_per_pass = 0 (auto): every net at once, except on CPU above STACK_MAX_IMAGES_CPU images per
    minibatch, where grouped convolutions were measured slower than one by one; an explicit value wins."""
    limit = ev.STACK_MAX_IMAGES_CPU
    assert ev.auto_nets_per_pass(5, limit, 256, "cpu") == 5
    assert ev.auto_nets_per_pass(5, limit + 1, 256, "cpu") == 1
    assert ev.auto_nets_per_pass(5, 10 * limit, limit, "cpu") == 5  # the minibatch, not the set, decides
    assert ev.auto_nets_per_pass(5, 10 * limit, 256, "cuda") == 5
    calls: list[int] = []
    real = ev.train_stacked
    monkeypatch.setattr(ev, "train_stacked", lambda sets, *a, **k: calls.append(len(sets)) or real(sets, *a, **k))
    x, y = random_subset(digits, limit // 10 + 1, seed=0)  # more images than the limit, one minibatch
    auto = evaluate_synthetic(x, y, digits, TINY, seed=0)
    assert calls == []
    assert auto == evaluate_synthetic(x, y, digits, EvalConfig(**{**vars(TINY), "nets_per_pass": 1}), seed=0)
    evaluate_synthetic(x, y, digits, EvalConfig(**{**vars(TINY), "nets_per_pass": 2}), seed=0)
    assert calls == [2]
    x, y = random_subset(digits, 1, seed=0)
    evaluate_synthetic(x, y, digits, TINY, seed=0)
    assert calls == [2, 2]


def test_sgd_is_the_textbook_update_and_fused_on_cpu():
    """buf = momentum * buf + (g + wd * p) (buf = g + wd * p at the first step); p -= lr * buf."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(7, 3, dtype=torch.float64, generator=gen).requires_grad_()
    grads = [torch.randn(7, 3, dtype=torch.float64, generator=gen) for _ in range(4)]
    lr, momentum, wd = 0.05, 0.9, 5e-4
    opt = sgd([p], lr=lr, momentum=momentum, weight_decay=wd)
    assert opt.defaults["fused"] is True
    want, buf = p.detach().clone(), None
    for g in grads:
        p.grad = g.clone()
        opt.step()
        d = g + wd * want
        buf = d if buf is None else momentum * buf + d
        want = want - lr * buf
    torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-14)

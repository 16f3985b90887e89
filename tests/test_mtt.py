"""MTT: exact unroll gradients (two modes + finite differences), learning on digits, NaN guard,
bit-identical resume, the MIM-term hook, config validation."""

import io

import pytest
import torch

from mim4dd_fast.config import from_mapping
from mim4dd_fast.data import load_dataset
from mim4dd_fast.errors import ConfigError, NonFiniteError
from mim4dd_fast.evaluation import EvalConfig, evaluate_synthetic, random_baseline
from mim4dd_fast.experts import load_experts, train_experts
from mim4dd_fast.methods.mim import MIMConfig
from mim4dd_fast.methods.mtt import MTT, MTTConfig, match_loss, unroll_checkpointed, unroll_full
from mim4dd_fast.models import build_model, functional_forward

W = 16
def _cfg(mapping: dict) -> MTTConfig:
    """Typed MTT settings from a mapping, checked as a config file's [method_config] table is."""
    return from_mapping(MTTConfig, mapping, what="mtt setting")


CFG = dict(syn_steps=5, expert_epochs=2, max_start_epoch=4, lr_img=100.0, lr_lr=1e-5, width=W, depth=2)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def experts(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("experts")
    train_experts(digits, out, num_experts=2, epochs=6, seed=0, model_kwargs={"width": W, "depth": 2})
    return load_experts(out)


# -- the unroll -------------------------------------------------------------------------------------


def _problem(dsa_seeds=(11, 12, None, 14, 15)):
    torch.manual_seed(0)
    model = build_model(1, 10, 8, width=6, depth=2).double()
    n_params = sum(p.numel() for p in model.parameters())
    start = torch.randn(n_params, dtype=torch.float64) * 0.2
    target = start + torch.randn(n_params, dtype=torch.float64) * 0.02
    images = torch.randn(20, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(10).repeat_interleave(2)
    syn_lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randperm(20, generator=gen)[:7], s) for s in dsa_seeds]
    return model, start, target, images, labels, syn_lr, batches


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_checkpointed_unroll_equals_full_unroll_in_float64():
    model, start, target, images, labels, syn_lr, batches = _problem()
    loss_f, gi_f, gl_f = unroll_full(model, start, target, images, labels, syn_lr, batches)
    loss_c, gi_c, gl_c = unroll_checkpointed(model, start, target, images, labels, syn_lr, batches)
    assert float(loss_f) == pytest.approx(float(loss_c), rel=1e-12)
    assert gi_f.abs().sum() > 0 and gl_f.abs() > 0
    assert _rel(gi_c, gi_f) < 1e-5
    assert abs(float(gl_c - gl_f)) / abs(float(gl_f)) < 1e-5
    # only images that appear in some minibatch get a gradient
    used = torch.zeros(20, dtype=torch.bool)
    for idx, _ in batches:
        used[idx] = True
    assert torch.all(gi_c[~used] == 0) and torch.all(gi_c[used].flatten(1).abs().sum(1) > 0)


def test_unroll_gradient_matches_finite_differences():
    """An independent oracle: central differences of the plainly-computed loss (no DSA, so smooth)."""
    model, start, target, images, labels, syn_lr, batches = _problem(dsa_seeds=(None,) * 4)

    def plain_loss(x, lr):
        theta = start.clone().requires_grad_(True)
        for idx, _ in batches:
            ce = torch.nn.functional.cross_entropy(functional_forward(model, theta, x[idx]), labels[idx])
            (g,) = torch.autograd.grad(ce, theta)
            theta = (theta - lr * g).detach().requires_grad_(True)
        return float(match_loss(theta.detach(), start, target))

    _, g_img, g_lr = unroll_checkpointed(model, start, target, images, labels, syn_lr, batches)
    x0, lr0, eps = images.detach(), float(syn_lr.detach()), 1e-6
    fd_lr = (plain_loss(x0, lr0 + eps) - plain_loss(x0, lr0 - eps)) / (2 * eps)
    assert float(g_lr) == pytest.approx(fd_lr, rel=1e-5)
    direction = torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    fd_x = (plain_loss(x0 + eps * direction, lr0) - plain_loss(x0 - eps * direction, lr0)) / (2 * eps)
    assert float((g_img * direction).sum()) == pytest.approx(fd_x, rel=1e-5)


# -- the method ------------------------------------------------------------------------------------


def test_loss_decreases_on_digits(digits, experts):
    m = MTT(digits, 1, config=_cfg(CFG), experts=experts, seed=0)
    losses = [m.step()["loss"] for _ in range(20)]
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.8 * first
    assert m.learned_lr() > 0 and m.iteration == 20


def test_distilled_digits_beat_random_real(digits):
    """IPC 1 on digits, CI-sized: MTT must clearly beat the same number of random real images."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        train_experts(digits, tmp, num_experts=2, epochs=8, seed=0, model_kwargs={"width": 16, "depth": 2})
        ex = load_experts(tmp)
    cfg = dict(syn_steps=8, expert_epochs=2, max_start_epoch=6, lr_img=100.0, lr_lr=1e-5, width=16, depth=2)
    m = MTT(digits, 1, config=_cfg(cfg), experts=ex, seed=0)
    # 60 steps: with the fixed 60/20/20 digits split an expert epoch has 25% fewer SGD steps than with the
    # old 80/20 split, and 30 steps left margins of only 3-10 points over seeds 0-2 (60 steps: 11-12).
    for _ in range(60):
        m.step()
    ev = EvalConfig(epochs=150, n_nets=2, width=32)
    x, y = m.synthetic_set()
    distilled = evaluate_synthetic(x, y, digits, ev, seed=0, lr=m.learned_lr())
    baseline = random_baseline(digits, 1, ev, seed=0)
    assert distilled["mean"] > baseline["mean"] + 0.05


def test_both_unroll_modes_take_the_same_step(digits, experts):
    a = MTT(digits, 1, config=_cfg({**CFG, "unroll": "full"}), experts=experts, seed=3)
    b = MTT(digits, 1, config=_cfg({**CFG, "unroll": "checkpointed"}), experts=experts, seed=3)
    la, lb = a.step(), b.step()
    assert la["loss"] == pytest.approx(lb["loss"], rel=1e-5)
    torch.testing.assert_close(a.images, b.images, rtol=1e-4, atol=1e-4)
    assert a.learned_lr() == pytest.approx(b.learned_lr(), rel=1e-5)


def test_state_dict_round_trip_continues_bit_identically(digits, experts):
    ref = MTT(digits, 1, config=_cfg(CFG), experts=experts, seed=7)
    for _ in range(2):
        ref.step()
    state = ref.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)  # must be plain weights: loadable with weights_only
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    ref_logs = [ref.step() for _ in range(2)]

    resumed = MTT(digits, 1, config=_cfg(CFG), experts=experts, seed=123)
    resumed.load_state_dict(state)
    logs = [resumed.step() for _ in range(2)]
    assert logs == ref_logs
    assert torch.equal(resumed.images, ref.images)
    assert resumed.learned_lr() == ref.learned_lr() and resumed.iteration == 4


def test_nan_guard_restores_last_good_state(digits, experts):
    m = MTT(digits, 1, config=_cfg({**CFG, "lr_img": 1e30}), experts=experts, seed=0)
    seen = []
    with pytest.raises(NonFiniteError, match=r"lower lr_img \(now 1e\+30\)"):
        for _ in range(10):
            seen.append((m.images.detach().clone(), m.learned_lr(), m.iteration))
            m.step()
    assert torch.isfinite(m.images).all()
    # restored to the state at the start of an iteration that had a finite loss
    assert any(torch.equal(m.images, img) and m.learned_lr() == lr and m.iteration == it for img, lr, it in seen)


class _SumTerm:
    """A stand-in MIM term: loss = weight * sum(x_syn), so its image gradient is exactly ``weight``."""

    n_real = 2

    def __init__(self, real_side="start", weight=0.5):
        self.config = MIMConfig(real_side=real_side)
        self.weight, self.calls = weight, []

    def __call__(self, model, x_syn, y_syn, x_real, y_real, *, forward_syn, forward_real):
        self.calls += ["zero_grad", "step"]  # the term trains its own parameters inside the call
        probe = torch.ones(1, 1, 8, 8)
        self.outputs = (forward_syn(probe).detach(), forward_real(probe).detach())
        assert x_real.shape[0] == 2 * 10 and y_real.shape[0] == 20
        return self.weight * x_syn.sum(), {"term": 1.0}

    def parameters(self):
        return []

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_term_gradient_is_added_to_the_image_step(digits, experts):
    cfg = {**CFG, "dsa": False, "momentum": 0.0}
    plain = MTT(digits, 1, config=_cfg(cfg), experts=experts, seed=5)
    term = _SumTerm(weight=0.5)
    with_term = MTT(digits, 1, config=_cfg(cfg), experts=experts, seed=5, term=term)
    before = plain.images.detach().clone()
    plain.step()
    logs = with_term.step()
    assert logs["term"] == 1.0 and term.calls == ["zero_grad", "step"]
    # SGD without momentum: the extra update is exactly -lr_img * weight on every pixel
    torch.testing.assert_close(with_term.images - plain.images, torch.full_like(before, -100.0 * 0.5))
    syn_out, real_out = term.outputs
    assert torch.equal(syn_out, real_out)  # real_side "start": both at theta*_t

    target_term = _SumTerm(real_side="target")
    MTT(digits, 1, config=_cfg(cfg), experts=experts, seed=5, term=target_term).step()
    assert not torch.equal(*target_term.outputs)


def test_config_and_expert_validation(digits, experts):
    with pytest.raises(ConfigError, match="unroll"):
        MTT(digits, 1, config=_cfg({**CFG, "unroll": "tesla"}), experts=experts)
    with pytest.raises(ConfigError, match="Unknown mtt setting key"):
        MTT(digits, 1, config=_cfg({**CFG, "syn_step": 3}), experts=experts)
    with pytest.raises(ConfigError, match="same model"):
        MTT(digits, 1, config=_cfg({**CFG, "width": 8}), experts=experts)
    with pytest.raises(ConfigError, match="train longer experts"):
        MTT(digits, 1, config=_cfg({**CFG, "max_start_epoch": 10}), experts=experts)
    with pytest.raises(ConfigError, match="at least one expert"):
        MTT(digits, 1, config=_cfg(CFG), experts=[])
    assert MTTConfig().unroll == "auto" and MTTConfig().momentum == 0.5


# -- unroll = "auto" ---------------------------------------------------------------------------------


def test_auto_unroll_is_full_for_small_graphs_and_checkpointed_for_big_ones_or_ranks(digits, experts):
    from mim4dd_fast.methods import mtt as mtt_mod

    small = MTT(digits, 1, config=_cfg(CFG), experts=experts)
    assert small.unroll == "full"
    assert MTT(digits, 1, config=_cfg({**CFG, "unroll": "checkpointed"}), experts=experts).unroll == "checkpointed"
    cifar = build_model(3, 10, 32, width=128, depth=3)  # the anchors' setting: hundreds of MiB
    assert mtt_mod.full_unroll_bytes(cifar, 10, 10) > mtt_mod.AUTO_FULL_MAX_BYTES
    assert mtt_mod.choose_unroll("auto", cifar, 10, 10, world_size=1) == "checkpointed"
    assert mtt_mod.choose_unroll("auto", small.model, 5, 10, world_size=2) == "checkpointed"
    assert mtt_mod.choose_unroll("full", cifar, 10, 10, world_size=1) == "full"


@pytest.mark.parametrize("size,width", [(8, 16), (16, 8)])
def test_full_unroll_estimate_bounds_the_bytes_it_saves(size, width):
    """The estimate behind auto is an upper bound of what the full unroll really keeps (saved_tensors_hooks)."""
    from mim4dd_fast.methods import mtt as mtt_mod
    from mim4dd_fast.profiling import SavedTensorBytes

    torch.manual_seed(0)
    model = build_model(3, 10, size, width=width).requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    start = torch.randn(n_params) * 0.1
    images = torch.randn(10, 3, size, size, requires_grad=True)
    labels = torch.arange(10)
    syn_lr = torch.tensor(0.01, requires_grad=True)
    batches = [(torch.randperm(10), s) for s in (1, 2, 3, 4)]
    with SavedTensorBytes() as saved:
        mtt_mod.unroll_full(model, start, start + 0.01, images, labels, syn_lr, batches)
    estimate = mtt_mod.full_unroll_bytes(model, 4, 10)
    assert saved.peak <= estimate <= 4 * saved.peak  # an upper bound, and not a wild one


# -- presets ---------------------------------------------------------------------------------------


def test_presets_are_valid_and_carry_the_original_values():
    from mim4dd_fast.experts import epochs_needed
    from mim4dd_fast.presets import default_preset, list_presets, load_preset

    names = list_presets()
    for ds in ("cifar10", "cifar100", "tinyimagenet"):
        for ipc in (1, 10, 50):
            assert f"mtt-{ds}-ipc{ipc}" in names
    assert {"mtt-digits-ipc1", "mtt-digits-ipc10"} <= set(names)
    for name in names:
        preset = load_preset(name)
        cfg = from_mapping(MTTConfig, preset["method_config"])
        assert preset["expert_epochs"] >= epochs_needed(cfg), name
    # the README's CIFAR-100 IPC 1 command: 20 steps, 3 expert epochs, start < 20, ZCA, 1000 / 1e-5 / 0.01
    c100 = load_preset("mtt-cifar100-ipc1")
    assert c100["zca"] is True and c100["method_config"] == {
        "syn_steps": 20, "expert_epochs": 3, "max_start_epoch": 20, "lr_img": 1000.0, "lr_lr": 1e-5,
        "lr_teacher": 0.01, "width": 128, "depth": 3, "dsa": True}
    assert load_preset("mtt-cifar100-ipc50")["method_config"]["batch_syn"] == 125
    assert default_preset("mim4dd", "digits", 1) == "mtt-digits-ipc1"
    assert default_preset("mtt+mim", "CIFAR10", 10) == "mtt-cifar10-ipc10"
    assert default_preset("dm", "digits", 1) is None and default_preset("mtt", "digits", 50) is None
    with pytest.raises(ConfigError, match="valid presets are: .*mtt-digits-ipc1"):
        load_preset("mtt-digits-ipc2")


def test_the_unroll_graph_does_not_hold_the_expert_trajectory(digits, experts):
    """theta_0 is a copy of the trajectory's row: the graph's saved bytes do not grow with the trajectory length."""
    from mim4dd_fast.profiling import SavedTensorBytes

    long_experts = [torch.cat([t] + [t[-1:]] * 40) for t in experts]  # 40 more epochs, same start rows
    peaks = []
    for trajectories in (experts, long_experts):
        method = MTT(digits, 1, config=_cfg({**CFG, "unroll": "full"}), experts=trajectories, seed=5)
        with SavedTensorBytes() as saved:
            method.step()
        peaks.append(saved.peak)
    assert peaks[0] == peaks[1]

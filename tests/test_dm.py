"""DM (distribution matching): exact image gradients against the original per-class formulation,
loss decrease, accuracy over the random-real baseline, the MIM hook, bit-identical resume."""

import math

import pytest
import torch

from mim4dd_fast.checkpoint import read_checkpoint, save_checkpoint
from mim4dd_fast.config import from_mapping
from mim4dd_fast.errors import ConfigError
from mim4dd_fast.evaluation import EvalConfig, evaluate_synthetic, random_baseline
from mim4dd_fast.methods.dm import DM, DMConfig

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.mark.parametrize("dsa", [False, True])
def test_step_gradient_matches_original_formulation(digits, dsa):
    """Per class: embed real and synthetic separately, sum ||mean_r - mean_s||^2 (main_DM.py)."""
    cfg = DMConfig(width=8, batch_real=16, dsa=dsa, lr_img=0.5, momentum_img=0.0)
    m = DM(digits, 3, cfg, seed=2, init="noise")
    before = m.images.detach().clone()
    gen_state = m.generator.get_state()
    logs = m.step()

    m.generator.set_state(gen_state)  # replay: same net seed, real batches and DSA seeds
    net = m.fresh_net()
    images = before.clone().requires_grad_(True)
    loss = torch.zeros(())
    for c in range(10):
        x_real, _ = m.sample_real(16, [c])
        x_syn = images[3 * c : 3 * c + 3]
        if dsa:
            seed = m.draw_seed()
            x_real, x_syn = m._dsa(x_real, seed=seed), m._dsa(x_syn, seed=seed)
        loss = loss + torch.sum((net.embed(x_real).detach().mean(0) - net.embed(x_syn).mean(0)) ** 2)
    (grad,) = torch.autograd.grad(loss, images)
    assert logs["loss"] == pytest.approx(loss.item() / 10, rel=1e-5)
    torch.testing.assert_close(m.images.detach(), before - 0.5 * grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [{"lr_img": 0.0}, {"batch_real": -1}, {"momentum_img": -0.1}, {"depth": 0},
                                 {"outer_loop": 2}])
def test_bad_settings_raise_config_error(bad):
    with pytest.raises(ConfigError):
        from_mapping(DMConfig, bad)


def test_defaults_are_the_originals():
    cfg = DMConfig()
    assert (cfg.batch_real, cfg.lr_img, cfg.momentum_img, cfg.dsa) == (256, 1.0, 0.5, True)


def test_loss_decreases_on_digits(digits):
    m = DM(digits, 2, DMConfig(width=8, batch_real=32), seed=0, init="noise")
    losses = [m.step()["loss"] for _ in range(30)]
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.5 * first, (first, last)


def test_distilled_ipc1_beats_random_real(digits):
    ev = EvalConfig(epochs=80, n_nets=2, width=16)
    m = DM(digits, 1, DMConfig(width=16, batch_real=64), seed=0)
    for _ in range(50):
        m.step()
    distilled = evaluate_synthetic(*m.synthetic_set(), digits, ev, seed=0)["mean"]
    random = random_baseline(digits, 1, ev, seed=0)["mean"]
    assert distilled > random + 0.05, (distilled, random)


def test_resume_is_bit_identical(digits, tmp_path):
    cfg = DMConfig(width=8, batch_real=16)
    a = DM(digits, 2, cfg, seed=0)
    for _ in range(3):
        a.step()
    save_checkpoint(tmp_path, 3, a.state_dict())
    logs_a = [a.step() for _ in range(3)]

    b = DM(digits, 2, cfg, seed=9)
    _, state = read_checkpoint(tmp_path / "ckpt-00000003.json")
    b.load_state_dict(state)
    torch.manual_seed(5)  # the global RNG must not matter
    logs_b = [b.step() for _ in range(3)]
    assert logs_a == logs_b
    assert torch.equal(a.images.detach(), b.images.detach())


class FakeTerm:
    """An AuxTerm whose loss is weight * sum(x_syn): its image gradient is exactly ``weight``."""

    n_real = 3

    def __init__(self, weight):
        self.weight, self.calls, self.zeroed, self.stepped = weight, [], 0, 0

    def __call__(self, model, x_syn, y_syn, x_real, y_real, *, forward_syn, forward_real):
        self.zeroed += 1  # the term trains its own parameters inside the call
        self.stepped += 1
        self.calls.append({"same_net": forward_syn is model and forward_real is model,
                           "frozen": not any(p.requires_grad for p in model.parameters()),
                           "n_real": int(x_real.shape[0])})
        return self.weight * x_syn.sum(), {"fake": 2.0}

    def parameters(self):
        return []

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_term_hook_adds_gradient_and_logs(digits):
    cfg = DMConfig(width=8, batch_real=16, dsa=False)
    plain = DM(digits, 1, cfg, seed=4)
    plain.step()
    term = FakeTerm(0.1)
    hooked = DM(digits, 1, cfg, seed=4, term=term)
    logs = hooked.step()
    assert logs["fake"] == 2.0 and (term.zeroed, term.stepped) == (1, 1)
    assert term.calls == [{"same_net": True, "frozen": True, "n_real": 30}]
    shift = hooked.images.detach() - plain.images.detach()  # first step: -lr_img (1.0) * weight
    torch.testing.assert_close(shift, torch.full_like(shift, -0.1), rtol=0, atol=1e-5)

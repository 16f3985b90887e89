"""DC (gradient matching): distance on hand-computed numbers, exact image gradients against the
original's formulation, loss decrease, accuracy over the random-real baseline, bit-identical resume."""

import math

import pytest
import torch
import torch.nn.functional as F

from mim4dd_fast.checkpoint import read_checkpoint, save_checkpoint
from mim4dd_fast.config import from_mapping
from mim4dd_fast.errors import ConfigError
from mim4dd_fast.evaluation import EvalConfig, evaluate_synthetic, random_baseline
from mim4dd_fast.methods.dc import DC, DCConfig, default_loops, match_distance

pytestmark = pytest.mark.usefixtures("one_thread")



def _tiny(**kw):
    base = dict(width=8, batch_real=16, outer_loop=1, inner_loop=1)
    return DCConfig(**{**base, **kw})


# -- the distance -------------------------------------------------------------------------------
# Real gradients: W = [[1, 0], [0, 1]], b = [1, 0]; synthetic: W = [[1, 0], [1, 1]], b = [0, 1].
# "ours", per output row of W: row 0 cos = 1 -> 0; row 1 cos((0,1),(1,1)) = 1/sqrt(2) -> 1 - 0.70711 = 0.29289;
#   the bias is ignored; with include_1d the bias is one row with cos 0 -> + 1 = 1.29289.
# "mse": W differs only at [1, 0] by 1 -> 1; bias (0-1)^2 + (1-0)^2 = 2 -> 3.
# "cos": real (1,0,0,1,1,0), syn (1,0,1,1,0,1): dot 2, norms sqrt(3) and 2 -> 1 - 1/sqrt(3) = 0.42265.
REAL = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1.0, 0.0])]
SYN = [torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([0.0, 1.0])]


@pytest.mark.parametrize(
    "metric, include_1d, expected",
    [("ours", False, 1 - 1 / math.sqrt(2)), ("ours", True, 2 - 1 / math.sqrt(2)), ("mse", False, 3.0),
     ("cos", False, 1 - 1 / math.sqrt(3))],
)
def test_match_distance_hand_computed(metric, include_1d, expected):
    got = match_distance(SYN, REAL, metric, include_1d)
    assert got.item() == pytest.approx(expected, abs=1e-5)


def test_match_distance_conv_rows_are_output_channels():
    # A [2, 1, 1, 2] conv gradient is compared row by row over its output channels like the 2-D weight.
    conv_syn, conv_real = [SYN[0].view(2, 1, 1, 2)], [REAL[0].view(2, 1, 1, 2)]
    assert match_distance(conv_syn, conv_real).item() == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-5)
    assert match_distance([SYN[1]], [REAL[1]]).item() == 0.0  # only 1-D tensors: nothing matched


def _distance_wb(gwr, gws):
    """The original DatasetCondensation distance_wb, transcribed (a second implementation)."""
    shape = gwr.shape
    if len(shape) == 4:
        gwr = gwr.reshape(shape[0], shape[1] * shape[2] * shape[3])
        gws = gws.reshape(shape[0], shape[1] * shape[2] * shape[3])
    elif len(shape) == 1:
        return torch.tensor(0.0)
    return torch.sum(1 - torch.sum(gwr * gws, dim=-1) / (torch.norm(gwr, dim=-1) * torch.norm(gws, dim=-1) + 1e-6))


def _original_match_loss(gw_syn, gw_real, metric):
    if metric == "ours":
        return sum(_distance_wb(r, s) for r, s in zip(gw_real, gw_syn, strict=True))
    r = torch.cat([g.reshape(-1) for g in gw_real])
    s = torch.cat([g.reshape(-1) for g in gw_syn])
    if metric == "mse":
        return torch.sum((s - r) ** 2)
    return 1 - torch.sum(r * s, dim=-1) / (torch.norm(r, dim=-1) * torch.norm(s, dim=-1) + 1e-6)


@pytest.mark.parametrize("metric, dsa", [("ours", True), ("mse", False), ("cos", True)])
def test_image_gradient_matches_original_formulation(digits, metric, dsa):
    """One backward of the summed class losses (the original) == our per-class backward into the images."""
    m = DC(digits, 2, _tiny(dis_metric=metric, dsa=dsa), seed=3, init="noise")
    net = m.fresh_net()
    params = list(net.parameters())
    state = m.generator.get_state()
    m.images.grad = None
    total = m.match(net, params)
    fast = m.images.grad.clone()

    m.generator.set_state(state)  # same real batches and DSA seeds, drawn in the same order
    loss = torch.zeros(())
    for c in range(10):
        x_real, y_real = m.sample_real(16, [c])
        x_syn, y_syn = m.images[2 * c : 2 * c + 2], torch.full((2,), c)
        if dsa:
            seed = m.draw_seed()
            x_real, x_syn = m._dsa(x_real, seed=seed), m._dsa(x_syn, seed=seed)
        gw_real = [g.detach().clone() for g in torch.autograd.grad(F.cross_entropy(net(x_real), y_real), params)]
        gw_syn = torch.autograd.grad(F.cross_entropy(net(x_syn), y_syn), params, create_graph=True)
        loss = loss + _original_match_loss(gw_syn, gw_real, metric)
    (reference,) = torch.autograd.grad(loss, m.images)
    assert total == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-7)


# -- configuration ----------------------------------------------------------------------------
def test_loop_table_and_rule():
    assert [default_loops(i) for i in (1, 10, 20, 30, 40, 50)] == [(1, 1), (10, 50), (20, 25), (30, 20), (40, 15),
                                                                    (50, 10)]
    assert default_loops(2) == (1, 1) and default_loops(5) == (1, 1)  # nearest tabled IPC, ties -> smaller
    assert default_loops(6) == (10, 50) and default_loops(15) == (10, 50) and default_loops(100) == (50, 10)
    assert DCConfig(outer_loop=3).loops(10) == (3, 50)
    assert DCConfig(inner_loop=0).loops(10) == (10, 0)


@pytest.mark.parametrize("bad", [{"dis_metric": "l2"}, {"outer_loop": 0}, {"lr_img": -1.0}, {"batch_real": 0},
                                 {"momentum_img": 1.0}, {"widht": 8}, {"dsa": "yes"}])
def test_bad_settings_raise_config_error(bad):
    with pytest.raises(ConfigError):
        from_mapping(DCConfig, bad)


# -- behaviour --------------------------------------------------------------------------------
def test_loss_decreases_on_digits(digits):
    m = DC(digits, 1, DCConfig(width=8, batch_real=32), seed=0, init="noise")
    losses = [m.step()["loss"] for _ in range(24)]
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.8 * first, (first, last)


def test_distilled_ipc1_beats_random_real(digits):
    ev = EvalConfig(epochs=80, n_nets=2, width=16)
    m = DC(digits, 1, DCConfig(width=16, batch_real=64), seed=0)
    for _ in range(20):
        m.step()
    distilled = evaluate_synthetic(*m.synthetic_set(), digits, ev, seed=0)["mean"]
    random = random_baseline(digits, 1, ev, seed=0)["mean"]
    assert distilled > random + 0.05, (distilled, random)


def test_resume_is_bit_identical(digits, tmp_path):
    cfg = _tiny(outer_loop=2, inner_loop=2, batch_train=3)  # several inner minibatches, DSA on
    a = DC(digits, 2, cfg, seed=0)
    for _ in range(2):
        a.step()
    save_checkpoint(tmp_path, 2, a.state_dict())  # the state must survive a real checkpoint
    logs_a = [a.step() for _ in range(2)]

    b = DC(digits, 2, cfg, seed=7)
    _, state = read_checkpoint(tmp_path / "ckpt-00000002.json")
    b.load_state_dict(state)
    torch.manual_seed(123)  # the global RNG must not matter
    logs_b = [b.step() for _ in range(2)]
    assert logs_a == logs_b
    assert torch.equal(a.images.detach(), b.images.detach())
    assert b.iteration == 4


class FakeTerm:
    """An AuxTerm whose loss is weight * sum(x_syn): its image gradient is exactly ``weight``."""

    n_real = 2

    def __init__(self, weight):
        self.weight, self.calls, self.zeroed, self.stepped = weight, [], 0, 0

    def __call__(self, model, x_syn, y_syn, x_real, y_real, *, forward_syn, forward_real):
        self.zeroed += 1  # the term trains its own parameters inside the call
        self.stepped += 1
        self.calls.append({
            "same_net": forward_syn is model and forward_real is model,
            "net_params_frozen": not any(p.requires_grad for p in model.parameters()),
            "n_real": int(x_real.shape[0]), "y_syn": y_syn.tolist(),
        })
        forward_syn(x_syn)
        return self.weight * x_syn.sum(), {"fake": 1.5}

    def parameters(self):
        return []

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_term_hook_adds_gradient_and_logs(digits):
    cfg = _tiny(dsa=False)
    plain = DC(digits, 1, cfg, seed=1)
    plain.step()
    term = FakeTerm(0.25)
    hooked = DC(digits, 1, cfg, seed=1, term=term)
    logs = hooked.step()
    assert logs["fake"] == 1.5 and (term.zeroed, term.stepped) == (1, 1)
    assert term.calls == [{"same_net": True, "net_params_frozen": True, "n_real": 20, "y_syn": list(range(10))}]
    # First SGD step: images -= lr_img * grad, so the term shifts every pixel by -lr_img * weight.
    shift = hooked.images.detach() - plain.images.detach()
    torch.testing.assert_close(shift, torch.full_like(shift, -0.1 * 0.25), rtol=0, atol=1e-5)

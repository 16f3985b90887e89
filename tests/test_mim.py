"""The MIM4DD term: layer weights, heads, value vs a direct computation, learning, config errors,
and the term running inside dc+mim, dm+mim and mtt+mim."""

import math

import pytest
import torch
import torch.nn.functional as F

from mim4dd_fast.config import from_mapping
from mim4dd_fast.data import load_dataset
from mim4dd_fast.errors import ConfigError
from mim4dd_fast.methods.mim import MIMConfig, MIMTerm, beta_weights
from mim4dd_fast.models import ConvNet


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _net(width: int = 8, seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet(channels=1, num_classes=10, image_size=8, width=width)


def _term(model, **settings) -> MIMTerm:
    return MIMTerm(from_mapping(MIMConfig, settings), model, 10, "cpu")


def _batch(n_per_class: int, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return torch.randn(len(y), 1, 8, 8, generator=g), y


def _loop_loss(a, b, ya, yb, tau, critic="infonce", k=1.0, neg_weight=1.0) -> float:
    """The loss of docs/method.md written anchor by anchor in float64 (an independent oracle)."""
    a, b = a.double(), b.double()
    a = a / a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True)
    losses = []
    for i in range(a.shape[0]):
        x = [float(a[i] @ b[j]) / tau for j in range(b.shape[0])]
        pos = [x[j] for j in range(len(x)) if yb[j] == ya[i]]
        neg = [x[j] for j in range(len(x)) if yb[j] != ya[i]]
        if not pos:
            continue
        if critic == "infonce":
            top = max(x)
            lse = top + math.log(sum(math.exp(v - top) for v in x))
            losses.append(lse - sum(pos) / len(pos))
        else:
            def softplus(v):
                return math.log1p(math.exp(-abs(v))) + max(v, 0.0)
            lk = math.log(k)
            term = sum(softplus(lk - v) for v in pos) / len(pos)
            if neg:
                term += neg_weight * sum(softplus(v - lk) for v in neg) / len(neg)
            losses.append(term)
    return sum(losses) / len(losses)


# -- layer weights ----------------------------------------------------------------------------
def test_beta_weights():
    assert beta_weights(4) == pytest.approx([0.25] * 4)
    deep = beta_weights(3, "geometric", 0.5)  # 0.25 : 0.5 : 1
    assert deep == pytest.approx([0.25 / 1.75, 0.5 / 1.75, 1 / 1.75])
    assert deep[0] < deep[1] < deep[2]  # beta_value < 1 favours deep layers
    shallow = beta_weights(3, "geometric", 2.0)
    assert shallow[0] > shallow[1] > shallow[2]
    assert beta_weights(2, beta_list=[1.0, 3.0]) == pytest.approx([0.25, 0.75])
    with pytest.raises(ConfigError, match="2 layers"):
        beta_weights(2, beta_list=[1.0, 2.0, 3.0])


def test_term_uses_beta_list_and_checks_its_length():
    term = _term(_net(), beta_list=[3.0, 1.0])
    assert term.beta == pytest.approx([0.75, 0.25])
    with pytest.raises(ConfigError, match="3 entries but 2 layers"):
        _term(_net(), beta_list=[1.0, 1.0, 1.0])  # default layers: both blocks
    with pytest.raises(ConfigError, match="2 entries but 1 layers"):
        from_mapping(MIMConfig, {"layers": ["blocks.1"], "beta_list": [1.0, 1.0]})


# -- heads ------------------------------------------------------------------------------------
@pytest.mark.parametrize("head, out_dim", [("identity", 8 * 4), ("linear", 5), ("mlp", 5)])
def test_head_shapes(head, out_dim):
    term = _term(_net(), head=head, head_width=5)
    f = torch.randn(7, 8 * 4)  # C * p * p with width 8, p 2
    for g in term.heads:
        assert g(f).shape == (7, out_dim)
    if head == "mlp":
        assert [type(m).__name__ for m in term.heads[0]] == ["Linear", "ReLU", "Linear"]
        assert term.heads[0][0].out_features == 5


def test_separate_heads_are_a_second_set():
    shared = _term(_net(), head_sharing="shared")
    separate = _term(_net(), head_sharing="separate")
    assert shared.heads_real is shared.heads
    assert separate.heads_real is not separate.heads
    assert not torch.equal(separate.heads[0].weight, separate.heads_real[0].weight)


def test_frozen_heads_do_not_move_joint_heads_do():
    model = _net()
    x_syn, y_syn = _batch(2)
    x_real, y_real = _batch(4, seed=1)
    for mode in ("frozen", "joint"):
        term = _term(model, head_train=mode, n_real=4, lr_head=0.01)
        before = [p.detach().clone() for p in term.head_modules.parameters()]
        x = x_syn.clone().requires_grad_(True)
        term.zero_grad()
        loss, _ = term.loss(model, model, model, x, y_syn, x_real, y_real)
        loss.backward()
        term.step()
        moved = any(not torch.equal(b, p) for b, p in zip(before, term.head_modules.parameters(), strict=True))
        assert x.grad is not None and x.grad.abs().sum() > 0  # the images always get a gradient
        if mode == "frozen":
            assert term.optimizer is None and not moved
            assert all(not p.requires_grad for p in term.head_modules.parameters())
        else:
            assert moved


def test_head_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    a = _term(_net(), seed=4)
    after_a = torch.rand(1)
    torch.manual_seed(123)
    b = _term(_net(), seed=4)
    after_b = torch.rand(1)
    torch.manual_seed(123)
    _net()
    expected = torch.rand(1)
    assert torch.equal(a.heads[0].weight, b.heads[0].weight)
    assert torch.equal(after_a, expected) and torch.equal(after_b, expected)


# -- value ------------------------------------------------------------------------------------
@pytest.mark.parametrize("critic, symmetric", [("infonce", False), ("nce", False), ("infonce", True)])
def test_value_matches_direct_computation(critic, symmetric):
    model = _net()
    term = _term(model, lam=0.7, tau=0.2, critic=critic, noise_ratio=2.0, neg_weight=0.5, beta="geometric",
                 beta_value=0.5, head="linear", head_width=6, n_real=3, symmetric=symmetric)
    x_syn, y_syn = _batch(2)
    x_real, y_real = _batch(3, seed=1)
    loss, logs = term.loss(model, model, model, x_syn, y_syn, x_real, y_real)

    # Direct: block outputs by hand, textbook pooling, the term's heads, the loop oracle.
    def pooled(x):
        h, out = x, []
        for block in model.blocks:
            h = block(h)
            out.append(F.adaptive_avg_pool2d(h, 2).flatten(1))
        return out

    with torch.no_grad():
        fs, fr = pooled(x_syn), pooled(x_real)
        betas = [1 / 3, 2 / 3]
        total = 0.0
        for k, name in enumerate(["blocks.0", "blocks.1"]):
            zs, zr = term.heads[k](fs[k]), term.heads[k](fr[k])
            kw = dict(tau=0.2, critic=critic, k=2.0, neg_weight=0.5)
            layer = _loop_loss(zs, zr, y_syn, y_real, **kw)
            if symmetric:
                layer = 0.5 * (layer + _loop_loss(zr, zs, y_real, y_syn, **kw))
            assert logs[f"mim/{name}"] == pytest.approx(layer, rel=1e-4)
            infonce = _loop_loss(zs, zr, y_syn, y_real, tau=0.2)
            assert logs[f"mi_est/{name}"] == pytest.approx(math.log(9) - infonce, rel=1e-4, abs=1e-5)
            total += betas[k] * layer
    assert loss.item() == pytest.approx(0.7 * total, rel=1e-4)
    assert logs["mim_loss"] == pytest.approx(0.7 * total, rel=1e-4)
    assert all(type(v) is float for v in logs.values())


def test_real_side_keeps_no_graph_through_the_network():
    model = _net()
    term = _term(model, n_real=3)
    x_syn, y_syn = _batch(2)
    x_real, y_real = _batch(3, seed=1)
    x_real.requires_grad_(True)
    loss, _ = term.loss(model, model, model, x_syn, y_syn, x_real, y_real)
    loss.backward()
    assert x_real.grad is None
    assert model.blocks[0][0].weight.grad is not None  # the synthetic side does reach the network


def test_term_decreases_when_optimising_synthetic_images(digits):
    torch.manual_seed(0)
    model = ConvNet(1, 10, 8, width=16)
    term = _term(model, lam=1.0, head_width=16, n_real=16, lr_head=0.01)
    ipc = 2
    y_syn = torch.arange(10).repeat_interleave(ipc)
    g = torch.Generator().manual_seed(0)
    x_syn = torch.cat([digits.class_index.sample(c, ipc, g) for c in range(10)]).clone().requires_grad_(True)
    opt = torch.optim.Adam([x_syn], lr=0.05)
    values = []
    for _ in range(25):
        x_real = torch.cat([digits.class_index.sample(c, 16, g) for c in range(10)])
        y_real = torch.arange(10).repeat_interleave(16)
        opt.zero_grad()
        term.zero_grad()
        loss, logs = term.loss(model, model, model, x_syn, y_syn, x_real, y_real)
        loss.backward()
        opt.step()
        term.step()
        values.append(logs["mim_loss"])
    assert sum(values[-4:]) / 4 < 0.9 * sum(values[:4]) / 4, values


def test_state_dict_round_trip():
    model = _net()
    x_syn, y_syn = _batch(2)
    x_real, y_real = _batch(3, seed=1)
    a = _term(model, n_real=3, seed=1, head="mlp")
    loss, _ = a.loss(model, model, model, x_syn, y_syn, x_real, y_real)
    loss.backward()
    a.step()
    b = _term(model, n_real=3, seed=2, head="mlp")
    b.load_state_dict(a.state_dict())
    for term in (a, b):  # one more identical step on both
        term.zero_grad()
        loss, _ = term.loss(model, model, model, x_syn, y_syn, x_real, y_real)
        loss.backward()
        term.step()
    for pa, pb in zip(a.head_modules.parameters(), b.head_modules.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


def test_bfloat16_features_stay_close():
    model = _net()
    x_syn, y_syn = _batch(2)
    x_real, y_real = _batch(3, seed=1)
    full, _ = _term(model, n_real=3).loss(model, model, model, x_syn, y_syn, x_real, y_real)
    half, _ = _term(model, n_real=3, feature_dtype="bfloat16").loss(model, model, model, x_syn, y_syn,
                                                                      x_real, y_real)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=0.05)


def test_real_side_in_chunks_is_exact_and_naive_tap_agrees():
    model = _net()
    x_syn, y_syn = _batch(2)
    x_real, y_real = _batch(5, seed=1)  # 15 real images: chunks of 4 leave a ragged last chunk
    whole, logs = _term(model, n_real=5, real_chunk=128).loss(model, model, model, x_syn, y_syn, x_real, y_real)
    chunked, logs_c = _term(model, n_real=5, real_chunk=4).loss(model, model, model, x_syn, y_syn, x_real, y_real)
    naive, _ = _term(model, n_real=5, tap="naive").loss(model, model, model, x_syn, y_syn, x_real, y_real)
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-5)
    assert naive.item() == pytest.approx(whole.item(), rel=1e-5)
    assert logs_c["mi_est/blocks.0"] == pytest.approx(logs["mi_est/blocks.0"], rel=1e-5)


# -- configuration errors ---------------------------------------------------------------------
@pytest.mark.parametrize("settings, match", [
    ({"lam": -0.1}, "lam"),
    ({"real_chunk": 0}, "real_chunk"),
    ({"tap": "lazy"}, "tap"),
    ({"lam": float("nan")}, "finite"),
    ({"tau": 0.0}, "tau"),
    ({"tau": float("inf")}, "finite"),
    ({"head_width": 0}, "head_width"),
    ({"critic": "jsd"}, "critic"),
    ({"head": "conv"}, "head"),
    ({"head_sharing": "both"}, "head_sharing"),
    ({"head_train": "late"}, "head_train"),
    ({"beta": "linear"}, "beta"),
    ({"beta": "list"}, "beta_list"),
    ({"beta": "geometric", "beta_list": [1.0, 2.0]}, "conflicts"),
    ({"beta_list": [1.0, -1.0]}, "beta_list"),
    ({"real_side": "end"}, "real_side"),
    ({"feature_dtype": "float16"}, "feature_dtype"),
    ({"n_real": 0}, "n_real"),
    ({"pool": 0}, "pool"),
    ({"layers": []}, "layers"),
    ({"impl": "cuda"}, "impl"),
    ({"lambda": 1.0}, "Unknown"),
])
def test_config_errors(settings, match):
    with pytest.raises(ConfigError, match=match) as info:
        from_mapping(MIMConfig, settings, what="MIM settings")
    assert str(info.value).count(".") >= 1 and "\n" not in str(info.value)


def test_unknown_layer_names_valid_ones():
    with pytest.raises(ConfigError, match="blocks.0, blocks.1"):
        _term(_net(), layers=["blocks.0", "conv9"])


def test_n_real_larger_than_smallest_class(digits):
    term = _term(_net(), n_real=10_000)
    with pytest.raises(ConfigError, match="smallest class"):
        term.check_dataset(digits)
    model = _net()
    term = _term(model, n_real=4)
    x_syn, y_syn = _batch(1)
    x_real, y_real = _batch(3, seed=1)  # only 3 real images per class were available
    with pytest.raises(ConfigError, match="n_real 4"):
        term.loss(model, model, model, x_syn, y_syn, x_real, y_real)


# -- inside the methods -----------------------------------------------------------------------
MIM_SMALL = {"lam": 1.0, "head_width": 16, "n_real": 16, "lr_head": 0.01}


def _mim_values(method, iterations: int) -> list[float]:
    values = []
    for _ in range(iterations):
        logs = method.step()
        assert {"mim_loss", "mim/blocks.0", "mim/blocks.1", "mi_est/blocks.1"} <= set(logs)
        values.append(logs["mim_loss"])
    return values


def _decreased(values: list[float]) -> bool:
    return sum(values[-3:]) / 3 < sum(values[:3]) / 3 - 0.05


@pytest.mark.parametrize("name, config, iterations", [
    ("dc+mim", {"outer_loop": 1, "inner_loop": 0, "batch_real": 4, "dsa": False, "width": 8}, 8),
    ("dm+mim", {"batch_real": 8, "dsa": False, "width": 8}, 8),
])
def test_term_decreases_inside_dc_and_dm(digits, name, config, iterations):
    from mim4dd_fast.methods import build_method

    method = build_method(name, digits, 1, config=config, mim=MIM_SMALL)
    values = _mim_values(method, iterations)
    assert _decreased(values), values


def test_term_decreases_inside_mtt(digits, tmp_path):
    from mim4dd_fast.experts import ensure_experts
    from mim4dd_fast.methods import build_method

    experts = ensure_experts(digits, tmp_path, num_experts=1, epochs=2, batch_size=256, dsa=False,
                             model_kwargs={"width": 8})
    config = {"syn_steps": 3, "expert_epochs": 1, "max_start_epoch": 1, "dsa": False, "width": 8, "lr_img": 100.0}
    method = build_method("mtt+mim", digits, 1, config=config, mim=MIM_SMALL, experts=experts)
    values = _mim_values(method, 8)
    assert _decreased(values), values


def test_heads_train_on_the_unweighted_bound_at_every_lambda():
    """lambda weighs the term in the images' loss only: the heads' step is the same at lambda 0, 0.1 and 3,
    and at lambda 0 the images get no gradient from the term while its heads still move."""
    model = _net()
    x_syn, y_syn = _batch(2)
    x_real, y_real = _batch(4, seed=1)
    heads, image_grads = [], []
    for lam in (0.0, 0.1, 3.0):
        term = _term(model, lam=lam, n_real=4, head_optimizer="sgd", lr_head=0.1)
        x = x_syn.clone().requires_grad_(True)
        loss, logs = term(model, x, y_syn, x_real, y_real)
        if loss.requires_grad:
            loss.backward()
        heads.append(torch.cat([p.detach().flatten() for p in term.parameters()]))
        image_grads.append(None if x.grad is None else x.grad.clone())
        layer_losses = [logs[f"mim/{name}"] for name in term.layers]
        assert logs["mim_loss"] == pytest.approx(lam * sum(b * v for b, v in zip(term.beta, layer_losses, strict=True)))
    torch.testing.assert_close(heads[0], heads[1])
    torch.testing.assert_close(heads[1], heads[2])
    start = torch.cat([p.detach().flatten() for p in _term(model, n_real=4).parameters()])
    assert not torch.equal(heads[0], start)  # lambda 0: the heads moved
    assert image_grads[0] is None  # ... and the images got nothing from the term
    torch.testing.assert_close(image_grads[2], image_grads[1] * 30.0, rtol=1e-4, atol=1e-7)


def test_head_init_follows_the_run_seed_unless_pinned():
    model = _net()
    a = MIMTerm(MIMConfig(), model, 10, seed=1)
    b = MIMTerm(MIMConfig(), model, 10, seed=2)
    c = MIMTerm(MIMConfig(seed=5), model, 10, seed=1)
    d = MIMTerm(MIMConfig(seed=5), model, 10, seed=2)
    flat = [torch.cat([p.detach().flatten() for p in t.parameters()]) for t in (a, b, c, d)]
    assert not torch.equal(flat[0], flat[1]) and torch.equal(flat[2], flat[3])

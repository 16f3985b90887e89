"""The public Python API: ``from mim4dd_fast import load_dataset, distill, evaluate, MIMTerm``.

``distill`` must give exactly what ``mim4dd-fast distill`` gives with the same settings, and ``MIMTerm``
must work as a plug-in in someone else's loop, with a model that is not our ConvNet; its gradient is
checked against the term written out by hand with the reference contrastive loss.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from mim4dd_fast.kernels.reference import contrastive_loss_reference
from torch import nn

from mim4dd_fast import MIMConfig, MIMTerm, distill, evaluate, load_dataset
from mim4dd_fast.cli import main as cli_main
from mim4dd_fast.errors import ConfigError
from mim4dd_fast.io import load_tensors
from mim4dd_fast.stats import evaluation_seed

pytestmark = pytest.mark.usefixtures("one_thread")

DM_SMALL = {"method_config": {"batch_real": 8, "width": 8}, "eval": {"epochs": 2}}


def test_distill_in_memory_equals_the_cli_run(tmp_path):
    result = distill("dm", "digits", ipc=1, iterations=3, seed=4, settings=DM_SMALL, progress=False)
    out = tmp_path / "run"
    assert cli_main(["distill", "--method", "dm", "--iterations", "3", "--seed", "4", "--evals", "1",
                     "--set", "method.batch_real=8", "--set", "method.width=8", "--set", "eval.epochs=2",
                     "--out", str(out)]) == 0
    saved = load_tensors(out / "synthetic.safetensors")
    assert torch.equal(result.images, saved["images"]) and torch.equal(result.labels, saved["labels"])
    assert result.lr is None and len(result.history) == 3 and result.settings.method_config.batch_real == 8
    # the same protocol as the run's evaluation, through the API (nets seeded as the CLI's: evaluation_seed)
    accuracy = evaluate(result.images, result.labels, result.run.dataset, n_nets=1, epochs=2,
                        seed=evaluation_seed(4, 0))
    assert accuracy == result.evaluate(n_nets=1) == result.run.evaluate(n_nets=1)
    assert json.loads((out / "eval.json").read_text())["accuracies"] == accuracy["accuracies"]


def test_distill_writes_a_resumable_run_directory(tmp_path):
    out = tmp_path / "run"
    first = distill("dm", "digits", iterations=2, settings=DM_SMALL, out=out, progress=False)
    assert (out / "manifest.json").exists() and len(first.history) == 2
    more = distill("dm", "digits", iterations=4, settings=DM_SMALL, out=out, progress=False, resume=True)
    assert [h["iteration"] for h in more.history] == [1, 2, 3, 4]


def test_distill_refuses_bad_settings():
    with pytest.raises(ConfigError, match="Unknown dm setting key 'batch'"):
        distill("dm", "digits", iterations=1, settings={"method_config": {"batch": 8}}, progress=False)
    with pytest.raises(ConfigError, match="has no MIM term"):
        distill("dm", "digits", iterations=1, overrides=["mim.tau=0.2"], progress=False)


# -- MIMTerm as a plug-in -------------------------------------------------------------------------


def lenet(channels: int = 1, classes: int = 10) -> nn.Sequential:
    """Not our ConvNet: a LeNet-style stack with max pooling and a linear head (no tap_names, no layer_shapes)."""
    return nn.Sequential(nn.Conv2d(channels, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 12, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(12 * 4 * 4, classes))


def _by_hand(model, term_before: MIMTerm, x_syn, y_syn, x_real, y_real, layers, cfg: MIMConfig):
    """lambda * sum_k beta_k InfoNCE_k, written out: hooks keep each layer's output, adaptive average
    pooling to 2x2 (conv maps) or the vector itself, the term's heads as they were before the call."""
    kept = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: kept.__setitem__(n, o)) for n in layers]
    model(x_syn)
    f_syn = dict(kept)
    with torch.no_grad():
        model(x_real)
    f_real = dict(kept)
    for h in handles:
        h.remove()

    def pooled(f):
        return nn.functional.adaptive_avg_pool2d(f, cfg.pool).flatten(1) if f.dim() == 4 else f

    total = 0.0
    for k, name in enumerate(layers):
        head = term_before.heads[k]
        z_syn, z_real = head(pooled(f_syn[name])), head(pooled(f_real[name]))
        total = total + term_before.beta[k] * contrastive_loss_reference(z_syn, z_real, y_syn, y_real, tau=cfg.tau)
    return cfg.lam * total


def test_mim_term_plugs_into_someone_elses_loop():
    torch.manual_seed(0)
    model = lenet().requires_grad_(False)
    layers = ["2", "5"]  # the first conv block's max pool (a map) and the flattened features (a vector)
    cfg = MIMConfig(lam=0.7, tau=0.2, layers=layers, n_real=6, head_width=16, lr_head=0.05)
    term = MIMTerm(cfg, model, num_classes=10)
    x_syn = torch.randn(20, 1, 8, 8, requires_grad=True)
    y_syn = torch.arange(10).repeat_interleave(2)
    x_real, y_real = torch.randn(60, 1, 8, 8), torch.arange(10).repeat_interleave(6)

    loss, logs = term(model, x_syn, y_syn, x_real, y_real)  # first call builds the heads from the feature widths
    assert [h.in_features for h in term.heads] == [6 * 2 * 2, 12 * 4 * 4]
    before = copy.deepcopy(term)
    params_before = [p.detach().clone() for p in term.parameters()]
    x_syn.grad = None
    loss, logs = term(model, x_syn, y_syn, x_real, y_real)
    head_grads = [p.grad.clone() for p in term.parameters()]
    loss.backward()
    expected = _by_hand(model, before, x_syn, y_syn, x_real, y_real, layers, cfg)
    value = float(loss.detach())
    assert value == pytest.approx(float(expected.detach()), rel=1e-5) and logs["mim_loss"] == pytest.approx(value)
    (want,) = torch.autograd.grad(expected, x_syn)
    torch.testing.assert_close(x_syn.grad, want, rtol=1e-4, atol=1e-6)
    # the heads took their own step inside the call; the caller's backward never reached them
    assert all(not torch.equal(a, b) for a, b in zip(params_before, term.parameters(), strict=True))
    assert all(torch.equal(g, p.grad) for g, p in zip(head_grads, term.parameters(), strict=True))


def test_mim_term_in_a_training_loop_raises_the_bound():
    """Their synthetic tensor, their optimizer: optimising only the term raises the logged InfoNCE estimate."""
    torch.manual_seed(1)
    model = lenet().requires_grad_(False)
    term = MIMTerm(MIMConfig(lam=1.0, layers=["2", "5"], n_real=6, head_width=16, lr_head=0.01), model, 10)
    x_syn = torch.randn(10, 1, 8, 8, requires_grad=True)
    y_syn = torch.arange(10)
    gen = torch.Generator().manual_seed(2)
    centres = torch.randn(10, 1, 8, 8, generator=gen)
    opt = torch.optim.Adam([x_syn], lr=0.05)
    bounds = []
    for _ in range(40):
        y_real = torch.arange(10).repeat_interleave(6)
        x_real = centres[y_real] + 0.3 * torch.randn(60, 1, 8, 8, generator=gen)
        loss, logs = term(model, x_syn, y_syn, x_real, y_real)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bounds.append(sum(v for k, v in logs.items() if k.startswith("mi_est/")) / 2)
    assert sum(bounds[-5:]) / 5 > sum(bounds[:5]) / 5 + 0.2


def test_mim_term_state_round_trips_for_a_generic_model():
    model = lenet().requires_grad_(False)
    cfg = MIMConfig(layers=["2", "5"], n_real=2, head_width=4)
    a = MIMTerm(cfg, model, 10)
    x, y = torch.randn(10, 1, 8, 8, requires_grad=True), torch.arange(10)
    xr, yr = torch.randn(20, 1, 8, 8), torch.arange(10).repeat_interleave(2)
    a(model, x, y, xr, yr)
    b = MIMTerm(cfg, model, 10)
    b.load_state_dict(a.state_dict())  # heads not built yet in b: their widths come with the state
    la, _ = a(model, x, y, xr, yr)
    lb, _ = b(model, x, y, xr, yr)
    assert float(la) == float(lb)


def test_load_dataset_is_the_library_loader():
    data = load_dataset("digits")
    assert data.num_classes == 10 and data.channels == 1

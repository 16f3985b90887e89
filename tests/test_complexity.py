"""The analytic cost model against hand arithmetic and against FlopCounterMode / saved bytes."""

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mim4dd_fast.models import ConvNet
from mim4dd_fast.profiling import SavedTensorBytes, measure_flops

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
_spec = importlib.util.spec_from_file_location("bench_complexity", BENCH / "complexity.py")
cx = importlib.util.module_from_spec(_spec)
sys.modules["bench_complexity"] = cx  # dataclasses look their module up here
_spec.loader.exec_module(cx)

TINY = cx.CostSetting(channels=3, image_size=8, width=8, depth=2, classes=10, batch_real=6, n_real=4,
                      head_width=8, syn_steps=3)


def test_convnet_flops_formula_is_the_hand_arithmetic():
    s = cx.CostSetting(channels=3, image_size=32, width=128, depth=3, classes=10)
    # conv1 2*3*128*9*32*32, conv2 2*128*128*9*16*16, conv3 2*128*128*9*8*8, linear 2*(128*4*4)*10
    hand = 7_077_888 + 75_497_472 + 18_874_368 + 40_960
    assert 2 * 3 * 128 * 9 * 32 * 32 == 7_077_888 and 2 * 128 * 128 * 9 * 8 * 8 == 18_874_368
    assert cx.convnet_forward_flops(s) == hand
    assert cx.convnet_forward_flops(s, embed_only=True) == hand - 40_960


@pytest.mark.parametrize("size, depth", [(8, 2), (16, 3), (28, 3)])
def test_convnet_flops_formula_matches_flop_counter(size, depth):
    s = cx.CostSetting(channels=1, image_size=size, width=4, depth=depth, classes=7)
    net = ConvNet(1, 7, size, width=4, depth=depth)
    _, measured = measure_flops(lambda: net(torch.randn(3, 1, size, size)))
    assert measured.total == 3 * cx.convnet_forward_flops(s)
    assert cx.num_params(s) == sum(p.numel() for p in net.parameters())


def _pass_flops(kind):
    """FLOPs per image of one pass on a tiny ConvNet, run with plain autograd."""
    torch.manual_seed(0)
    net = ConvNet(3, 10, 8, width=8, depth=2)
    params = list(net.parameters())
    x = torch.randn(2, 3, 8, 8)
    y = torch.tensor([0, 1])

    def run():
        if kind == "train":
            F.cross_entropy(net(x), y).backward()
        elif kind == "to_input":
            net.requires_grad_(False)
            net.embed(x.clone().requires_grad_(True)).sum().backward()
        elif kind == "double":
            xs = x.clone().requires_grad_(True)
            gw = torch.autograd.grad(F.cross_entropy(net(xs), y), params, create_graph=True)
            sum((g**2).sum() for g in gw).backward(inputs=[xs])

    _, report = measure_flops(run)
    return report.total // 2


@pytest.mark.parametrize("kind", ["train", "to_input", "double"])
def test_pass_units_match_flop_counter(kind):
    assert _pass_flops(kind) == cx.units(TINY, cx.UNITS[kind])


def test_step_sizes_follow_the_shuffled_chunks():
    s = dataclasses.replace(TINY, ipc=1, batch_syn=4, syn_steps=5)  # 10 images: chunks 4, 4, 2
    assert cx.step_sizes(s) == [4, 4, 2, 4, 4]
    assert cx.step_sizes(dataclasses.replace(s, batch_syn=None)) == [10] * 5


@pytest.mark.parametrize("setting", [
    dataclasses.replace(TINY, method="mtt"),
    dataclasses.replace(TINY, method="mtt", unroll="full", batch_syn=4),
    dataclasses.replace(TINY, method="mtt+mim", ipc=2),
    dataclasses.replace(TINY, method="dm", ipc=2),
    dataclasses.replace(TINY, method="dc", outer_loop=2, inner_loop=1),
    dataclasses.replace(TINY, method="dm+mim", tapped=(1,)),
], ids=cx.describe)
def test_cost_model_matches_measured_flops_and_memory(setting):
    torch.manual_seed(0)
    model, measured = cx.cost_model(setting), cx.measure(setting)
    assert model["flops"] == pytest.approx(measured["flops"], rel=0.10)
    assert model["saved_bytes"] == pytest.approx(measured["saved_bytes"], rel=0.25)


def test_checkpointed_memory_is_flat_in_syn_steps_and_full_is_linear():
    short, long = dataclasses.replace(TINY, syn_steps=10), dataclasses.replace(TINY, syn_steps=40)
    assert cx.cost_model(long)["saved_bytes"] == cx.cost_model(short)["saved_bytes"]
    full_s = cx.cost_model(dataclasses.replace(short, unroll="full"))["saved_bytes"]
    full_l = cx.cost_model(dataclasses.replace(long, unroll="full"))["saved_bytes"]
    assert full_l / full_s == pytest.approx(4, rel=0.05)
    # and checkpointing trades memory for 12/9 of the FLOPs of the full unroll (asymptotically)
    ratio = cx.cost_model(long)["flops"] / cx.cost_model(dataclasses.replace(long, unroll="full"))["flops"]
    assert 1.3 < ratio < 1.4


def test_saved_bytes_of_a_frozen_forward_match_activation_floats():
    s = dataclasses.replace(TINY, dsa=False)
    net = ConvNet(3, 10, 8, width=8, depth=2).requires_grad_(False)
    x = torch.randn(5, 3, 8, 8, requires_grad=True)
    with SavedTensorBytes() as saved:
        net.embed(x)
    # convolutions keep their weight (and input), GroupNorm its weight: parameters, counted once
    weights = sum(m.weight.numel() for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.GroupNorm)))
    assert saved.total == 4 * (5 * cx.activation_floats(s, "frozen") + weights)

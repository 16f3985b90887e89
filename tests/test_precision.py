"""Opt-in bf16 (mim4dd_fast.precision): off by default, float32 masters, bfloat16 where it says, close to fp32."""

import pytest
import torch
import torch.nn.functional as F

from mim4dd_fast.errors import ConfigError
from mim4dd_fast.methods import mtt as mtt_mod
from mim4dd_fast.methods.dc import DC, DCConfig, mean_ce_grad
from mim4dd_fast.methods.dm import DM, DMConfig
from mim4dd_fast.methods.mtt import MTTConfig
from mim4dd_fast.models import build_model, embed_no_grad, flatten_params
from mim4dd_fast.precision import PRECISIONS, autocast

pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


# bfloat16 keeps 8 significant bits: through three conv + norm layers, backward included, a gradient
# differs from float32 by a few percent (measured 0.4-13% per tensor on random nets); a wrong scale or a
# lost term would be off by 50% or more.
BF16_GRAD = 0.2


def test_every_method_defaults_to_fp32_and_refuses_unknown_precisions():
    assert PRECISIONS == ("fp32", "bf16")
    for cls, name in ((DCConfig, "DC"), (DMConfig, "DM"), (MTTConfig, "MTT")):
        assert cls().precision == "fp32"
        with pytest.raises(ConfigError, match=f"{name} precision must be one of fp32, bf16, got 'fp16'"):
            cls(precision="fp16")


def test_fp32_autocast_is_a_no_op_and_bf16_runs_the_convolutions_in_bfloat16():
    torch.manual_seed(0)
    net = build_model(3, 4, 32, width=8)
    x = torch.randn(3, 3, 32, 32)
    with autocast("fp32", "cpu"):
        assert torch.equal(embed_no_grad(net, x), embed_no_grad(net, x))
        assert net(x).dtype == torch.float32
    with autocast("bf16", "cpu"):
        low = embed_no_grad(net, x)
    assert low.dtype == torch.bfloat16
    assert 1e-5 < _rel(low.float(), embed_no_grad(net, x)) < 3e-2


def test_bf16_real_gradient_is_float32_and_close_to_fp32():
    torch.manual_seed(1)
    net = build_model(3, 4, 16, width=8)
    params = list(net.parameters())
    x, y = torch.randn(20, 3, 16, 16), torch.randint(0, 4, (20,))
    fp32 = mean_ce_grad(net, params, x, y)
    bf16 = mean_ce_grad(net, params, x, y, "bf16")
    weights = [i for i, p in enumerate(params) if p.dim() > 1]  # conv biases before a norm have ~0 gradient
    for i in weights:
        assert bf16[i].dtype == torch.float32
        assert 1e-5 < _rel(bf16[i], fp32[i]) < BF16_GRAD


def test_bf16_student_step_keeps_float32_theta_and_images_and_stays_close():
    torch.manual_seed(2)
    net = build_model(3, 4, 16, width=8)
    theta = flatten_params(net).requires_grad_(True)
    images = torch.randn(6, 3, 16, 16, requires_grad=True)
    labels = torch.arange(6) % 4
    batch = (torch.arange(6), 7)
    fp32 = mtt_mod._step_grad(net, theta, images, labels, batch, create_graph=True)
    bf16 = mtt_mod._step_grad(net, theta, images, labels, batch, create_graph=True, precision="bf16")
    assert bf16.dtype == torch.float32 and 1e-5 < _rel(bf16, fp32) < BF16_GRAD
    (g_img,) = torch.autograd.grad(bf16.square().sum(), images)  # the second-order pass runs too
    (ref,) = torch.autograd.grad(fp32.square().sum(), images)
    assert g_img.dtype == torch.float32 and 1e-5 < _rel(g_img, ref) < BF16_GRAD


@pytest.mark.parametrize("cls, cfg", [(DM, DMConfig), (DC, DCConfig)])
def test_bf16_methods_step_with_float32_images(digits, cls, cfg):
    method = cls(digits, 1, cfg(width=8, batch_real=8, precision="bf16"), seed=0)
    out = method.step()
    assert method.images.dtype == torch.float32 and torch.isfinite(method.images).all()
    assert torch.isfinite(torch.tensor(out["loss"]))


def test_bf16_cross_entropy_is_float32_under_autocast():
    # The chunked losses rely on it: autocast keeps cross-entropy (a reduction) in float32.
    with autocast("bf16", "cpu"):
        logits = F.linear(torch.randn(4, 5), torch.randn(3, 5))
        assert logits.dtype == torch.bfloat16
        assert F.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).dtype == torch.float32

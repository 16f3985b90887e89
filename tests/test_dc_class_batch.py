"""DC's synthetic side of all classes in one vmapped pass (``class_batch``) against the per-class loop:
the same matching loss and the same image gradient, in float64, with and without DSA."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mim4dd_fast.errors import ConfigError
from mim4dd_fast.methods.dc import DC, DCConfig, class_grads
from mim4dd_fast.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits64(digits):
    """The digits set in float64, so the two paths can be compared to rounding."""
    return dataclasses.replace(digits, x_train=digits.x_train.double(), x_test=digits.x_test.double(), _index=None)


def _match(dataset, ipc, class_batch, dsa, metric):
    dc = DC(dataset, ipc, DCConfig(width=8, batch_real=12, outer_loop=1, inner_loop=0, dsa=dsa, dis_metric=metric,
                                   class_batch=class_batch), seed=5)
    dc.images = dc.images.detach().double().requires_grad_(True)
    torch.manual_seed(11)
    net = build_model(dataset.channels, dataset.num_classes, dataset.image_size, width=8).double()
    loss = dc.match(net, list(net.parameters()))
    return loss, dc.images.grad


@pytest.mark.parametrize("ipc, dsa, metric", [(1, True, "ours"), (3, False, "ours"), (2, True, "mse")])
def test_class_batch_gives_the_per_class_loss_and_image_gradient(digits64, ipc, dsa, metric):
    loop_loss, loop_grad = _match(digits64, ipc, False, dsa, metric)
    batch_loss, batch_grad = _match(digits64, ipc, True, dsa, metric)
    assert batch_loss == pytest.approx(loop_loss, rel=1e-12)
    assert float(loop_grad.abs().sum()) > 0
    torch.testing.assert_close(batch_grad, loop_grad, rtol=1e-9, atol=1e-12)


def test_class_grads_are_each_class_s_own_gradient():
    torch.manual_seed(0)
    net = build_model(3, 4, 8, width=6).double()
    x, y = torch.randn(4, 2, 3, 8, 8, dtype=torch.float64), torch.arange(4).repeat_interleave(2).view(4, 2)
    stacked = class_grads(net, x, y)
    for c in range(4):
        want = torch.autograd.grad(F.cross_entropy(net(x[c]), y[c]), list(net.parameters()))
        for got, exp in zip(stacked, want, strict=True):
            torch.testing.assert_close(got[c], exp, rtol=1e-10, atol=1e-13)


def test_class_batch_must_be_a_bool():
    with pytest.raises(ConfigError, match="class_batch must be true or false"):
        DCConfig(class_batch="yes").validate()

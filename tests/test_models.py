"""The architectures (ConvNet, MLP, LeNet, ResNet-18 BN) and StackedNets: n nets as one grouped net."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mim4dd_fast.errors import ConfigError
from mim4dd_fast.models import (
    MODELS,
    ConvNet,
    GroupedLinear,
    NotStackable,
    StackedNets,
    build_model,
    flatten_params,
)

SHAPES = [(1, 8), (1, 28), (3, 32)]  # digits, MNIST, CIFAR


def _nets(kind: str, channels: int, size: int, n: int, **kw) -> list[nn.Module]:
    nets = []
    for seed in range(n):
        torch.manual_seed(seed)
        nets.append(build_model(channels, 10, size, kind=kind, **kw))
    return nets


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("channels,size", SHAPES)
def test_every_model_classifies_every_shape(kind, channels, size):
    net = _nets(kind, channels, size, 1)[0]
    assert net(torch.randn(3, channels, size, size)).shape == (3, 10)


def test_architectures_match_the_originals():
    # LeNet reaches the originals' 16 x 5 x 5 features at 28x28 (1 channel, padded) and 32x32 (3 channels)
    assert build_model(1, 10, 28, kind="lenet").fc_1.in_features == 16 * 5 * 5
    assert build_model(3, 10, 32, kind="lenet").fc_1.in_features == 16 * 5 * 5
    assert build_model(1, 10, 8, kind="lenet").fc_1.in_features == 16 * 2 * 2  # 8 -> 4 -> 2, 'same' padding
    mlp = build_model(3, 10, 32, kind="mlp")
    assert [(m.in_features, m.out_features) for m in (mlp.fc_1, mlp.fc_2, mlp.fc_3)] == [(3072, 128), (128, 128),
                                                                                     (128, 10)]
    # the CIFAR ResNet-18 (kuangliu / DC's ResNet18BN): 11,173,962 parameters for 3 channels and 10 classes
    resnet = build_model(3, 10, 32, kind="resnet18")
    assert sum(p.numel() for p in resnet.parameters()) == 11_173_962
    assert sum(isinstance(m, nn.BatchNorm2d) for m in resnet.modules()) == 1 + 8 * 2 + 3  # stem, blocks, shortcuts
    # ConvNet stays the default and unchanged
    torch.manual_seed(0)
    a = build_model(1, 10, 8)
    torch.manual_seed(0)
    b = ConvNet(1, 10, 8)
    assert isinstance(a, ConvNet) and torch.equal(flatten_params(a), flatten_params(b))


def test_bad_model_choices_are_config_errors():
    with pytest.raises(ConfigError, match="Unknown model"):
        build_model(1, 10, 8, kind="vgg")
    with pytest.raises(ConfigError, match="ConvNet settings"):
        build_model(1, 10, 8, depth=2, kind="mlp")
    with pytest.raises(ConfigError, match="larger inputs"):
        build_model(1, 10, 2, kind="lenet")


@pytest.mark.parametrize("kind", MODELS)
def test_stack_forward_and_gradients_are_each_nets_own(kind):
    """Train mode (BatchNorm uses batch statistics): logits, per-net gradients and running stats as one by one."""
    channels, size, n = (1, 8, 3)
    nets = _nets(kind, channels, size, n)
    reference = copy.deepcopy(nets)
    stack = StackedNets(nets).train()
    x = torch.randn(n, 6, channels, size, size, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (n, 6), generator=torch.Generator().manual_seed(2))
    logits = stack(x)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(n, -1).mean(1).sum()
    loss.backward()
    for i, net in enumerate(reference):
        net.train()
        out = net(x[i])
        torch.testing.assert_close(logits[i], out, rtol=1e-4, atol=1e-5)  # BatchNorm over 6 values: ~1e-6
        F.cross_entropy(out, y[i]).backward()
        grads = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
        stacked = torch.cat([p.grad.reshape(n, -1)[i] for p in stack.body.parameters()])
        torch.testing.assert_close(stacked, grads, rtol=1e-4, atol=1e-5)
        for (name, mine), theirs in zip(stack.net(i).named_buffers(), net.buffers(), strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=name)


def test_flat_params_and_unstacked_nets_are_exact():
    nets = _nets("convnet", 1, 8, 4, width=8)
    stack = StackedNets(nets)
    flat = stack.flat_params()
    assert flat.shape == (4, flatten_params(nets[0]).numel())
    for i, net in enumerate(nets):
        assert torch.equal(flat[i], flatten_params(net))
        back = stack.net(i)
        assert type(back) is ConvNet and back.training == stack.training
        for a, b in zip(back.state_dict().values(), net.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    x = torch.randn(5, 1, 8, 8)
    shared = stack.eval().forward_shared(x)
    for i, net in enumerate(nets):
        torch.testing.assert_close(shared[i], net.eval()(x), rtol=1e-5, atol=1e-6)


def test_grouped_linear_is_n_linears():
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, generator=g), torch.randn(7, 15, generator=g)
    out = GroupedLinear(w, b)(x)
    expected = torch.cat([F.linear(x[:, 5 * i : 5 * i + 5], w[i], b[i]) for i in range(3)], 1)
    torch.testing.assert_close(out, expected)


class _MixesChannels(nn.Module):
    """Parameter-free channel mixing in forward: the grouped layout would blend the nets."""

    def __init__(self) -> None:
        super().__init__()
        self.channels, self.image_size = 1, 8
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 64, 10)

    def forward(self, x):
        h = self.conv(x)
        return self.fc((h - h.mean(1, keepdim=True)).flatten(1))


class _LayerNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.channels, self.image_size = 1, 8
        self.norm = nn.LayerNorm(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(self.norm(x.flatten(1)))


def test_unstackable_nets_are_refused_not_mixed():
    with pytest.raises(NotStackable, match="mixes channels"):
        StackedNets([_MixesChannels(), _MixesChannels()])
    with pytest.raises(NotStackable, match="LayerNorm"):
        StackedNets([_LayerNormNet(), _LayerNormNet()])
    with pytest.raises(NotStackable, match="one architecture"):
        StackedNets([build_model(1, 10, 8, width=8), build_model(1, 10, 8, kind="mlp")])
    with pytest.raises(NotStackable, match="one architecture"):
        StackedNets([build_model(1, 10, 8, width=8), build_model(1, 10, 8, width=16)])

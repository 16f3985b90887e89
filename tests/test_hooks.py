"""FeatureTap: keeps only pooled features, removes its hooks, works under functional_call."""

import copy

import pytest
import torch
import torch.nn.functional as F

from mim4dd_fast.errors import ConfigError
from mim4dd_fast.hooks import FeatureTap
from mim4dd_fast.models import ConvNet, flatten_params, functional_forward, load_flat_params


def _net(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet(channels=1, num_classes=10, image_size=8, width=6)


def _expected(model: ConvNet, x: torch.Tensor, p: int) -> dict[str, torch.Tensor]:
    """Block outputs computed by hand, pooled with the textbook adaptive average pooling."""
    out, h = {}, x
    for k, block in enumerate(model.blocks):
        h = block(h)
        out[f"blocks.{k}"] = F.adaptive_avg_pool2d(h, p).flatten(1)
    return out


def _tensors_in(obj, seen=None):
    """Every tensor reachable from ``obj`` through attributes, dicts, lists and tuples."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, torch.nn.Module):
        return []  # the model itself is not the tap's storage
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors_in(v, seen)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors_in(v, seen)]
    if hasattr(obj, "__dict__"):
        return _tensors_in(vars(obj), seen)
    return []


def _no_hooks(model: torch.nn.Module) -> bool:
    return all(len(m._forward_hooks) == 0 for m in model.modules())


@pytest.mark.parametrize("p", [1, 2, 3])
def test_features_are_pooled_block_outputs_and_nothing_full_size_is_stored(p):
    model, x = _net(), torch.randn(5, 1, 8, 8)
    with FeatureTap(model, p=p) as tap:
        model(x)
        feats = tap.features
        stored = _tensors_in(tap)
    expected = _expected(model, x, p)
    assert list(feats) == ["blocks.0", "blocks.1"]
    for name, value in feats.items():
        assert value.shape == (5, 6 * p * p)
        torch.testing.assert_close(value, expected[name])
    assert stored and all(t.dim() == 2 for t in stored), [tuple(t.shape) for t in stored]


def test_tap_adds_no_saved_tensor_to_the_graph():
    """Autograd saves exactly the same tensors for backward with the tap as without it."""
    model, x = _net(), torch.randn(4, 1, 8, 8, requires_grad=True)

    def saved_shapes(use_tap: bool) -> list[tuple[int, ...]]:
        shapes: list[tuple[int, ...]] = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if use_tap:
                with FeatureTap(model) as tap:
                    model(x)
                    sum(f.sum() for f in tap.features.values()).backward()
            else:
                model(x)
        return sorted(shapes)

    assert saved_shapes(True) == saved_shapes(False)


def test_features_carry_gradients_and_real_side_keeps_no_graph():
    model, x = _net(), torch.randn(3, 1, 8, 8, requires_grad=True)
    with FeatureTap(model) as tap:
        model(x)
        tap.features["blocks.1"].sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        tap.clear()
        with torch.no_grad():
            model(x)
        assert all(f.grad_fn is None and not f.requires_grad for f in tap.features.values())


def test_hooks_removed_on_exit_and_on_exception():
    model = _net()
    with FeatureTap(model, layers=["blocks.1"]):
        assert len(model.blocks[1]._forward_hooks) == 1
    assert _no_hooks(model)
    with pytest.raises(ValueError):
        with FeatureTap(model):
            raise ValueError("boom")
    assert _no_hooks(model)
    model(torch.randn(1, 1, 8, 8))  # no stale hook fires


def test_works_under_functional_call():
    """Features follow the parameters passed to functional_call, not the module's own."""
    model, x = _net(0), torch.randn(4, 1, 8, 8)
    other = flatten_params(_net(1)).requires_grad_(True)
    with FeatureTap(model) as tap:
        functional_forward(model, other, x)
        feats = tap.features
    reference = copy.deepcopy(model)
    load_flat_params(reference, other.detach())
    for name, value in _expected(reference, x, 2).items():
        torch.testing.assert_close(feats[name], value)
    feats["blocks.0"].sum().backward()
    assert other.grad is not None and other.grad.abs().sum() > 0


def test_store_dtype_clear_and_errors():
    model = _net()
    with FeatureTap(model, out_dtype=torch.bfloat16) as tap:
        model(torch.randn(2, 1, 8, 8))
        assert all(f.dtype == torch.bfloat16 for f in tap.features.values())
        tap.clear()
        with pytest.raises(RuntimeError, match="no forward pass"):
            _ = tap.features
    with pytest.raises(ConfigError, match="blocks.0, blocks.1"):
        FeatureTap(model, layers=["blocks.7"])
    with pytest.raises(ConfigError):
        FeatureTap(model, layers=[])
    with pytest.raises(ConfigError):
        FeatureTap(model, p=0)


def test_naive_mode_same_features_but_saves_the_full_maps():
    """The 'naive' tap (full maps kept, pooled in plain PyTorch) is the baseline the fused tap beats."""
    torch.manual_seed(0)
    model = ConvNet(3, 10, 16, width=8)
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    shapes = model.layer_shapes()

    def run(mode):
        saved = []

        def pack(t):
            saved.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with FeatureTap(model, p=2, mode=mode) as tap:
                model(x)
                feats = tap.features
            loss = sum(f.square().sum() for f in feats.values())
        return feats, saved, loss

    fused, saved_fused, loss_fused = run("fused")
    naive, saved_naive, loss_naive = run("naive")
    for name in fused:
        assert torch.allclose(fused[name], naive[name], atol=1e-6)
    full = {(4, *shape) for shape in shapes.values()}
    # pooling in plain PyTorch keeps a reference to the full map for its backward: more saved maps
    assert sum(s in full for s in saved_naive) > sum(s in full for s in saved_fused)
    with pytest.raises(ConfigError, match="tap mode"):
        FeatureTap(model, mode="lazy")


def test_pooling_rule_feature_reduce_only_where_a_gradient_flows(monkeypatch):
    """POOL="auto": the real side (no_grad) pools with the plain op, the synthetic side with feature_reduce;
    both give the same features."""
    from mim4dd_fast import hooks

    calls = []
    real_op = hooks.feature_reduce
    monkeypatch.setattr(hooks, "feature_reduce", lambda *a, **k: calls.append(1) or real_op(*a, **k))
    monkeypatch.setattr(hooks, "POOL", "auto")
    model, x = _net(), torch.randn(3, 1, 8, 8, requires_grad=True)
    with FeatureTap(model) as tap:
        with torch.no_grad():
            model(x)
        real = tap.features
        assert calls == []
        tap.clear()
        model(x)
        syn = tap.features
        assert len(calls) == 2
    for name in syn:
        torch.testing.assert_close(syn[name], real[name])


def test_plain_pooling_pins_only_the_deepest_map_of_a_frozen_net(monkeypatch):
    """With the network frozen (as in the MIM term) and images needing a gradient, each conv keeps its
    input map anyway; only the last block's map, which nothing else keeps, is extra for plain pooling."""
    from mim4dd_fast import hooks
    from mim4dd_fast.profiling import SavedTensorBytes

    torch.manual_seed(0)
    model = ConvNet(3, 10, 16, width=8)
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 3, 16, 16, requires_grad=True)

    def saved(pool):
        monkeypatch.setattr(hooks, "POOL", pool)
        with SavedTensorBytes() as s, FeatureTap(model, p=2) as tap:
            model(x)
            feats = tap.features
        return s.peak, feats

    plain, f_plain = saved("plain")
    fused, f_fused = saved("feature_reduce")
    c, h, w = model.layer_shapes()[model.tap_names[-1]]
    assert plain - fused == 4 * c * h * w * 4  # the deepest block output, float32
    for name in f_plain:
        torch.testing.assert_close(f_plain[name], f_fused[name])

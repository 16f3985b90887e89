"""The method registry: names, the mim4dd alias, config classes, building with and without the MIM term."""

import pytest
import torch

from mim4dd_fast.errors import ConfigError
from mim4dd_fast.methods import build_method, canonical_name, config_class, method_names
from mim4dd_fast.methods.dc import DC, DCConfig
from mim4dd_fast.methods.dm import DM, DMConfig

pytestmark = pytest.mark.usefixtures("one_thread")



def test_names_and_aliases():
    assert method_names() == ["dc", "dm", "mtt", "dc+mim", "dm+mim", "mtt+mim", "mim4dd"]
    assert canonical_name("MIM4DD") == "mtt+mim"
    assert canonical_name(" DC+MIM ") == "dc+mim"
    assert [canonical_name(n) for n in ("dc", "dm", "mtt")] == ["dc", "dm", "mtt"]


@pytest.mark.parametrize("name", ["dsa", "mim", "dc+", "mim+dc", "dc+mim+mim", ""])
def test_unknown_name_lists_the_valid_ones(name):
    with pytest.raises(ConfigError) as err:
        canonical_name(name)
    assert all(n in str(err.value) for n in method_names())


def test_config_classes():
    assert config_class("dc") is DCConfig and config_class("dc+mim") is DCConfig
    assert config_class("dm+mim") is DMConfig
    assert config_class("mim4dd").__name__ == "MTTConfig" and config_class("mtt") is config_class("mtt+mim")


def test_build_plain_methods(digits):
    dc = build_method("dc", digits, 2, config={"width": 8, "outer_loop": 3}, seed=1, init="noise")
    assert isinstance(dc, DC) and dc.name == "dc" and dc.term is None
    assert (dc.config.width, dc.outer_loop, dc.inner_loop) == (8, 3, 1)
    assert dc.images.shape == (20, 1, 8, 8) and dc.seed == 1
    dm = build_method("DM", digits, 1, config={"lr_img": 0.5})
    assert isinstance(dm, DM) and dm.optimizer.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("name", ["mtt", "mim4dd", "mtt+mim"])
def test_mtt_without_experts_is_a_config_error(digits, name):
    with pytest.raises(ConfigError, match="expert"):
        build_method(name, digits, 1)
    with pytest.raises(ConfigError, match="expert"):
        build_method(name, digits, 1, experts=[])


def test_bad_settings_are_config_errors(digits):
    with pytest.raises(ConfigError, match="dis_metric"):
        build_method("dc", digits, 1, config={"dis_metric": "l1"})
    with pytest.raises(ConfigError, match="Unknown"):
        build_method("dm", digits, 1, config={"outer_loop": 2})
    with pytest.raises(ConfigError, match="no MIM term"):
        build_method("dm", digits, 1, mim={"lam": 1.0})


@pytest.mark.parametrize("name", ["dc+mim", "dm+mim"])
def test_mim_variants_carry_the_term_and_log_it(digits, name):
    from mim4dd_fast.methods.mim import MIMTerm

    cfg = {"width": 8, "batch_real": 16} | ({"outer_loop": 1, "inner_loop": 1} if name == "dc+mim" else {})
    method = build_method(name, digits, 1, config=cfg, mim={"n_real": 4}, seed=0)
    assert isinstance(method.term, MIMTerm) and method.term.n_real == 4
    # The term's template is the base's width-8 ConvNet-2: one linear head per block, 8 * 2 * 2 inputs.
    assert method.term.layers == ["blocks.0", "blocks.1"]
    assert [h.in_features for h in method.term.heads] == [8 * 2 * 2, 8 * 2 * 2]
    before = method.images.detach().clone()
    logs = method.step()
    assert "mim_loss" in logs and "loss" in logs
    assert not torch.equal(before, method.images.detach())

"""Settings are parsed once into typed objects: defaults < preset < --config < flags < --set, any key settable."""

from __future__ import annotations

import dataclasses

import pytest

from mim4dd_fast.cli import main
from mim4dd_fast.errors import ConfigError
from mim4dd_fast.evaluation import EvalConfig
from mim4dd_fast.methods.dm import DMConfig
from mim4dd_fast.methods.mim import MIMConfig
from mim4dd_fast.methods.mtt import MTTConfig
from mim4dd_fast.settings import build_settings, parse_overrides, read_toml, resolve_settings

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--iterations", "1", "--evals", "1", "--set", "eval.epochs=1", "--set", "method.batch_real=4",
        "--set", "method.width=8"]


def test_settings_are_typed_once():
    s = build_settings({"method": "dm+mim", "method_config": {"lr_img": 2}, "mim": {"tau": 0.3}})
    assert isinstance(s.method_config, DMConfig) and s.method_config.lr_img == 2.0
    assert isinstance(s.mim, MIMConfig) and s.mim.tau == 0.3 and isinstance(s.eval, EvalConfig)
    assert s.choice.name == "dm+mim" and build_settings({"method": "dm"}).mim is None
    with pytest.raises(ConfigError, match="tau must be greater than 0"):  # a settings object that exists is valid
        dataclasses.replace(s.mim, tau=0.0)


def test_preset_file_flags_and_set_items_in_order(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('iterations = 7\n[method_config]\nsyn_steps = 3\nlr_img = 10.0\n')
    name, s = resolve_settings(read_toml(cfg), {"method": "mim4dd", "iterations": 9},
                               parse_overrides(["method.lr_img=50", "mim.tau=0.2"]))
    assert name == "mtt-digits-ipc1" and isinstance(s.method_config, MTTConfig)
    assert s.method_config.width == 32  # from the preset
    assert s.method_config.syn_steps == 3  # the file beats the preset
    assert s.run.iterations == 9  # a flag beats the file
    assert s.method_config.lr_img == 50.0 and s.mim.tau == 0.2  # --set beats everything


def test_a_preset_for_another_method_lends_only_its_run_settings():
    name, s = resolve_settings({"method": "dm"}, preset="mtt-digits-ipc1")
    assert name == "mtt-digits-ipc1" and s.run.iterations == 80 and s.method_config == DMConfig()


def test_cli_set_lam_and_tau_reach_the_run(tmp_path):
    out = tmp_path / "run"
    assert main(["distill", "--method", "dm+mim", *FAST, "--set", "mim.n_real=4", "--set", "mim.head_width=8",
                 "--set", "method.lr_img=2", "--lam", "0.5", "--tau", "0.25", "--set", 'mim.layers=["blocks.1"]',
                 "--out", str(out)]) == 0
    saved = read_toml(out / "config.toml")
    assert saved["method_config"]["lr_img"] == 2.0 and saved["method_config"]["batch_real"] == 4
    assert saved["mim"]["lam"] == 0.5 and saved["mim"]["tau"] == 0.25 and saved["mim"]["layers"] == ["blocks.1"]
    assert saved["eval"]["epochs"] == 1


@pytest.mark.parametrize("items, message", [
    (["--set", "mim.tauu=1"], "Unknown mim setting key 'tauu'"),
    (["--set", "foo.bar=1"], "--set table 'foo' is unknown"),
    (["--set", "mim.tau=-1"], "tau must be greater than 0"),
    (["--set", "mim.tau"], "--set expects TABLE.KEY=VALUE"),
    (["--set", "method.lr_img=fast"], "lr_img"),
    (["--tau", "0"], "tau must be greater than 0"),
    (["--lam", "nan"], "lam"),
])
def test_bad_set_items_are_one_sentence(tmp_path, capsys, items, message):
    out = tmp_path / "run"
    assert main(["distill", "--method", "dm+mim", *FAST, *items, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not out.exists()  # refused before anything was written


def test_term_flags_need_a_term(tmp_path, capsys):
    assert main(["distill", "--method", "dm", *FAST, "--lam", "1", "--out", str(tmp_path / "r")]) == 2
    assert "has no MIM term; use 'dm+mim'" in capsys.readouterr().err


def test_expert_seed_shares_one_buffer_across_distillation_seeds(digits, tmp_path, monkeypatch):
    """Unset, the experts follow the run's seed; set, every distillation seed resolves the same experts."""
    from mim4dd_fast import runner

    asked = []
    monkeypatch.setattr("mim4dd_fast.experts.ensure_experts", lambda *a, **k: asked.append(k["seed"]) or [])
    for seed in (3, 4):
        runner.resolve_experts(build_settings({"method": "mtt", "seed": seed}), digits, tmp_path, "cpu")
        runner.resolve_experts(build_settings({"method": "mtt", "seed": seed, "expert_seed": 0}), digits, tmp_path,
                               "cpu")
    assert asked == [3, 0, 4, 0]
    assert runner.resolve_experts(build_settings({"method": "dm"}), digits, tmp_path, "cpu") is None


def test_small_resnet18_scales_every_stage():
    from mim4dd_fast.models import build_model

    full = build_model(3, 10, 32, kind="resnet18")
    small = build_model(3, 10, 32, kind="resnet18", resnet_width=16)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert full.classifier.in_features == 512 and small.classifier.in_features == 128
    assert 14 < count(full) / count(small) < 17  # conv weights scale with width^2


def test_method_mim_defaults_sit_below_every_layer(tmp_path):
    """mtt+mim's lambda default is the study's choice (3, MethodSpec.mim_defaults); DC/DM keep MIMConfig's 0.1;
    a preset, a --config file and --set all beat it."""
    assert MIMConfig().lam == 0.1
    assert build_settings({"method": "mim4dd"}).mim.lam == 3.0
    assert build_settings({"method": "mtt+mim"}).mim.lam == 3.0
    assert build_settings({"method": "dc+mim"}).mim.lam == 0.1 and build_settings({"method": "dm+mim"}).mim.lam == 0.1
    cfg = tmp_path / "c.toml"
    cfg.write_text("[mim]\nlam = 0.5\n")
    assert resolve_settings(read_toml(cfg), {"method": "mim4dd"}, {})[1].mim.lam == 0.5
    assert resolve_settings({}, {"method": "mim4dd"}, parse_overrides(["mim.lam=0"]))[1].mim.lam == 0.0

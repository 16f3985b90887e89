"""Bad input anywhere in the CLI or a config file: one clear sentence, exit code 2, never a traceback."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mim4dd_fast.cli import main
from mim4dd_fast.config import from_mapping
from mim4dd_fast.errors import ConfigError, DataError
from mim4dd_fast.io import load_torch_weights_only
from mim4dd_fast.settings import build_settings

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _one_sentence_error(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert err.startswith("error:"), err
    assert len(err.splitlines()) <= 3, err  # rich may wrap one sentence over lines
    return err


bad_numbers = st.sampled_from(["-1", "0", "nan", "inf", "-inf", "1e999", "abc", "", "2.5"])


@SETTINGS
@given(flag=st.sampled_from(["--ipc", "--iterations", "--checkpoint-every", "--evals", "--num-experts",
                             "--image-size", "--seed", "--eval-every"]), value=bad_numbers)
def test_bad_numeric_flags(tmp_path, capsys, flag, value):
    if flag in ("--seed", "--eval-every", "--image-size") and value == "0":
        return  # zero is valid for these
    out = tmp_path / "run"
    code = main(["distill", "--method", "dm", "--out", str(out), flag, value])
    assert code == 2
    _one_sentence_error(capsys)
    assert not (out / "manifest.json").exists()


@SETTINGS
@given(key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
def test_unknown_config_keys(key):
    known = {"method", "dataset", "data_dir", "ipc", "iterations", "seed", "zca", "image_size", "init", "device",
             "eval_every", "checkpoint_every", "evals", "num_experts", "expert_epochs"}
    if key in known:
        return
    with pytest.raises(ConfigError, match="must be a table" if key in ("method_config", "mim", "eval") else "Unknown"):
        build_settings({"method": "dm", key: 1})


wrong_values = st.one_of(st.text(max_size=5), st.floats(allow_nan=True, allow_infinity=True),
                         st.lists(st.integers(), max_size=2), st.booleans(), st.integers(-5, 0))


@SETTINGS
@given(key=st.sampled_from(["ipc", "iterations", "checkpoint_every", "evals", "num_experts"]), value=wrong_values)
def test_wrong_types_and_ranges_in_run_settings(key, value):
    valid_count = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                   and value == int(value) and value >= 1)  # 3 and 3.0 are both a fine count
    if valid_count:
        return
    with pytest.raises(ConfigError):
        build_settings({"method": "dm", key: value})


@SETTINGS
@given(key=st.sampled_from(["lr_img", "batch_real"]),
       value=st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 0, "fast", [1], True]))
def test_bad_method_table_values(key, value):
    with pytest.raises(ConfigError):
        build_settings({"method": "dm", "method_config": {key: value}})


def test_nan_in_toml_file_is_refused(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('method = "dm"\n[method_config]\nlr_img = nan\n')
    assert main(["distill", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    assert "finite" in _one_sentence_error(capsys)


@pytest.mark.parametrize("text", ["method = ", "[[[", "ipc = 'ten'", "method_config = 3"])
def test_malformed_config_file(tmp_path, capsys, text):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    assert main(["distill", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    _one_sentence_error(capsys)


@pytest.mark.parametrize("argv", [
    ["distill", "--method", "nope", "--out", "{tmp}/r"],
    ["distill", "--method", "dm", "--dataset", "nope", "--out", "{tmp}/r"],
    ["distill", "--method", "dm", "--dataset", "cifar10", "--data-dir", "{tmp}/missing", "--out", "{tmp}/r"],
    ["distill", "--method", "dm", "--dataset", "imagefolder:{tmp}/empty", "--out", "{tmp}/r"],
    ["distill", "--method", "dm", "--ipc", "100000", "--out", "{tmp}/r"],
    ["distill", "--config", "{tmp}/missing.toml", "--out", "{tmp}/r"],
    ["distill", "--out", "{tmp}/nothing-here", "--resume"],
    ["distill", "--method", "dm", "--device", "tpu", "--out", "{tmp}/r"],
    ["distill", "--bogus-flag"],
    ["evaluate", "--dataset", "digits", "--ipc", "0", "--random"],
    ["evaluate", "{tmp}/not-a-run"],
    ["show", "{tmp}/not-a-run"],
])
def test_bad_invocations(tmp_path, capsys, argv):
    (tmp_path / "empty").mkdir()
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2
    _one_sentence_error(capsys)


def test_bad_mim_settings(tmp_path, capsys):
    for table in ('lam = -1.0', 'layers = ["blocks.9"]', 'beta_list = [1.0]', 'head_width = 0', 'tau = 0.0',
                  'n_real = 100000'):
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'method = "dm+mim"\n[mim]\n{table}\n')
        assert main(["distill", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2, table
        _one_sentence_error(capsys)


def test_pickled_pt_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump({"images": Payload()}, f)
    with pytest.raises(DataError, match="refused"):
        load_torch_weights_only(bad)
    assert not marker.exists()
    good = tmp_path / "good.pt"
    torch.save({"images": torch.ones(2)}, good)
    assert torch.equal(load_torch_weights_only(good)["images"], torch.ones(2))


def test_imagefolder_class_names_never_escape_run_dir(tmp_path):
    from PIL import Image

    root = tmp_path / "data"
    for name in ("..", "a..b", "evil;rm -rf", "x"):
        if name == "..":
            continue  # cannot be a folder name; the other odd names must stay plain labels
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")
    out = tmp_path / "run"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'method = "dm"\ndataset = "imagefolder:{root}"\nimage_size = 8\niterations = 1\nevals = 1\n'
                   '[method_config]\nwidth = 8\nbatch_real = 4\n[eval]\nepochs = 1\n')
    before = set(tmp_path.rglob("*"))
    assert main(["distill", "--config", str(cfg), "--out", str(out)]) == 0
    created = set(tmp_path.rglob("*")) - before
    assert created and all(out in p.parents or p == out for p in created)


def test_from_mapping_reports_the_key():
    from mim4dd_fast.settings import RunSettings

    with pytest.raises(ConfigError, match="'ipc'"):
        from_mapping(RunSettings, {"ipc": "ten"})

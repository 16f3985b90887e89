"""bench/baselines.py at tiny shapes: FLOPs against a hand count, one real subprocess row, row selection."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_baselines", BENCH / "baselines.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_baselines"] = module
    spec.loader.exec_module(module)
    return module


bl = _load()


def _conv_flops(n_in, n_out, size):
    """2 * C_out * C_in * 9 * H * W per image for a 3x3 'same' convolution."""
    return 2 * n_out * n_in * 9 * size * size


def test_dm_flops_match_a_hand_count():
    # DM without DSA on 8x8 images, ConvNet-2 width 16, IPC 1, 16 real per class: the real batch
    # (160 images) goes forward only; the 10 synthetic images go forward and back to the pixels only
    # (the net is frozen), and a convolution's input gradient costs the same as its forward.
    row = bl.Row("t", "dm", 1, "test", "dm1", {"batch_real": 16, "dsa": False})
    res = bl.measure_row(row, bl.SMOKE, repeats=1)
    per_image = _conv_flops(3, 16, 8) + _conv_flops(16, 16, 4)
    assert res["gflop_per_iter"] * 1e9 == pytest.approx(per_image * (160 + 10 + 10), rel=1e-9)
    # Bytes saved for backward: at least the conv1 input (10 synthetic images, float32) and far less
    # than the activations of the 160 real images, which run under no_grad.
    assert 10 * 3 * 8 * 8 * 4 <= res["saved_peak_bytes"] < 160 * 16 * 8 * 8 * 4
    assert res["s_per_iter_median"] > 0 and res["rss_rise_bytes"] >= 0


def test_one_row_in_a_subprocess_writes_json_with_anchors(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert bl.main(["--smoke", "--rows", "mtt1_s10_ckpt", "--repeats", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert row["row"] == "mtt1_s10_ckpt" and row["config"]["unroll"] == "checkpointed"
    for key in ("s_per_iter_median", "saved_peak_bytes", "gflop_per_iter"):
        assert math.isfinite(row[key]) and row[key] > 0
    assert row["theta_store_bytes"] == 11 * row["params"] * 4  # syn_steps + 1 flat vectors
    assert "original code, from ANCHORS.md" in capsys.readouterr().out


def test_ratios_divide_ours_by_the_anchor():
    anchor = bl.ANCHORS["mtt10_s10"]
    res = {"s_per_iter_median": 5.3, "saved_peak_bytes": 1.4 * 2**30, "rss_rise_bytes": 2.9 * 2**30,
           "gflop_per_iter": 1784.0}
    assert bl.ratios(res, anchor) == pytest.approx(
        {"s_per_iter": 0.5, "saved_for_backward": 0.5, "peak_rss_rise": 1.0, "gflop": 2.0})


def test_row_selection_by_name_glob_and_skip():
    assert [r.name for r in bl.select_rows("dm1,mtt1_*", "mtt1_s50_*")] == [
        "dm1", "mtt1_s10_full", "mtt1_s10_ckpt", "mtt1_s20_full", "mtt1_s20_ckpt"]
    assert len(bl.select_rows(None, "dc10")) == len(bl.ROWS) - 1
    assert {r.anchor for r in bl.ROWS.values()} == set(bl.ANCHORS)  # every anchor row is measured


def test_bad_flags_exit_2_with_one_sentence(capsys):
    assert bl.main(["--rows", "nosuch"]) == 2
    assert bl.main(["--rows", "dm1", "--skip", "dm*"]) == 2
    assert bl.main(["--repeats", "0"]) == 2
    err = capsys.readouterr().err
    assert "No row matches 'nosuch'" in err and "--repeats must be at least 1" in err

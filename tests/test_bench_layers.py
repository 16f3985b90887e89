"""bench/layers.py end to end at tiny shapes: four variants per row in fresh processes, a JSON, exit codes."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "layers.py"


def test_smoke_run_measures_every_variant_of_mtt_and_dc(tmp_path):
    out = tmp_path / "layers.json"
    res = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--rows", "mtt1_s10_full,dc1", "--rounds", "1",
                          "--repeats", "1", "--threads", "1", "--json", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    got = {(r["row"], r["variant"]) for r in data["results"] if r["rounds"] and r["s_per_iter"] > 0}
    assert got == {(row, v) for row in ("mtt1_s10_full", "dc1")
                   for v in ("torch/system", "ours/system", "torch/tuned", "ours/tuned")}
    assert data["smoke"] is True


def test_torch_layers_variant_really_swaps_the_layers():
    """The "torch" variant runs nn.GroupNorm / nn.AvgPool2d, the "ours" variant our layers (in this process)."""
    sys.path.insert(0, str(SCRIPT.parent))
    import layers as bench_layers  # bench/layers.py

    from mim4dd_fast.layers import AvgPool2, InstanceNorm

    for variant, expect_ours in (("torch", False), ("ours", True)):
        step = bench_layers._step("mtt1_s10_full", variant, smoke=True)
        kinds = {type(m) for m in step.__self__.model.modules()}
        assert (InstanceNorm in kinds and AvgPool2 in kinds) == expect_ours
        assert (InstanceNorm not in kinds and AvgPool2 not in kinds) == (not expect_ours)
        dc_step = bench_layers._step("dc1", variant, smoke=True)  # DC builds a fresh net every iteration
        kinds = {type(m) for m in dc_step.__self__.fresh_net().modules()}
        assert (InstanceNorm in kinds and AvgPool2 in kinds) == expect_ours


def test_unknown_row_is_one_sentence_and_exit_2():
    res = subprocess.run([sys.executable, str(SCRIPT), "--rows", "nope"], capture_output=True, text=True)
    assert res.returncode == 2
    assert "Unknown row 'nope'" in res.stderr and "Traceback" not in res.stderr

"""bench/compare.py at a tiny budget: the JSON schema, finite positive figures, traces, bad flags."""

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"bench_{name}"] = module
    spec.loader.exec_module(module)
    return module


compare = _load("compare")

TINY = [
    "--iterations", "3", "--evals", "1", "--eval-epochs", "3", "--device", "cpu", "--seeds", "2",
    "--set", "num_experts=1",
    "--set", "mim4dd:expert_epochs=2",
    "--set", "mim4dd:method_config.max_start_epoch=1",
    "--set", "mim4dd:method_config.expert_epochs=1",
    "--set", "mim4dd:method_config.syn_steps=2",
    "--set", "mim4dd:mim.n_real=4",
    "--set", "dm:method_config.batch_real=8",
]


def _positive(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_tiny_comparison_writes_the_documented_schema(tmp_path, capsys):
    out_json, out_csv, traces = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "traces"
    rc = compare.main(["--methods", "dm,mim4dd", *TINY, "--cache-dir", str(tmp_path / "cache"),
                       "--json", str(out_json), "--csv", str(out_csv), "--profile", str(traces)])
    printed = capsys.readouterr().out
    assert rc == 0
    data = json.loads(out_json.read_text())
    assert set(data) == {"environment", "results", "paired_differences"}
    env = data["environment"]
    for key in ("torch", "triton", "device_name", "threads"):
        assert key in env
    assert env["threads"] >= 1
    results = data["results"]
    assert [r["method"] for r in results] == ["dm", "mim4dd"]
    for r in results:
        for key in compare.REQUIRED:
            assert key in r, key
        assert r["dataset"] == "digits" and r["ipc"] == 1 and r["iterations"] == 3
        for key in ("sec_per_iter_median", "sec_per_iter_p90", "total_seconds", "flops_per_iter", "flops_per_sec",
                    "peak_mem_bytes", "saved_for_backward_bytes", "accuracy_mean", "random_baseline_mean",
                    "eval_seconds"):
            assert _positive(r[key]), (r["method"], key, r[key])
        assert r["sec_per_iter_p90"] >= r["sec_per_iter_median"]
        assert math.isfinite(r["accuracy_std"]) and r["accuracy_std"] >= 0
        assert 0 < r["accuracy_mean"] <= 1 and 0 < r["random_baseline_mean"] <= 1
        assert r["peak_mem_kind"] == "cpu_saved_for_backward"
        assert r["peak_mem_bytes"] == r["saved_for_backward_bytes"]
        assert r["peak_rss_delta_bytes"] >= 0
        assert r["traces"] and all(Path(p).exists() for p in r["traces"])
    dm, mim = results
    assert dm["mi_estimate"] is None and dm["expert_seconds"] is None
    assert set(mim["mi_estimate"]) == {"blocks.0", "blocks.1"}  # digits: ConvNet-2, every block tapped
    assert all(math.isfinite(v) for v in mim["mi_estimate"].values())
    assert _positive(mim["expert_seconds"])
    # both methods share one random-real baseline per seed (same data, IPC, seed and protocol)
    assert dm["random_baseline_per_seed"] == mim["random_baseline_per_seed"]
    # two distillation seeds: a mean over seeds inside its interval, and mim4dd - dm paired seed by seed
    for r in results:
        assert r["seeds"] == [0, 1] and len(r["accuracy_per_seed"]) == 2
        assert r["accuracy_mean"] == pytest.approx(sum(r["accuracy_per_seed"]) / 2)
        assert r["accuracy_ci95"][0] <= r["accuracy_mean"] <= r["accuracy_ci95"][1]
    (paired,) = data["paired_differences"]
    diffs = [b - a for a, b in zip(dm["accuracy_per_seed"], mim["accuracy_per_seed"], strict=True)]
    assert paired["method"] == "mim4dd" and paired["versus"] == "dm" and paired["n_seeds"] == 2
    assert paired["diff"] == pytest.approx(sum(diffs) / 2)
    assert "paired on the same distillation seeds" in printed
    rows = list(csv.DictReader(out_csv.open()))
    assert [row["method"] for row in rows] == ["dm", "mim4dd"]
    assert float(rows[1]["flops_per_iter"]) == mim["flops_per_iter"]
    assert f"tensorboard --logdir {traces}" in printed
    assert "mim4dd" in printed and "vs dm" in printed

    # one expert set per distillation seed (num_experts 1), each in its own cache folder
    cached = sorted(p.parent.name for p in (tmp_path / "cache").rglob("*.safetensors"))
    assert len(cached) == 2 and cached[0] != cached[1]


@pytest.mark.parametrize("argv, words", [
    (["--methods", "nope"], "Unknown method"),
    (["--methods", "dm", "--ipc", "0"], "--ipc must be at least 1"),
    (["--methods", "dm", "--iterations", "2"], "--iterations must be at least 3"),
    (["--methods", "dm", "--bogus"], "Unrecognized arguments"),
    (["--ipc", "1"], "Required"),
    (["--methods", "dm", "--ipc", "ten"], "Argument --ipc"),
])
def test_bad_flags_print_one_sentence_and_exit_2(argv, words, capsys):
    assert compare.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words.lower() in err.lower()
    assert "\n" not in err and "Traceback" not in err


def test_set_prefix_matches_exact_alias_when_both_are_listed():
    from mim4dd_fast.settings import parse_overrides

    items = ['mtt+mim:mim.impl="reference"', "mim.tau=0.2", "mtt:method_config.syn_steps=3", "mtt:method.lr_img=9"]
    both = ["mtt", "mim4dd", "mtt+mim"]
    assert parse_overrides(items, "mtt+mim", both)["mim"] == {"impl": "reference", "tau": 0.2}
    assert parse_overrides(items, "mim4dd", both)["mim"] == {"tau": 0.2}  # the alias is not matched
    assert parse_overrides(items, "mim4dd", ["mim4dd"])["mim"] == {"impl": "reference", "tau": 0.2}
    assert parse_overrides(items, "mtt", both)["method_config"] == {"syn_steps": 3, "lr_img": 9}

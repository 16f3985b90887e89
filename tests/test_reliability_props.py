"""Property-based reliability checks (issue 17): generated damaged run directories, out-of-range settings and
foreign --out folders. Every refusal: exit code 2, no traceback, one line naming the file, and every file
that existed before is byte-identical afterwards. Small example counts keep this suite to seconds."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_helpers import finished_run, snapshot, write_config

from mim4dd_fast.cli import main
from mim4dd_fast.rundir import LOCK, MARKER

FAST = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)

FILES = [MARKER, "config.toml", "metrics.jsonl", "eval.json", "manifest.json", "synthetic.safetensors",
         "synthetic.png", "checkpoints/ckpt-00000003.json", "checkpoints/ckpt-00000003.safetensors"]
SHOW_OK = {("manifest.json", "delete"), ("checkpoints/ckpt-00000003.json", "delete")}  # an unfinished / older run
EVALUATE_READS = {MARKER, "config.toml", "manifest.json", "synthetic.safetensors"}
RESUME_READS = {MARKER, "config.toml", "metrics.jsonl"}  # (damaged checkpoints fall back; see test_reliability)

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                     max_size=3), max_leaves=6)
wrong_shape = json_values.filter(
    lambda v: not (isinstance(v, dict) and {"files", "accuracies", "iteration", "checksum", "mean"} & set(v)))


@st.composite
def damages(draw):
    name = draw(st.sampled_from(FILES))
    kind = draw(st.sampled_from(["delete", "truncate", "folder", "random_bytes", "wrong_json"]))
    payload = b""
    if kind == "truncate":
        payload = draw(st.floats(0, 0.99))
    elif kind == "random_bytes":
        payload = draw(st.binary(min_size=1, max_size=300))
    elif kind == "wrong_json":
        payload = (json.dumps(draw(wrong_shape)) + "\n").encode()
    return name, kind, payload


def _damage(run: Path, name: str, kind: str, payload) -> None:
    path = run / name
    data = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(data[: int(len(data) * payload)])
        return
    path.unlink()
    if kind == "folder":
        path.mkdir()
    elif kind in ("random_bytes", "wrong_json"):
        path.write_bytes(payload if payload != data else payload + b"x")


@pytest.fixture(scope="module")
def complete(tmp_path_factory) -> Path:
    return finished_run(tmp_path_factory)


def _refused(capsys, named: str | None = None) -> None:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    if named is not None:
        assert named in lines[0], (named, lines[0])


def _stem(name: str) -> str:
    return Path(name).name.split(".")[0] or MARKER


def _check_damage(complete: Path, capsys, name: str, kind: str, payload) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(shutil.copytree(complete, Path(tmp) / "run"))
        _damage(run, name, kind, payload)
        before = snapshot(run)

        code = main(["show", str(run)])
        assert code == (0 if (name, kind) in SHOW_OK else 2)
        if code == 2:
            _refused(capsys, _stem(name))
        assert snapshot(run) == before

        capsys.readouterr()
        code = main(["evaluate", str(run), "--nets", "1", "--epochs", "1"])
        expected = 2 if name in EVALUATE_READS and (name, kind) not in SHOW_OK else 0
        assert code == expected, capsys.readouterr().err
        if code == 2:
            _refused(capsys, _stem(name))
        assert snapshot(run) == before

        if name in RESUME_READS:
            capsys.readouterr()
            assert main(["distill", "--out", str(run), "--resume", "--iterations", "4"]) == 2
            _refused(capsys, _stem(name))
            assert snapshot(run) == before
        capsys.readouterr()


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("kind,payload", [("delete", b""), ("truncate", 0.5), ("folder", b""),
                                          ("random_bytes", bytes(range(256))), ("wrong_json", b'{"a": [1]}\n')])
def test_every_file_and_damage(complete, capsys, one_thread, name, kind, payload):
    _check_damage(complete, capsys, name, kind, payload)


@settings(FAST, max_examples=40)
@given(damage=damages())
def test_damaged_run_directory(complete, capsys, one_thread, damage):
    _check_damage(complete, capsys, *damage)


names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=12).filter(
    lambda n: n not in (".", "..", MARKER, LOCK))


@FAST
@given(files=st.dictionaries(names, st.binary(max_size=64), min_size=1, max_size=4), nested=st.booleans(),
       resume=st.booleans())
def test_foreign_out_folder(capsys, files, nested, resume):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "theirs"
        (folder / "sub" if nested else folder).mkdir(parents=True)
        for name, data in files.items():
            (folder / ("sub" if nested else "") / name).write_bytes(data)
        before = snapshot(folder)
        cfg = write_config(Path(tmp))
        assert main(["distill", "--config", str(cfg), "--out", str(folder), *(["--resume"] if resume else [])]) == 2
        _refused(capsys, str(folder))
        assert snapshot(folder) == before


BAD_SETTINGS = st.one_of(
    st.tuples(st.sampled_from(["seed"]), st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32))),
    st.tuples(st.sampled_from(["ipc", "iterations", "checkpoint_every", "evals", "num_experts"]),
              st.one_of(st.integers(max_value=0), st.floats(0.1, 0.9), st.text(max_size=3), st.booleans())),
    st.tuples(st.sampled_from(["image_size"]), st.one_of(st.integers(max_value=-1), st.integers(10**5, 10**7))),
    st.tuples(st.sampled_from(["method_config.lr_img", "method_config.momentum_img", "eval.lr", "mim.tau", "mim.lam"]),
              st.one_of(st.floats(min_value=1e39, max_value=1e300), st.floats(min_value=1e-300, max_value=1e-39),
                        st.floats(max_value=-1e39, min_value=-1e300))),
    st.tuples(st.sampled_from(["mim.pool", "mim.head_width", "method_config.width"]), st.integers(10**9, 10**12)),
)


@FAST
@given(bad=BAD_SETTINGS)
def test_out_of_range_settings(capsys, bad):
    key, value = bad
    table, _, name = key.rpartition(".")
    body = {name: value}
    text = 'method = "dm+mim"\n' + "".join(f"{k} = {json.dumps(v)}\n" for k, v in body.items() if not table)
    if table:
        text += f"[{table}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in body.items())
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "c.toml"
        cfg.write_text(text)
        out = Path(tmp) / "run"
        assert main(["distill", "--config", str(cfg), "--out", str(out)]) == 2, text
        _refused(capsys)
        assert not out.exists()

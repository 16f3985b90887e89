"""Cost of the CIFAR pickle structure check: ``safe_load`` of one full-size batch with and without it.

Two layouts of the same 10,000-image batch (labels and file names included): as the official
Python-2 files are written (``BINSTRING`` opcodes) and as Python 3 re-pickles it with protocol 2
(every ``bytes`` becomes a ``_codecs.encode`` call). The two variants run interleaved; medians.

    python bench/unpickle_check.py --repeats 7
"""

from __future__ import annotations

import pickle
import struct
import sys
import tempfile
from pathlib import Path

from _common import ArgError, Parser


def _py2_str(b: bytes) -> bytes:
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)


def python2_batch(data, labels: list[int], names: list[bytes]) -> bytes:
    """The official layout opcode by opcode: numpy 1 ``numpy.core`` globals, Python-2 str buffers."""
    u1 = (b"cnumpy\ndtype\n" + _py2_str(b"u1") + b"\x89\x88\x87R"
          + b"(K\x03" + _py2_str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    shape = b"(" + b"".join(b"J" + struct.pack("<i", n) for n in data.shape) + b"t"
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _py2_str(b"b") + b"\x87R"
             + b"(K\x01" + shape + u1 + b"\x89" + _py2_str(data.tobytes()) + b"tb")
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    name_list = b"](" + b"".join(_py2_str(n) for n in names) + b"e"
    return (b"\x80\x02}(" + _py2_str(b"data") + array + _py2_str(b"labels") + label_list
            + _py2_str(b"filenames") + name_list + b"u.")


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    from mim4dd_fast.data import unpickle
    from mim4dd_fast.profiling import summarize_times, timed

    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--images", type=int, default=10_000)
    try:
        args = parser.parse_args(argv)
        if args.repeats < 1 or not 1 <= args.images <= 50_000:
            raise ArgError("--repeats must be at least 1 and --images between 1 and 50000.")
    except ArgError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (args.images, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, args.images).tolist()
    names = [f"img_{i}.png".encode() for i in range(args.images)]
    real_check = unpickle.check_structure
    with tempfile.TemporaryDirectory() as tmp:
        files = {"python-2 official layout": Path(tmp) / "py2", "python-3 protocol 2": Path(tmp) / "py3"}
        files["python-2 official layout"].write_bytes(python2_batch(data, labels, names))
        with open(files["python-3 protocol 2"], "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"filenames": names}, f, protocol=2)
        print(f"safe_load of one CIFAR batch of {args.images} images, median of {args.repeats} interleaved runs")
        for layout, path in files.items():
            times: dict[str, list[float]] = {"with check": [], "without": []}
            for _ in range(args.repeats):
                for variant in times:
                    unpickle.check_structure = real_check if variant == "with check" else (lambda f: None)
                    times[variant].append(timed(lambda p=path: unpickle.safe_load(p))[1])
            unpickle.check_structure = real_check
            med = {k: summarize_times(v)["median"] for k, v in times.items()}
            print(f"{layout:26s} with check {1000 * med['with check']:7.0f} ms   "
                  f"without {1000 * med['without']:7.0f} ms   ratio {med['with check'] / med['without']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

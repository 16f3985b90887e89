#!/usr/bin/env bash
# GPU check of the fused contrastive kernels: compiled-Triton tests + the kernel benchmark.
#
# For a CUDA machine with torch + triton preinstalled, no pip, no network; run from the repository
# root:  bash bench/gpu_check.sh   (results and logs go to $OUT if set, else ./gpu_check_out).
# The package need not be installed: a temporary directory lays out mim4dd_fast/ (symlinks to the
# checkout's mim4dd_fast/* plus kernels/ as mim4dd_fast/kernels) and goes first on PYTHONPATH.
# Budget: about 5 minutes (each step has its own timeout; the benchmark writes JSON after each row).
set -u
ROOT="$(pwd)"
[ -f "$ROOT/kernels/contrastive.py" ] || { echo "run from the repository root" >&2; exit 2; }
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"

SHIM="$(mktemp -d)"
trap 'cd / && rm -rf "$SHIM"' EXIT
mkdir -p "$SHIM/mim4dd_fast"
for entry in "$ROOT"/mim4dd_fast/*; do
    ln -s "$entry" "$SHIM/mim4dd_fast/$(basename "$entry")"
done
ln -sfn "$ROOT/kernels" "$SHIM/mim4dd_fast/kernels"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0   # compiled Triton; tests/conftest.py only sets it when unset
export PYTHONDONTWRITEBYTECODE=1
# run from the shim: `python -m` and stdin scripts put the cwd first on sys.path, and the checkout's
# own mim4dd_fast/ (without kernels/) must not shadow the shim's
cd "$SHIM"

"$PY" - <<'PYEOF' 2>&1 | tee "$OUT/env.txt"
import torch, triton, mim4dd_fast.kernels as k
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "-", "kernels from", k.__file__)
assert torch.cuda.is_available(), "no CUDA device"
PYEOF
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1

status=0
if "$PY" -c "import pytest" 2>/dev/null; then
    # addopts cleared: pytest-benchmark's --benchmark-disable may not be installed here
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" --rootdir "$ROOT" \
        -c "$ROOT/pyproject.toml" "$ROOT/tests/test_contrastive_triton.py" "$ROOT/tests/test_feature_reduce.py" \
        "$ROOT/tests/test_augment.py" "$ROOT/tests/test_evaluation.py" -k "cuda or gpu or triton or large" 2>&1 | tee "$OUT/tests.txt"
    status=${PIPESTATUS[0]}
else
    # no pytest: the same large-size comparisons as tests/test_contrastive_triton.py, inline
    timeout 150 "$PY" - <<'PYEOF' 2>&1 | tee "$OUT/tests.txt"
import torch
from mim4dd_fast.kernels import contrastive_loss
from mim4dd_fast.kernels.reference import contrastive_loss_reference as ref
for critic in ("infonce", "nce"):
    for N, M, D in [(4096, 3001, 128), (1000, 5000, 512), (2049, 2047, 77), (1, 33, 20), (40, 1, 17)]:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(N, D, generator=g).cuda().requires_grad_(True)
        b = torch.randn(M, D, generator=g).cuda().requires_grad_(True)
        ya = torch.randint(0, 10 if min(N, M) > 1 else 1, (N,), generator=g).cuda()
        yb = torch.randint(0, 10 if min(N, M) > 1 else 1, (M,), generator=g).cuda()
        res = []
        for fn in (ref, lambda *t, **kw: contrastive_loss(*t, impl="triton", **kw)):
            loss = fn(a, b, ya, yb, critic=critic)
            res.append((loss.detach(), *torch.autograd.grad(loss, (a, b))))
        for got, want in zip(res[1], res[0], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
        print("ok", critic, N, M, D)
PYEOF
    status=${PIPESTATUS[0]}
fi

# benchmark: everything but compile first, then torch.compile(reference) (slow to compile per shape)
timeout 100 "$PY" "$ROOT/bench/kernels.py" --device cuda --sizes 1024 4096 16384 --dims 128 512 \
    --impls reference chunked triton --repeats 10 --json "$OUT/kernels.json" 2>"$OUT/bench.log" \
    | tee "$OUT/kernels.txt"
timeout 100 "$PY" "$ROOT/bench/kernels.py" --device cuda --sizes 1024 4096 16384 --dims 128 512 \
    --impls compile --repeats 10 --json "$OUT/kernels_compile.json" 2>"$OUT/bench_compile.log" \
    | tee "$OUT/kernels_compile.txt"
echo "tests exit status: $status; results in $OUT"
exit "$status"

#!/usr/bin/env bash
# One-shot GPU verdict for the fused kernels: the GPU tests, the kernel benchmark (eager, compiled,
# Triton, chunked and auto at each precision: time, peak memory, accuracy), the eager/fused crossover
# of impl="auto", batched evaluation nets and experts vs one by one (bench/evaluation.py, fp32), and
# one short distillation per method on CUDA compared with the same run on CPU.
# Judged in OUTDIR/summary.json (PASS/FAIL per target); the exit code is 1 on any FAIL.
#
#   bash bench/gpu_check.sh OUTDIR             # on one CUDA GPU, from the repository root (<= 8 min)
#   bash bench/gpu_check.sh --dry-run OUTDIR   # its non-GPU parts on CPU at tiny sizes; nothing judged
#
# Worst case (every step at its time limit): about 560 s. Needs only torch and triton (made for the GPU
# image: torch 2.11, triton 3.6), no network, no pip: the checkout is used in place (a temporary
# directory maps kernels/ to mim4dd_fast/kernels); $PYTHON picks the interpreter (default python3).
# pytest, hypothesis and rich are optional: without pytest the GPU comparisons run inline.
# Every step has its own time limit and log (OUTDIR/<step>.txt); the JSON files are written as the
# benchmark goes, so a step cut short still leaves what it measured.
set -u
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
[ $# -eq 1 ] || { echo "usage: bash bench/gpu_check.sh [--dry-run] OUTDIR" >&2; exit 2; }
ROOT="$(pwd)"
[ -f "$ROOT/kernels/contrastive.py" ] || { echo "run from the repository root" >&2; exit 2; }
mkdir -p "$1" 2>/dev/null && OUT="$(cd "$1" && pwd)" || { echo "cannot create the output directory $1" >&2; exit 2; }
PY="${PYTHON:-python3}"

SHIM="$(mktemp -d)"
trap 'cd / && rm -rf "$SHIM"' EXIT
mkdir -p "$SHIM/mim4dd_fast"
for entry in "$ROOT"/mim4dd_fast/*; do
    ln -s "$entry" "$SHIM/mim4dd_fast/$(basename "$entry")"
done
ln -sfn "$ROOT/kernels" "$SHIM/mim4dd_fast/kernels"
# the shim first; the checkout after it (bench/_common.py then leaves sys.path alone)
export PYTHONPATH="$SHIM:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 MPLBACKEND=Agg
[ "$DRY" -eq 0 ] && export TRITON_INTERPRET=0   # compiled Triton (tests/conftest.py sets it only when unset)
# python -m and inline scripts put the working directory first on sys.path: not the checkout
cd "$SHIM"
: > "$OUT/steps.tsv"

step() {  # step NAME SECONDS CMD...: run with a time limit, log to OUT/NAME.txt, record exit code and time
    local name=$1 limit=$2 t0=$SECONDS code
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    code=$?
    printf '%s\t%s\t%s\n' "$name" "$code" "$((SECONDS - t0))" >> "$OUT/steps.tsv"
    echo "[$name] exit $code after $((SECONDS - t0)) s (log: $OUT/$name.txt)"
}

# ---- environment -------------------------------------------------------------------------------
step env 20 "$PY" - "$DRY" "$OUT/env.json" <<'PYEOF'
import importlib.util, json, sys
import torch, triton
import mim4dd_fast.kernels as k
from mim4dd_fast.profiling import environment
dry = sys.argv[1] == "1"
env = environment("cuda" if torch.cuda.is_available() else "cpu")
env["kernels_from"] = k.__file__
env["optional_missing"] = [m for m in ("pytest", "hypothesis", "rich", "sklearn", "safetensors", "psutil")
                           if importlib.util.find_spec(m) is None]
print(json.dumps(env, indent=1))
json.dump(env, open(sys.argv[2], "w"), indent=1)
assert dry or torch.cuda.is_available(), "no CUDA device visible"
PYEOF
if [ "$DRY" -eq 0 ] && [ "$(cut -f2 "$OUT/steps.tsv" | head -1)" != "0" ]; then
    echo "environment check failed (see $OUT/env.txt)"; cat "$OUT/env.txt"
fi

# ---- short distillations: CPU side in the background (4 threads each) while the GPU is tested ------
METHODS="mim4dd mtt dc dm"
ITERS=2
OTHER=cuda
if [ "$DRY" -eq 1 ]; then METHODS="dm"; ITERS=1; OTHER=cpu; fi
mkdir -p "$OUT/distill"
printf '[eval]\nepochs = %s\n' "$((2 - DRY))" > "$OUT/distill/quick.toml"
distill() {  # distill METHOD DEVICE SECONDS
    step "distill_$1-$2" "$3" "$PY" -m mim4dd_fast distill --method "$1" --device "$2" --iterations "$ITERS" \
        --evals 1 --eval-every 0 --num-experts 1 --seed 0 --config "$OUT/distill/quick.toml" --out "$OUT/distill/$1-$2"
}
CPU_PIDS=""
for m in $METHODS; do
    rm -rf "$OUT/distill/$m-cpu" "$OUT/distill/$m-cuda"
    (export OMP_NUM_THREADS=4; distill "$m" cpu 120) &
    CPU_PIDS="$CPU_PIDS $!"
done

# ---- GPU tests: those named gpu/cuda (fixed tiles, except the test that compares them with autotune) --
export MIM4DD_TRITON_AUTOTUNE=0
TESTS="$ROOT/tests/test_contrastive_triton.py $ROOT/tests/test_feature_reduce.py $ROOT/tests/test_augment.py"
TESTS="$TESTS $ROOT/tests/test_evaluation.py $ROOT/tests/test_profiling.py"
if "$PY" -c "import pytest" 2>/dev/null; then
    COLLECT=""
    [ "$DRY" -eq 1 ] && COLLECT="--collect-only"
    # addopts cleared: pytest-benchmark's --benchmark-disable may not be installed here
    step tests 110 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" \
        --rootdir "$ROOT" -c "$ROOT/pyproject.toml" -k "gpu or cuda" $COLLECT $TESTS
else
    step tests 110 "$PY" - "$DRY" <<'PYEOF'
import sys
from functools import partial
import torch
from mim4dd_fast.kernels import contrastive_loss
from mim4dd_fast.kernels.testing import PRECISION_RTOL, check_against_float64
device = "cpu" if sys.argv[1] == "1" else "cuda"
sizes = [(67, 45, 37)] if device == "cpu" else [(4096, 3001, 128), (1000, 5000, 256), (2049, 2047, 77)]
impl = "chunked" if device == "cpu" else "triton"
for precision in ("ieee", "tf32x3", "tf32", "bf16"):
    for critic in ("infonce", "nce"):
        for N, M, D in sizes:
            g = torch.Generator().manual_seed(0)
            a, b = torch.randn(N, D, generator=g).to(device), torch.randn(M, D, generator=g).to(device)
            ya, yb = torch.randint(0, 10, (N,), generator=g).to(device), torch.randint(0, 10, (M,), generator=g).to(device)
            err = check_against_float64(partial(contrastive_loss, impl=impl, precision=precision), a, b, ya, yb,
                                        PRECISION_RTOL[precision], critic=critic)
            print("ok", precision, critic, N, M, D, err, flush=True)
PYEOF
fi

unset MIM4DD_TRITON_AUTOTUNE

# ---- wait for the CPU distillations ------------------------------------------------------------
for pid in $CPU_PIDS; do wait "$pid"; done

# ---- kernel benchmark: the target size first, then the grid ------------------------------------
BENCH="$ROOT/bench/kernels.py"
if [ "$DRY" -eq 1 ]; then
    step bench_targets 120 "$PY" "$BENCH" grid --device cpu --sizes 64 --dims 16 40 --impls eager chunked auto \
        --repeats 2 --no-isolate --rate-size 64 --json "$OUT/kernels.json"
    step crossover 60 "$PY" "$BENCH" crossover --device cpu --sizes 32 64 --dim 16 --repeats 2 \
        --json "$OUT/crossover.json"
    step evaluation 60 "$PY" "$ROOT/bench/evaluation.py" --device cpu --ipcs 1 --nets 2 --epochs 2 --repeats 1 \
        --experts 2 --expert-epochs 1 --expert-width 8 --peak-size 128 --json "$OUT/evaluation.json"
else
    # the headline precision first: a step cut short keeps the groups it finished
    step bench_targets 160 "$PY" "$BENCH" grid --device cuda --sizes 16384 --dims 128 --repeats 7 \
        --precisions tf32x3 tf32 bf16 ieee --json "$OUT/kernels.json"
    step bench_grid_128 45 "$PY" "$BENCH" grid --device cuda --sizes 4096 65536 --dims 128 --repeats 2 \
        --precisions tf32x3 tf32 bf16 ieee --no-accuracy --json "$OUT/kernels_grid_128.json"
    step bench_grid_512 50 "$PY" "$BENCH" grid --device cuda --sizes 4096 16384 65536 --dims 512 --repeats 2 \
        --precisions tf32x3 tf32 bf16 ieee --no-accuracy --json "$OUT/kernels_grid_512.json"
    step crossover 25 "$PY" "$BENCH" crossover --device cuda --repeats 5 --json "$OUT/crossover.json"
    # 5 evaluation nets at once vs one by one, and experts 4 per pass (fp32: no TF32 in cuDNN/cuBLAS)
    (export NVIDIA_TF32_OVERRIDE=0; step evaluation 90 "$PY" "$ROOT/bench/evaluation.py" --device cuda \
        --ipcs 1 10 --nets 5 --repeats 2 --json "$OUT/evaluation.json")
    # ---- the same distillations on CUDA (in parallel: tiny), MTT experts shared with the CPU run ----
    CUDA_PIDS=""
    for m in $METHODS; do
        [ -d "$OUT/distill/$m-cpu/experts" ] && mkdir -p "$OUT/distill/$m-cuda" \
            && cp -r "$OUT/distill/$m-cpu/experts" "$OUT/distill/$m-cuda/"
        # fp32 convolutions and GEMMs (no TF32 in cuDNN/cuBLAS), as on the CPU side
        (export NVIDIA_TF32_OVERRIDE=0; distill "$m" cuda 45) &
        CUDA_PIDS="$CUDA_PIDS $!"
    done
    for pid in $CUDA_PIDS; do wait "$pid"; done
fi

# ---- verdict -----------------------------------------------------------------------------------
SUMMARY_FLAGS="--methods $METHODS --other-device $OTHER"
[ "$DRY" -eq 1 ] && SUMMARY_FLAGS="$SUMMARY_FLAGS --dry-run"
"$PY" "$BENCH" summary "$OUT" $SUMMARY_FLAGS 2>&1 | tee "$OUT/summary.txt"
status=${PIPESTATUS[0]}
echo "summary: $OUT/summary.json (exit $status, ${SECONDS} s in all)"
exit "$status"

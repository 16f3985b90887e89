#!/usr/bin/env bash
# Every figure in docs/benchmarks.md and docs/guidelines.md comes from one of these commands, run in
# this order on an otherwise idle 2-core CPU machine (outputs under runs/bench/, logs beside them).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=runs/bench
mkdir -p "$OUT"
export MIM4DD_CACHE="$OUT/cache"   # a fresh expert cache: the first compare run builds the experts
step() { echo "== $*" | tee -a "$OUT/steps.log"; /usr/bin/time -f "wall %e s, max RSS %M KiB" "$@" > "$OUT/$NAME.log" 2>&1; echo "   exit $? ($NAME)" | tee -a "$OUT/steps.log"; }

NAME=compare_default step $PY bench/compare.py --methods mtt,mim4dd --json $OUT/compare_default.json --csv $OUT/compare_default.csv
NAME=distill_digits step mim4dd-fast distill --method mim4dd --dataset digits --ipc 1 --out $OUT/digits-mim4dd
# MIM overhead on MTT (issue target): fused paths (mim4dd) and the naive path (mtt+mim with the reference
# loss, full feature maps kept and the real batch in one pass) beside plain MTT, in one run.
NAME=mim_overhead step $PY bench/compare.py --methods mtt,mim4dd,mtt+mim --dataset random-cifar10 --ipc 10 --iterations 4 --evals 1 --eval-epochs 1 --set num_experts=1 --set method_config.syn_steps=30 --set method_config.width=128 --set method_config.depth=3 --set method_config.max_start_epoch=1 --set method_config.expert_epochs=1 --set mim.n_real=64 --set 'mtt+mim:mim.impl="reference"' --set 'mtt+mim:mim.tap="naive"' --set mtt+mim:mim.real_chunk=100000 --json $OUT/mim_overhead.json
NAME=unroll_ckpt step $PY bench/unroll.py --modes checkpointed --syn-steps 10 80 --ipc 10 --repeats 1 --json $OUT/unroll_ckpt.json
NAME=unroll_full step $PY bench/unroll.py --modes full --syn-steps 10 40 --ipc 10 --repeats 1 --json $OUT/unroll_full.json
NAME=kernels step $PY bench/kernels.py grid --device cpu --sizes 1024 4096 16384 --dims 128 --impls eager compile chunked --repeats 5 --json $OUT/kernels.json
NAME=kernels_cpu step $PY bench/kernels.py grid --device cpu --sizes 16384 --dims 128 --impls eager chunked --repeats 3 --json $OUT/kernels_cpu.json
NAME=kernels_crossover step $PY bench/kernels.py crossover --device cpu --sizes 128 256 512 1024 --dim 128 --repeats 7 --min-sample-s 0.3 --threads 1 --json $OUT/kernels_crossover.json
NAME=tap step $PY bench/kernels.py tap --repeats 3 --json $OUT/tap.json
NAME=ablate step $PY bench/ablate.py --workers 2 --out $OUT/ablation
NAME=complexity step $PY bench/complexity.py --out $OUT/complexity --json $OUT/complexity.json
# Ours beside the original code: give your checkouts of GeorgeCazenavette/mtt-distillation and
# VICO-UoE/DatasetCondensation (their code is imported, never copied; without them the original's
# column is the typed-in "other machine" fallback and no seconds are compared).
REPOS=()
[ -n "${MTT_REPO:-}" ] && REPOS+=(--mtt-repo "$MTT_REPO")
[ -n "${DC_REPO:-}" ] && REPOS+=(--dc-repo "$DC_REPO")
NAME=baselines_tuned step $PY bench/baselines.py "${REPOS[@]}" --rows 'mtt1_s10_full,mtt1_s10_ckpt,mtt1_s20_full,mtt10_s10_full,dc1,dm1,dm10' --rounds 2 --repeats 2 --json $OUT/baselines_tuned.json
# the same with the original on our C heap too, and ours on glibc's default (separates code from allocator)
NAME=baselines_both_tuned step $PY bench/baselines.py "${REPOS[@]}" --rows 'mtt1_s10_full,mtt1_s20_full,dc1,dm1' --rounds 2 --repeats 2 --original-malloc tuned --json $OUT/baselines_both_tuned.json
NAME=baselines_system step env MIM4DD_MALLOC=system $PY bench/baselines.py "${REPOS[@]}" --rows 'mtt1_s10_full,mtt1_s10_ckpt,mtt1_s20_full,mtt10_s10_full,dc1,dm1,dm10' --rounds 2 --repeats 2 --json $OUT/baselines_system.json
# the same on a busy machine (two busy loops on the two cores), 2 threads and 1 thread per process
python3 -c "while True: pass" & BUSY1=$!; python3 -c "while True: pass" & BUSY2=$!
NAME=baselines_loaded step $PY bench/baselines.py "${REPOS[@]}" --rows 'mtt1_s10_full,dc1,dm10' --rounds 1 --repeats 2 --json $OUT/baselines_loaded.json
NAME=baselines_loaded_t1 step $PY bench/baselines.py "${REPOS[@]}" --rows 'mtt1_s10_full,dc1,dm10' --rounds 1 --repeats 2 --threads 1 --json $OUT/baselines_loaded_t1.json
kill $BUSY1 $BUSY2
# where an MTT iteration goes: torch's layers vs ours, glibc's heap vs tuned
NAME=layers_mtt step $PY bench/layers.py --rows mtt1_s10_full,mtt1_s20_full --rounds 2 --repeats 5 --json $OUT/layers_mtt.json
NAME=layers_dcdm step $PY bench/layers.py --rows dc1,dm1 --rounds 2 --repeats 2 --json $OUT/layers_dcdm.json
NAME=baselines_bf16 step $PY bench/baselines.py --precision bf16 --rows 'mtt1_s10_full,mtt10_s10_full,dc1,dm1,dm10' --rounds 1 --repeats 2 --json $OUT/baselines_bf16.json
# the long rows (not in docs/benchmarks.md: about 15 and 55 minutes with the originals)
# $PY bench/baselines.py "${REPOS[@]}" --rows 'mtt10_s30_*' --rounds 2 --repeats 1 --json $OUT/baselines_mtt10_s30.json
# $PY bench/baselines.py "${REPOS[@]}" --rows dc10 --rounds 2 --repeats 1 --json $OUT/baselines_dc10.json
NAME=precision_digits step $PY bench/precision.py --methods dc,dm,mtt --dataset digits --seeds 3 --json $OUT/precision_digits.json
NAME=precision_mnist5k step $PY bench/precision.py --methods dc,dm,mtt --dataset mnist5k --seeds 3 --iterations 20 --json $OUT/precision_mnist5k.json
# batched evaluation and experts vs one by one with the roofline, the CPU crossover, and the torch.func alternative
NAME=evaluation step $PY bench/evaluation.py --ipcs 1 10 --nets 5 --repeats 3 --json $OUT/evaluation.json
NAME=evaluation_crossover step $PY bench/evaluation.py --ipcs 2 3 5 --nets 5 --repeats 2 --experts 0 --json $OUT/evaluation_crossover.json
NAME=evaluation_vmap step $PY bench/evaluation.py --ipcs 1 10 --nets 5 --repeats 2 --experts 0 --vmap --json $OUT/evaluation_vmap.json
# the main job against the code before this release: OLD=<an export of commit 6f97aea>, fresh caches, interleaved
if [ -n "${OLD:-}" ]; then
  for r in 1 2; do
    rm -rf "$OUT/cache_old" "$OUT/cache_new"
    NAME=compare_old_r$r step env MIM4DD_CACHE="$PWD/$OUT/cache_old" PYTHONPATH="$OLD" bash -c "cd '$OLD' && $PY bench/compare.py --methods mtt,mim4dd --json '$PWD/$OUT/compare_old_r$r.json'"
    NAME=compare_new_seeds1_r$r step env MIM4DD_CACHE="$PWD/$OUT/cache_new" $PY bench/compare.py --methods mtt,mim4dd --seeds 1 --json $OUT/compare_new_seeds1_r$r.json
  done
fi
# docs/results.md, docs/guidelines.md, docs/img/results/: the evidence study (about 80 min on 2 cores; resumable)
NAME=study step $PY bench/study.py --workers 2 --out runs/study --report docs/results.md
# docs/scaling.md: torchrun (2 processes, gloo) vs one process
NAME=scaling_experts step $PY bench/scaling.py --repeats 5 --json $OUT/scaling.json
NAME=scaling_distill step $PY bench/scaling_distill.py --json $OUT/scaling_distill_mim4dd_dm.json
NAME=scaling_distill_mtt step $PY bench/scaling_distill.py --methods mtt --json $OUT/scaling_distill_mtt.json
NAME=scaling_distill_cifar step $PY bench/scaling_distill.py --shape cifar --methods mtt --iterations 4 --json $OUT/scaling_distill_mtt_cifar.json

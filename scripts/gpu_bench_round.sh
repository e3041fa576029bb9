#!/usr/bin/env bash
# One round of the multi-GPU `cggr bench` session on a 4-GPU machine (the device tool's 10-minute calls):
# build once, optionally the GPU test suite + selective-CE benchmark on GPU 0 first, then the jobs files
# spread over the GPUs by scripts/bench_multi_gpu.py; everything lands in $ROOT and a tarball in $OUT.
# Usage: [BENCH_EXTRA=...] [CE_BENCH=0] bash scripts/gpu_bench_round.sh WALL_SECONDS MODE JOBS_FILE...
#   MODE tests: GPU tests (then the selective-CE benchmark unless CE_BENCH=0) on GPU 0, the first jobs
#   file on GPUs 1-3, the second on GPU 0 once its tests are done; MODE bench: all files on every GPU.
# Runs left unfinished by the wall are picked up by the next round on the same (warm) machine; finished
# jobs are skipped there without starting a process (bench_multi_gpu.py, DONE).
set -uo pipefail
cd "$(dirname "$0")/.."
wall=${1:?WALL_SECONDS}; mode=${2:?MODE}; shift 2
export PYTHONUNBUFFERED=1
py=python3
ROOT=/tmp/cggr_runs
start=$(date +%s)
mkdir -p "$ROOT" "${OUT:=/tmp/out}"
if [ ! -f /tmp/cggr_built ]; then
  $py -m pip install --no-build-isolation -e . > "$ROOT/build.log" 2>&1 || { tail -30 "$ROOT/build.log"; exit 1; }
  touch /tmp/cggr_built
fi
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/cggr_site ]; then
  $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/cggr_site $(ls .whl/*.whl | grep -v cggr-0.5.0)
fi
echo "built in $(( $(date +%s) - start )) s"
# BENCH_EXTRA adds settings to every job (e.g. --compile); the runs of one setting share a results folder.
COMMON="--corpus .gpu_data/bench/tokens-e4c5a968d4d74aca91e8.npz --model-preset smollm-135m --seq-len 1024
  --batch-size 32 --lr 1e-3 --dtype bf16 --eval-every 5 --eval-rows 64 --cache-dir /tmp/cggr_bench_cache
  ${BENCH_EXTRA:-}"
left=$(( wall - ($(date +%s) - start) - 40 ))
# Each GPU's jobs run on their own slice of the CPUs (bench_multi_gpu.py --cpu-slices): jobs started
# together, unpinned, were 2-6 % slower per step. In tests mode the GPU tests take GPU 0's slice.
gpus=$(nvidia-smi -L | wc -l)
slice=$(( $(nproc) / gpus ))
PIN="--cpu-slices $gpus"
if [ "$mode" = tests ]; then
  ( export CUDA_VISIBLE_DEVICES=0
    t0=$(date +%s); taskset -c 0-$(( slice - 1 )) $py -m pytest tests -q -p no:cacheprovider > "$ROOT/pytest.log" 2>&1
    echo "tests: exit $? in $(( $(date +%s) - t0 )) s: $(tail -1 "$ROOT/pytest.log")" > "$ROOT/tests.txt"
    if [ "${CE_BENCH:-1}" = 1 ]; then  # CE_BENCH=0: the GPU tests only
      PYTHONPATH=/tmp/cggr_site $py -m benchmarks.bench_selective_ce --out "$ROOT" > "$ROOT/bench_selective_ce.log" 2>&1
    fi
    rest=$(( left - ($(date +%s) - start) ))
    [ $rest -gt 120 ] && $py scripts/bench_multi_gpu.py --gpus 0 $PIN --root "$ROOT" --jobs "$2" --wall $rest --no-merge \
      -- $COMMON > "$ROOT/queue_gpu0.log" 2>&1 ) &
  $py scripts/bench_multi_gpu.py --gpus 1 2 3 $PIN --root "$ROOT" --jobs "$1" --wall $left --no-merge -- $COMMON
  wait
  $py scripts/bench_multi_gpu.py --root "$ROOT" --jobs "$1" "$2" --merge-only  # once, after both queues
  cat "$ROOT/tests.txt"; grep -E "^(FAILED|ERROR)" "$ROOT/pytest.log" | head -30; tail -5 "$ROOT/queue_gpu0.log"
else
  cat "$@" > "$ROOT/all_jobs.txt"
  $py scripts/bench_multi_gpu.py --gpus 0 1 2 3 $PIN --root "$ROOT" --jobs "$ROOT/all_jobs.txt" --wall $left -- $COMMON
fi
for r in "$ROOT"/merged/*/; do [ -f "$r/summary.md" ] && cat "$r/summary.md"; done
tar czf "$OUT/runs.tgz" -C "$ROOT" --exclude='*.lock' jobs logs merged $(cd "$ROOT" && ls *.log *.txt *.json 2>/dev/null)

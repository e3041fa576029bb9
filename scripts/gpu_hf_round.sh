#!/usr/bin/env bash
# The GPU round of issues 18 and 23 on one single-GPU machine, in three back-to-back device calls (the
# machine keeps /tmp between them while warm). Each stage carries one third of the SmolLM2 GGUF (98 MB; a
# call carries at most 64 MiB) in .gpu_data/p<STAGE>, joined in stage 2.
#   bash scripts/gpu_hf_round.sh 0  # build; CUDA-graph Trainer tests; Trainer vs loop step; regime 2 (gate)
#   bash scripts/gpu_hf_round.sh 1  # the CUDA-graph tests again; regime 3 through the Trainer; the rest of regime 2
#   bash scripts/gpu_hf_round.sh 2  # SmolLM2: example (a) at full size; the gate on the real checkpoint
#   bash scripts/gpu_hf_round.sh 3  # the rest of regime 2 only (when stage 1 left runs)
# Or the GGUF xz-compressed in two halves (.gpu_data/x0/gguf.xz.part0, .gpu_data/x1/gguf.xz.part1: stages 1, 2).
# Carry: .gpu_data/p<STAGE>, and .gpu_data/bench (stages 0, 1), .gpu_data/bench_smol + corpus_trim + whl (2).
# NO_TESTS=1: stage 1 without its CUDA-graph tests. WALL (seconds, default 560): when the stage's last bench invocation must stop (cggr bench --max-wall;
# an unfinished run is picked up by the same invocation in a later stage).
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?STAGE}
WALL=${WALL:-560}
start=$(date +%s)
left() { echo $(( WALL - ($(date +%s) - start) )); }
export PYTHONUNBUFFERED=1
py=python3
R=/tmp/cggr_round
mkdir -p "$R" "${OUT:=/tmp/out}"
for part in .gpu_data/*/gguf*.part*; do [ -f "$part" ] && cp "$part" /tmp/ && echo "carried $(basename "$part")"; done
# the bench's token file as an uncompressed npz, xz-compressed (.gpu_data/benchxz: 15 instead of 20 MB to carry)
for packed in .gpu_data/benchxz/*.npz.xz; do
  [ -f "$packed" ] || continue
  mkdir -p .gpu_data/bench && $py -c "import lzma, shutil, sys
shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" "$packed" ".gpu_data/bench/$(basename "$packed" .xz)"
done
# finished runs of regime 2 from an earlier machine (RUNS_FROM, their runs/*.json), when this one has none
if [ -n "${RUNS_FROM:-}" ] && [ ! -d "$R/regime2/runs" ]; then mkdir -p "$R/regime2" && cp -r "$RUNS_FROM/runs" "$R/regime2/"; fi
if [ ! -f /tmp/cggr_built ]; then
  $py -m pip install --no-build-isolation -e . > "$R/build.log" 2>&1 || { tail -30 "$R/build.log"; exit 1; }
  touch /tmp/cggr_built
fi
echo "stage $stage: built after $(( $(date +%s) - start )) s on $(nvidia-smi -L | head -1), $(nproc) cores"
COMMON="--corpus .gpu_data/bench/tokens-e4c5a968d4d74aca91e8.npz --model-preset smollm-135m --seq-len 1024
  --batch-size 32 --lr 1e-3 --dtype bf16 --eval-every 5 --eval-rows 64 --cache-dir /tmp/cggr_bench_cache"
REGIME2="--regime finetune --finetune-source python_doc --init-budget 90 --time-budget 60 --ratios 0.25
  --configs standard confidence_gate --seeds 0 1 --compile blocks-cudagraphs --clock span --out $R/regime2"
case $stage in
0)
  $py -m pytest tests/gpu/test_hf_cuda.py -q -p no:cacheprovider --tb=long > "$R/hf_cuda.log" 2>&1
  grep -v "^  warnings\|Warning" "$R/hf_cuda.log" | tail -60
  for c in ${STEP_COMPILES:-blocks-cudagraphs none}; do
    $py -m benchmarks.bench_trainer_step --out "$R/trainer_step_$c" --compile $c --steps 30 2>&1 | grep -v Warning | tail -8
  done
  $py -m cggr bench $COMMON $REGIME2 --max-wall $(left) 2>&1 | grep -v "%" | tail -25
  ;;
1)
  [ -n "${NO_TESTS:-}" ] || $py -m pytest tests/gpu/test_hf_cuda.py tests/gpu/test_model_cuda.py -k "trainer or accumulate" -q \
    -p no:cacheprovider --tb=long > "$OUT/graph_tests.log" 2>&1
  [ -n "${NO_TESTS:-}" ] || grep -v "^  warnings\|Warning\|DEBUG" "$OUT/graph_tests.log" | tail -40
  $py -m benchmarks.bench_trainer_target $COMMON --regime target --target-source python_doc --reference-preset medium \
    --reference-budget 20 --time-budget 90 --ratios 0.25 --seeds 0 --trainer-compile blocks-cudagraphs \
    --out "$OUT/regime3_trainer" 2>&1 | grep -v "%" | tail -30  # under OUT: kept if the call is cut short
  cat "$OUT/regime3_trainer/summary.md" 2>/dev/null | head -12
  [ -n "${NO_REGIME2:-}" ] || $py -m cggr bench $COMMON $REGIME2 --max-wall $(left) 2>&1 | grep -v "%" | tail -25
  ;;
2)
  if [ -f /tmp/gguf.xz.part0 ] && [ -f /tmp/gguf.xz.part1 ]; then  # the xz-compressed GGUF in two parts
    cat /tmp/gguf.xz.part0 /tmp/gguf.xz.part1 | $py -c "import lzma, shutil, sys
shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)" > /tmp/smollm2.gguf
  else
    for i in 0 1 2; do [ -f /tmp/gguf.part$i ] || { echo "GGUF part $i missing (the machine went cold?)"; exit 1; }; done
    cat /tmp/gguf.part0 /tmp/gguf.part1 /tmp/gguf.part2 > /tmp/smollm2.gguf
  fi
  md5sum /tmp/smollm2.gguf
  $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu_data/whl/*.whl
  PYTHONPATH=/tmp/site $py scripts/smollm2_checkpoint.py /tmp/smollm2 --gguf /tmp/smollm2.gguf 2>&1 | tail -1
  timeout $(( $(left) - 15 )) $py examples/continued_pretraining.py --model /tmp/smollm2 --corpus .gpu_data/corpus_trim --out "$R/example_a" \
    --length 512 --batch-size 32 --steps ${EXAMPLE_STEPS:-200} --eval-every 10 --eval-rows 64 --ref-rows 256 --no-count-sources 2>&1 \
    | tail -12
  [ -f .gpu_data/bench_smol/tokens-1448a7e4cf6ccafbb25e.npz ] && \
  $py -m cggr bench --corpus .gpu_data/bench_smol/tokens-1448a7e4cf6ccafbb25e.npz --seq-len 1024 --batch-size 32 \
    --lr 2e-4 --dtype bf16 --eval-every 5 --eval-rows 64 --cache-dir /tmp/cggr_bench_cache --regime finetune \
    --finetune-source python_doc --init-checkpoint /tmp/smollm2 --time-budget 60 --configs standard confidence_gate \
    --seeds ${SMOL_SEEDS:-0 1} --compile blocks-cudagraphs --clock span --out "$R/smollm2" --max-wall $(left) \
    2>&1 | grep -v "%" | tail -25
  ;;
3)
  $py -m cggr bench $COMMON $REGIME2 --max-wall $(left) 2>&1 | grep -v "%" | tail -25
  ;;
esac
tar czf "$OUT/round_stage$stage.tgz" -C "$R" --exclude='*.lock' . 2>/dev/null
echo "stage $stage done in $(( $(date +%s) - start )) s"

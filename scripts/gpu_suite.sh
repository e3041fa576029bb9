#!/usr/bin/env bash
# The GPU suite, for a CUDA machine without internet: build, run every test (CUDA-only ones included),
# run the benchmarks, print a short summary. Usage: bash scripts/gpu_suite.sh LOG_DIR [bench ...]
# Benchmarks (default: all): selection token_stats selective_ce linear model_step.
# Comparators are optional: wheels in .whl/ (liger-kernel, cut-cross-entropy, cggr 0.5.0) are installed
# into /tmp when present; each benchmark says once which comparator it could not load.
set -uo pipefail
cd "$(dirname "$0")/.."
logs="${1:?usage: bash scripts/gpu_suite.sh LOG_DIR [bench ...]}"
shift
benches=("$@")
[ ${#benches[@]} -eq 0 ] && benches=(selection token_stats selective_ce linear model_step)
mkdir -p "$logs"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
summary="$logs/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }

note "== $(date -u +%FT%TZ) on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$summary"

if ls .whl/*.whl >/dev/null 2>&1; then
  comparators=$(ls .whl/*.whl | grep -v '/cggr-0.5.0')
  if [ -n "$comparators" ]; then
    $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/cggr_site $comparators \
      && export PYTHONPATH="/tmp/cggr_site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if ls .whl/cggr-0.5.0-*.whl >/dev/null 2>&1; then
    # its top-level modules `cggr` and `triton_kernels` would shadow ours: own folder, loaded by path
    $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/cggr_v050 .whl/cggr-0.5.0-*.whl \
      && export CGGR_V050_PATH=/tmp/cggr_v050
  fi
fi

t0=$(date +%s)
$py -m pip install --no-build-isolation -e . > "$logs/build.log" 2>&1
build=$?
note "build: exit $build in $(( $(date +%s) - t0 )) s ($(grep -h 'cggr:' "$logs/build.log" | head -1))"
[ $build -ne 0 ] && { tail -40 "$logs/build.log"; exit 1; }

t0=$(date +%s)
$py -m pytest tests -q -p no:cacheprovider > "$logs/pytest.log" 2>&1
tests=$?
note "tests: exit $tests in $(( $(date +%s) - t0 )) s: $(tail -1 "$logs/pytest.log")"
[ $tests -ne 0 ] && grep -E "^(FAILED|ERROR)" "$logs/pytest.log" | head -30 | tee -a "$summary"

for b in "${benches[@]}"; do
  t0=$(date +%s)
  $py -m benchmarks.bench_$b --out "$logs" > "$logs/bench_$b.log" 2>&1
  status=$?
  note "bench_$b: exit $status in $(( $(date +%s) - t0 )) s"
  [ $status -ne 0 ] && tail -15 "$logs/bench_$b.log" | tee -a "$summary"
done
note "== markdown tables"
for b in "${benches[@]}"; do
  grep -h '^|' "$logs/bench_$b.log" >> "$summary"
  echo >> "$summary"
done
cat "$summary"
[ $tests -eq 0 ]

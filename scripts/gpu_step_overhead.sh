#!/usr/bin/env bash
# Step time and host time of the cggr bench training loop, autocast over fp32 weights (--dtype bf16) vs
# bf16 weights (--dtype bf16-weights), regime 3 configurations, one seed, short runs: how much of a
# selective step is the host's. Usage: bash scripts/gpu_step_overhead.sh OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?OUT_DIR}
export PYTHONUNBUFFERED=1
python3 -m pip install --no-build-isolation -e . > "$out/build.log" 2>&1 || { tail -20 "$out/build.log"; exit 1; }
for dtype in bf16 bf16-weights; do
  python3 -m cggr bench --regime target --target-source python_doc --reference-preset medium --reference-budget 4 \
    --configs standard random excess oracle --ratios 0.25 --seeds 0 --time-budget 12 --eval-every 6 --eval-rows 8 \
    --corpus .gpu_data/bench/tokens-e4c5a968d4d74aca91e8.npz --model-preset smollm-135m --seq-len 1024 \
    --batch-size 32 --lr 1e-3 --dtype $dtype --cache-dir /tmp/cggr_cache --out "$out/$dtype" > "$out/$dtype.log" 2>&1 \
    || { tail -20 "$out/$dtype.log"; exit 1; }
done
python3 - "$out" <<'PY'
import glob, json, sys
print("| dtype | config | steps | step ms | host ms | params |")
print("|---|---|---|---|---|---|")
for f in sorted(glob.glob(sys.argv[1] + "/*/runs/*.json")):
    r = json.load(open(f))
    print(f"| {r['settings']['dtype']} | {r['config']} | {r['steps']} | {r['step_time_ms']:.1f} | "
          f"{r['host_ms_per_step']:.1f} | {r['param_dtype']} |")
PY
nvidia-smi --query-gpu=name --format=csv,noheader

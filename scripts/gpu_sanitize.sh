#!/usr/bin/env bash
# compute-sanitizer over every CUDA op and Triton kernel (scripts/sanitize_ops.py, small shapes):
# memcheck (with the caching allocator off, so an out-of-bounds access leaves its own allocation),
# racecheck (shared memory) and initcheck. Usage: bash scripts/gpu_sanitize.sh LOG_DIR
# Prints each tool's summary line (a float16 matmul's outputs are flagged by initcheck without cggr code:
# scripts/initcheck_probe.py, BENCHMARKS.md "GPU round of 2026-12-05"); exit status 0 only when every tool reports 0 errors and every check passed.
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${1:?usage: bash scripts/gpu_sanitize.sh LOG_DIR}
mkdir -p "$logs"
py=${PYTHON:-python3}
# Compile the Triton kernels once outside the sanitizer (its cache then serves every tool's run).
$py scripts/sanitize_ops.py > "$logs/plain.log" 2>&1 || { tail -20 "$logs/plain.log"; exit 1; }
status=0
for tool in memcheck racecheck initcheck; do
  t0=$(date +%s)
  nocache=(); [ $tool = memcheck ] && nocache=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1)
  "${nocache[@]}" compute-sanitizer --tool $tool --error-exitcode 9 --print-limit 50 \
    $py scripts/sanitize_ops.py > "$logs/$tool.log" 2>&1
  rc=$?
  summary=$(grep -h "ERROR SUMMARY\|RACECHECK SUMMARY" "$logs/$tool.log" | tail -1)
  checks=$(grep -h "check(s) failed" "$logs/$tool.log" | tail -1)
  echo "$tool: exit $rc in $(( $(date +%s) - t0 )) s: ${summary:-no summary line} / ${checks:-no result line}"
  if [ $rc -ne 0 ]; then  # the kinds of finding, then the kernels they were found in
    status=1
    grep -E "^========= (Invalid|Uninitialized|Race|Error|Warning)" "$logs/$tool.log" | sort | uniq -c | head -5
    grep -h "^=========     at " "$logs/$tool.log" | sed 's/(.*//' | sort | uniq -c | head -10
  fi
done
exit $status

#!/usr/bin/env bash
# Performance-only GPU pass (about 2 minutes of command time): build for sm_90, the CUDA
# self-test (correctness of what is timed), the headline benchmarks of the cuda and triton
# backends against cuBLAS/bitsandbytes, and the split-K / config sweep.  For a tuning loop
# after gpu_quick.sh or gpu_check.sh has validated the same kernels.
#   run(command="bash benchmarks/gpu_perf.sh", carry=[".whl", ".nf4kit_commit"])
set -u -o pipefail
cd "$(dirname "$0")/.."
source benchmarks/_gpu_common.sh
if [ "${TESTS:-0}" = 1 ]; then
  timeout -s INT 45 python3 -m pytest tests/test_backend_cuda.py -q -rf -n 8 -p no:cacheprovider > "$OUT/tests_cuda.log" 2>&1
  log "test_backend_cuda rc=$? $(tail -1 "$OUT/tests_cuda.log")"
  grep -E "^FAILED|Error" "$OUT/tests_cuda.log" | head -20
fi
[ "${BENCH_S:-80}" -gt 0 ] && timeout -s INT ${BENCH_S:-80} python3 -m benchmarks.run --device cuda --backends cuda,triton \
  --cases ${CASES:-dequantize_4bit,matmul_4bit,matmul_4bit_lora,backward_input} --shapes 4096x14336 \
  --m ${MS:-1,16,64,256,4096} --budget-s $(( ${BENCH_S:-80} - 15 )) --json "$OUT/bench.json" --md "$OUT/bench.md" \
  > "$OUT/bench.log" 2>&1
log "bench rc=$?"
timeout -s INT 60 python3 -m benchmarks.gpu_sweep > "$OUT/sweep.log" 2>&1
log "sweep rc=$?"
echo "==== bench"; grep -E "^\| (case|dequant|matmul|backward)" "$OUT/bench.md" | cut -d'|' -f2-7,13 2>/dev/null || tail -30 "$OUT/bench.log"
echo "==== sweep"; cat "$OUT/sweep.log"
echo "==== summary"; cat "$OUT/summary.txt"

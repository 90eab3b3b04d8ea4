#!/usr/bin/env bash
# Short GPU validation for a tight device budget (about 4 minutes of command time): build for
# sm_90, the CUDA backend's self-test, its kernel tests, headline benchmarks of the cuda and
# triton backends against cuBLAS/bitsandbytes, and compute-sanitizer memcheck on the self-test.
# The full check is benchmarks/gpu_check.sh (needs ~8 minutes).
#   run(command="bash benchmarks/gpu_quick.sh", carry=[".whl"])
set -u -o pipefail
cd "$(dirname "$0")/.."
source benchmarks/_gpu_common.sh


timeout -s INT 45 python3 -m pytest tests/test_backend_cuda.py -q -rf -n 8 -p no:cacheprovider > "$OUT/tests_cuda.log" 2>&1
log "test_backend_cuda rc=$? $(tail -1 "$OUT/tests_cuda.log")"
grep -E "^FAILED|Error" "$OUT/tests_cuda.log" | head -20

NF4KIT_TRITON_AUTOTUNE=0 timeout -s INT 60 python3 -m pytest tests/test_triton_kernels.py -q -rf -n 8 \
  -p no:cacheprovider > "$OUT/tests_triton.log" 2>&1
log "test_triton_kernels (first configs) rc=$? $(tail -1 "$OUT/tests_triton.log")"
grep -E "^FAILED|Error" "$OUT/tests_triton.log" | head -20

timeout -s INT 80 python3 -m benchmarks.run --device cuda --backends cuda,triton \
  --cases dequantize_4bit,matmul_4bit,matmul_4bit_lora,backward_input --shapes 4096x14336 --m 1,16,64,256,4096 \
  --budget-s 65 --json "$OUT/bench.json" --md "$OUT/bench.md" > "$OUT/bench.log" 2>&1
log "bench rc=$?"

SWEEP=${SWEEP:-flush} timeout -s INT 60 python3 -m benchmarks.gpu_sweep > "$OUT/sweep.log" 2>&1
log "sweep rc=$?"

CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 40 "$CS" --tool memcheck --leak-check no --print-limit 20 \
  python3 -m nf4kit.backends.cuda > "$OUT/sanitizer.log" 2>&1
log "sanitizer rc=$? $(grep -h 'ERROR SUMMARY' "$OUT/sanitizer.log" | head -1)"
echo "==== bench"; cat "$OUT/bench.md" 2>/dev/null | head -60 || tail -30 "$OUT/bench.log"
echo "==== sweep"; cat "$OUT/sweep.log"
echo "==== summary"; cat "$OUT/summary.txt"

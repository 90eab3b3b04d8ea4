#!/usr/bin/env bash
# Why is the M = 1 decode at 22-32 us (results/gpu_h100_2026-11-27)?  First, the host cost of
# one M = 1 call layer by layer (benchmarks/host_overhead.py, cuda then triton; ~30-60 s with
# Triton's autotuning).  Then Nsight Compute on one launch each of the cuda GEMV as committed (the
# tensor-core kernel at M = 1, with its finalize), its stream and row kernels, the triton stream
# kernel as committed and its word path, and bitsandbytes' M = 1 kernel (DRAM throughput, MIO
# pressure, stall reasons, occupancy); then the M = 1 sweeps on both projection shapes and the Triton configs.  About 7-8
# minutes; the sweep is cut at 240 s.
#   run(command="bash benchmarks/gpu_profile.sh", carry=[".whl", ".nf4kit_commit"], timeout_s=540)
set -u -o pipefail
cd "$(dirname "$0")/.."
source benchmarks/_gpu_common.sh
for b in cuda triton; do
  { echo "## --backend $b"; timeout 90 python3 -m benchmarks.host_overhead --device cuda --backend "$b" --rounds 3 --calls 192; } >> "$OUT/host.md" 2>&1
  log "host_overhead $b rc=$?"
done
echo "==== host"; cat "$OUT/host.md"
source benchmarks/_ncu_decode.sh
ncu_decode "$OUT/ncu.csv" cuda cuda-stream cuda-rows triton triton-word bnb
log "ncu done"
SWEEP=depth,triton timeout -s INT 240 python3 -m benchmarks.gpu_sweep > "$OUT/sweep.log" 2>&1
log "sweep rc=$?"
echo "==== sweep"; cat "$OUT/sweep.log"
echo "==== summary"; cat "$OUT/summary.txt"

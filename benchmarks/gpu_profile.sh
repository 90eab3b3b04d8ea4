#!/usr/bin/env bash
# Why is the M = 1 decode at 25-31 us (results/gpu_h100_2026-11-26b)?  Nsight Compute on one
# launch each of the cuda GEMV (as committed; the 8-deep ring; both with the fp16 pair table), the
# triton GEMV and bitsandbytes' gemv_4bit (DRAM throughput, MIO pressure, stall reasons,
# occupancy), then the M = 1 sweeps: cuda rows x ring depth x splits (and the pair table) on both
# projection shapes, and the Triton configs (two K-steps in flight included).  First, the host
# cost of one M = 1 call layer by layer (benchmarks/host_overhead.py, cuda then triton; ~30-60 s
# with Triton's autotuning).  About 7-8 minutes; the sweep is cut at 240 s.
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
ncu_decode "$OUT/ncu.csv" cuda cuda-r1d8 cuda-pairs cuda-r1d8-pairs triton bnb
log "ncu done"
SWEEP=depth,triton timeout -s INT 240 python3 -m benchmarks.gpu_sweep > "$OUT/sweep.log" 2>&1
log "sweep rc=$?"
echo "==== sweep"; cat "$OUT/sweep.log"
echo "==== summary"; cat "$OUT/summary.txt"

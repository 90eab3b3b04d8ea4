#!/usr/bin/env bash
# Why is the M = 1 decode at 25-31 us (results/gpu_h100_2026-11-26b)?  Nsight Compute on the
# cuda and triton GEMVs and bitsandbytes' gemv_4bit (DRAM throughput, shared-memory / MIO
# pressure, stall reasons), then the GEMV row/split sweep including the 1-row-per-warp variant.
# About 2-3 minutes.   run(command="bash benchmarks/gpu_profile.sh", carry=[".whl", ".nf4kit_commit"])
set -u -o pipefail
cd "$(dirname "$0")/.."
source benchmarks/_gpu_common.sh
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
  timeout 120 "$NCU" --target-processes all --kernel-name "regex:gemv|kgemm_4bit_inference" \
    --launch-skip 2 --launch-count 6 --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section WarpStateStats --section SchedulerStats --section Occupancy --csv --page details \
    python3 -m benchmarks.gpu_profile_target > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
  log "ncu rc=$? ($NCU) $(grep -c . "$OUT/ncu.csv") lines"
  grep -E "Kernel Name|DRAM Throughput|Memory Throughput|Duration|Issue Slots Busy|Stall|MIO|Achieved Occupancy" \
    "$OUT/ncu.csv" | cut -c1-220 | head -60
  tail -3 "$OUT/ncu.err"
else
  log "ncu not found"
fi
SWEEP=gemv timeout -s INT 60 python3 -m benchmarks.gpu_sweep > "$OUT/sweep.log" 2>&1
log "sweep rc=$?"
echo "==== sweep"; cat "$OUT/sweep.log"
echo "==== summary"; cat "$OUT/summary.txt"

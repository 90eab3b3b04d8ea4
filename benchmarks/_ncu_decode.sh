# Sourced by gpu_profile.sh and gpu_check.sh (stage "profile"): Nsight Compute on two decode
# launches per call of benchmarks.gpu_profile_target (a split-K GEMV's kernel and its finalize, or the
# table GEMM):
# DRAM throughput, MIO pressure, stall reasons, occupancy.  ncu_decode CSV_OUT CALL...  appends
# each call's CSV to CSV_OUT (one file: the device tool returns at most 8) and prints the telling
# metrics.  NCU_CALL_S: limit per call (default 60).
ncu_decode() {
  local csv_out=$1; shift
  local ncu; ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  if [ -z "$ncu" ]; then echo "ncu not found"; return 3; fi
  local call rc
  for call in "$@"; do
    timeout "${NCU_CALL_S:-60}" "$ncu" --target-processes all --kernel-name "regex:gemv|gemm_4bit_table|splitk_finalize|kgemm_4bit_inference|gemm_4bit_simt" \
      --launch-skip 2 --launch-count 2 --section SpeedOfLight --section MemoryWorkloadAnalysis \
      --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats \
      --csv --page details python3 -m benchmarks.gpu_profile_target "$call" > "/tmp/ncu_$call.csv" 2>> "/tmp/ncu.err"
    rc=$?
    { echo "# call $call (rc $rc)"; cat "/tmp/ncu_$call.csv"; } >> "$csv_out"
    echo "==== ncu $call rc=$rc"
    grep -E "Kernel Name|DRAM Throughput|Memory Throughput|Duration|Issue Slots Busy|Stall (Long|MIO|Short|Wait|LG)|Achieved Occupancy|Registers Per|Waves Per" \
      "/tmp/ncu_$call.csv" | awk -F'","' '{print $(NF-2)" | "$(NF-1)" | "$NF}' | head -40
  done
  tail -3 /tmp/ncu.err
}

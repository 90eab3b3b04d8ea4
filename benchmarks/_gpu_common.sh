# Sourced by gpu_quick.sh and gpu_perf.sh: output folder, the log() helper, the carried
# bitsandbytes wheel, the sm_90 build of the working tree (logged with its rc), and the CUDA
# backend's self-test (every kernel once on odd shapes against reference.py).
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/summary.txt"; }
log "commit $(cat .nf4kit_commit 2>/dev/null || git rev-parse HEAD 2>/dev/null) card $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
NF4KIT_CUDA_ARCHS=90 NF4KIT_BUILD_DIR=/tmp/nf4kit-build NF4KIT_BUILD_JOBS=16 \
  timeout 75 python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
log "build rc=$? ($(python3 -c 'import nf4kit;b=nf4kit.build_info();print(b["backends_available"], b["cuda_archs"])' 2>&1 | tail -1))"

timeout 30 python3 -m nf4kit.backends.cuda > "$OUT/selftest.log" 2>&1
log "selftest rc=$? pass=$(grep -c ^PASS "$OUT/selftest.log") fail=$(grep -c ^FAIL "$OUT/selftest.log")"
grep -v "^PASS" "$OUT/selftest.log" | tail -25

#!/usr/bin/env bash
# nf4kit GPU check (DESIGN.md §6): everything in one call on a bare GPU machine with no network.
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=560)
#
# Stages, each time-boxed, each continuing after the previous one failed:
#   env        nvidia-smi, python/torch/triton versions
#   wheels     carried wheels (.whl/*.whl, from benchmarks/prepare_gpu_wheels.sh) -> /tmp/site
#   build      pip install -e . for the local arch only (NF4KIT_CUDA_ARCHS, default 90), timed;
#              on failure a pure-Python install so the triton/torch backends still get tested
#   info       nf4kit.build_info()
#   tests      the whole pytest suite on CUDA (-q -rf, no -x: every failure), junit XML
#   sanitizer  compute-sanitizer memcheck over benchmarks/gpu_sanitize.py (each kernel once)
#   bench      python -m benchmarks.run --device cuda (json + markdown)
#   report     $OUT/gpu_report.md, and a short summary table printed LAST
#
# Files under $OUT (the device tool returns at most 8): gpu_report.md, bench.json, bench.md,
# junit.xml, sanitizer.log, gpu_check.log (every stage's full output).
# Optional stages: sweep (GPU_CHECK_SWEEP, e.g. depth,triton; $OUT/sweep.log) and profile
# (GPU_CHECK_NCU, e.g. "cuda bnb"; $OUT/ncu.csv).  GPU_CHECK_BENCH_ENV: VAR=value settings for the
# bench stage alone (e.g. NF4KIT_CUDA_GEMV_STREAM=1), named in the report.
# Environment: OUT (default ./gpu_out), NF4KIT_GIT_COMMIT (else .nf4kit_commit, else git),
# NF4KIT_CUDA_ARCHS (default 90), GPU_CHECK_DEADLINE_S (default 460: the whole script's
# budget; stages shrink to fit it), GPU_CHECK_TEST_WORKERS (default 4 if pytest-xdist),
# GPU_CHECK_SKIP (space-separated stage names to skip), GPU_CHECK_BENCH_ARGS (extra args for
# benchmarks.run), GPU_CHECK_PYTEST_ARGS (default "tests").
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
WORK=/tmp/gpu_check
rm -rf "$WORK"; mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 ROOT OUT WORK
export PATH="$PATH:/usr/local/cuda/bin"
PY=${PYTHON:-python3}; export PY
DEADLINE_S=${GPU_CHECK_DEADLINE_S:-460}
T_START=$(date +%s)
date -u +"%Y-%m-%d %H:%M UTC" > "$WORK/started.txt"
: > "$WORK/stages.tsv"

# ---- commit: env, then a file written before the run (the .git folder may not travel), then git
COMMIT=${NF4KIT_GIT_COMMIT:-}
[ -z "$COMMIT" ] && [ -f .nf4kit_commit ] && COMMIT=$(head -c 80 .nf4kit_commit)
[ -z "$COMMIT" ] && COMMIT=$(git rev-parse HEAD 2>/dev/null || true)
[ -z "$COMMIT" ] && COMMIT="unknown (pass NF4KIT_GIT_COMMIT=\$(git rev-parse HEAD) or write .nf4kit_commit)"
if git -c core.fileMode=false diff --quiet HEAD 2>/dev/null; then :; elif git rev-parse HEAD >/dev/null 2>&1; then COMMIT="$COMMIT (+local changes)"; fi
echo "$COMMIT" > "$WORK/commit.txt"
export NF4KIT_GIT_COMMIT="$COMMIT"

# Later stages' default limits (s); a stage gets what is left before the deadline minus these.
# The default stages sum to 470 s: with every stage at its limit the script still ends inside 8
# minutes (the optional ones add 220 s; GPU_CHECK_DEADLINE_S then scales them all down).
declare -A LIMIT=( [env]=30 [wheels]=20 [build]=110 [info]=20 [tests]=120 [sanitizer]=70 [bench]=100
                   [sweep]=120 [profile]=100 )
ORDER=(env wheels build info tests sanitizer bench)
# Optional: the M = 1 decode sweeps (GPU_CHECK_SWEEP=depth,triton: benchmarks.gpu_sweep sections) and
# Nsight Compute on decode calls (GPU_CHECK_NCU="cuda bnb": benchmarks.gpu_profile_target calls).
[ -n "${GPU_CHECK_SWEEP:-}" ] && ORDER+=(sweep)
[ -n "${GPU_CHECK_NCU:-}" ] && ORDER+=(profile)
# GPU_CHECK_LIMITS="build=100 tests=120 ...": a stage's own limit (s), before any scaling below.
for kv in ${GPU_CHECK_LIMITS:-}; do LIMIT[${kv%%=*}]=${kv#*=}; done
# A deadline under the defaults' sum (470 s) scales every default down (a short lease).
SUM=0; for s in "${ORDER[@]}"; do SUM=$((SUM + LIMIT[$s])); done
if [ "$DEADLINE_S" -lt "$SUM" ]; then
  for s in "${ORDER[@]}"; do LIMIT[$s]=$(( LIMIT[$s] * DEADLINE_S / SUM )); [ ${LIMIT[$s]} -lt 5 ] && LIMIT[$s]=5; done
fi
limit_for() {  # limit_for STAGE -> seconds: its default plus the slack earlier stages left, at most 2x
  local stage=$1 later=0 found=0 s
  for s in "${ORDER[@]}"; do
    if [ $found = 1 ]; then later=$((later + LIMIT[$s])); fi
    [ "$s" = "$stage" ] && found=1
  done
  local now=$(date +%s)
  local left=$((DEADLINE_S - (now - T_START) - later))
  local lo=${LIMIT[$stage]} hi=$((LIMIT[$stage] * 2))
  [ $left -lt $lo ] && left=$lo
  [ $left -gt $hi ] && left=$hi
  echo $left
}
STAGE_NOTE=""
run_stage() {  # run_stage NAME CMD...   (output to $WORK/NAME.log; a status line to stdout)
  local name=$1; shift
  if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" 0 0 0 "skipped (GPU_CHECK_SKIP)" >> "$WORK/stages.tsv"; return 0
  fi
  local lim; lim=$(limit_for "$name")
  local t0=$(date +%s)
  echo "---- [$name] start (limit ${lim}s, +$((t0 - T_START))s)"
  STAGE_NOTE=""
  # SIGINT first: pytest then still writes its summary and junit XML; KILL 20 s later.
  STAGE_LIMIT=$lim timeout -s INT -k 20 "$lim" bash -c "$*" > "$WORK/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  [ -f "$WORK/$name.note" ] && STAGE_NOTE=$(head -c 200 "$WORK/$name.note" | tr '\t\n' '  ')
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$dt" "$lim" "$STAGE_NOTE" >> "$WORK/stages.tsv"
  echo "---- [$name] rc=$rc ${dt}s ${STAGE_NOTE}"
  tail -n 15 "$WORK/$name.log" | sed "s/^/  [$name] /"
  return $rc
}

# ---- env
stage_env() {
  nvidia-smi || echo "nvidia-smi failed"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader \
    > "$WORK/card_full.txt" 2>/dev/null
  nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 > "$WORK/card.txt"
  # The runtime: gVisor reports kernel 4.4.0 and runs neither compute-sanitizer nor ncu's counters
  # (device KINDS.md); Firecracker runs both.
  echo "kernel $(uname -r)"
  $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  $PY -c "import triton; print('triton', triton.__version__)" || true
  nvcc --version | tail -2 || echo "no nvcc"
  command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer || echo "no compute-sanitizer"
  cmake --version | head -1; ninja --version
  echo "$(head -1 "$WORK/card.txt"), $(nproc) cores, kernel $(uname -r)" > "$WORK/env.note"
}
export -f stage_env
run_stage env stage_env

# ---- carried wheels
stage_wheels() {
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && echo "installed: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')" | tee "$WORK/wheels.note"
  else
    echo "no carried wheels (.whl/*.whl): bitsandbytes anchors will be n/a" | tee "$WORK/wheels.note"
  fi
}
export -f stage_wheels
run_stage wheels stage_wheels
[ -d /tmp/site ] && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"

# ---- build for the local arch, timed
stage_build() {
  export NF4KIT_CUDA_ARCHS=${NF4KIT_CUDA_ARCHS:-90}
  export NF4KIT_BUILD_DIR=/tmp/nf4kit-build
  export NF4KIT_BUILD_JOBS=${NF4KIT_BUILD_JOBS:-$(nproc)}
  local t0=$(date +%s)
  if $PY -m pip install --no-build-isolation --no-deps -v -e . ; then
    echo "built for sm_${NF4KIT_CUDA_ARCHS} in $(( $(date +%s) - t0 )) s" > "$WORK/build.note"
    return 0
  fi
  echo "BUILD FAILED after $(( $(date +%s) - t0 )) s; pure-Python install instead" > "$WORK/build.note"
  NF4KIT_NO_EXT=1 $PY -m pip install --no-build-isolation --no-deps -e . >/dev/null 2>&1
  return 1
}
export -f stage_build
run_stage build stage_build

# ---- build info
stage_info() {
  $PY -c "import json, nf4kit; print(json.dumps(nf4kit.build_info(), indent=1, default=str))" | tee "$WORK/build_info.json"
  $PY -c "import nf4kit; b=nf4kit.build_info(); print('backends', b['backends_available'], 'cuda archs', b['cuda_archs'])" > "$WORK/info.note"
}
export -f stage_info
run_stage info stage_info

# ---- whole test suite on CUDA
stage_tests() {
  local extra=()
  $PY -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout=120)
  local workers=${GPU_CHECK_TEST_WORKERS:-4}
  # --dist load, not loadfile: test_triton_kernels.py autotunes on the GPU (170 s for a third of
  # it on one worker, 2026-11-27c) and must spread over the workers like the other files.
  if [ "$workers" != 0 ] && $PY -c "import xdist" 2>/dev/null; then extra+=(-n "$workers" --dist load); fi
  # tests/conftest.py writes the collected count there: the report's "not reached" after a cut.
  NF4KIT_COLLECTED_FILE="$WORK/collected.txt" \
    $PY -m pytest ${GPU_CHECK_PYTEST_ARGS:-tests} -q -rf -p no:cacheprovider --durations=15 \
    --junitxml="$OUT/junit.xml" "${extra[@]}"
  local rc=$?
  tail -n 1 "$WORK/tests.log" 2>/dev/null | head -c 200 > "$WORK/tests.note"
  return $rc
}
export -f stage_tests
run_stage tests stage_tests

# ---- compute-sanitizer memcheck: every kernel once
stage_sanitizer() {
  local cs; cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  if [ ! -x "$cs" ]; then echo "compute-sanitizer not found" | tee "$WORK/sanitizer.note"; return 3; fi
  # No caching allocator: every tensor is its own cudaMalloc, so an access past its end is seen.
  # One run per backend, cuda first: Triton's JIT under memcheck is slow, and a stage limit that
  # cuts it still leaves the CUDA kernels' verdict.
  local rc=0 b
  : > "$OUT/sanitizer.log"
  for b in ${GPU_CHECK_SANITIZE_BACKENDS:-cuda triton}; do
    echo "## gpu_sanitize --backends $b" >> "$OUT/sanitizer.log"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool memcheck --leak-check no --error-exitcode 99 --print-limit 50 \
      $PY -m benchmarks.gpu_sanitize --backends "$b" 2>&1 | tee -a "$OUT/sanitizer.log"
    local st=${PIPESTATUS[0]}
    [ "$st" != 0 ] && rc=$st
  done
  grep -h "ERROR SUMMARY\|gpu_sanitize:" "$OUT/sanitizer.log" | tr '\n' ' ' > "$WORK/sanitizer.note"
  return $rc
}
export -f stage_sanitizer
run_stage sanitizer stage_sanitizer

# ---- benchmarks
stage_bench() {
  local lim=${STAGE_LIMIT:-100}
  env ${GPU_CHECK_BENCH_ENV:-} $PY -m benchmarks.run --device cuda --json "$OUT/bench.json" --md "$OUT/bench.md" \
    --budget-s $(( lim > 60 ? lim - 35 : lim / 2 )) ${GPU_CHECK_BENCH_ARGS:-}
  local rc=$?
  echo "$(grep -c '"kind": "nf4kit"' "$OUT/bench.json" 2>/dev/null) nf4kit rows" > "$WORK/bench.note"
  return $rc
}
export -f stage_bench
run_stage bench stage_bench

# ---- optional: M = 1 decode sweeps (same timing as bench: L2 read-flush, spin pad, device time)
stage_sweep() {
  SWEEP=$GPU_CHECK_SWEEP $PY -m benchmarks.gpu_sweep 2>&1 | tee "$OUT/sweep.log"
  local rc=${PIPESTATUS[0]}
  echo "$(grep -c ' us ' "$OUT/sweep.log") points" > "$WORK/sweep.note"
  return $rc
}
export -f stage_sweep
[[ " ${ORDER[*]} " == *" sweep "* ]] && run_stage sweep stage_sweep

# ---- optional: Nsight Compute on single decode launches
stage_profile() {
  source benchmarks/_ncu_decode.sh
  NCU_CALL_S=$(( ${STAGE_LIMIT:-100} / $# )) ncu_decode "$OUT/ncu.csv" "$@"
}
export -f stage_profile
[[ " ${ORDER[*]} " == *" profile "* ]] && run_stage profile stage_profile "$GPU_CHECK_NCU"

# ---- logs, report, summary (printed last)
for s in "${ORDER[@]}"; do
  [ -f "$WORK/$s.log" ] && { echo "======== $s"; cat "$WORK/$s.log"; }
done > "$OUT/gpu_check.log"
$PY -m benchmarks.gpu_report --work "$WORK" --out "$OUT" || {
  echo "gpu_report failed; raw stage table:"; cat "$WORK/stages.tsv"; }
echo "total wall time: $(( $(date +%s) - T_START )) s"

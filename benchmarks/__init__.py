"""nf4kit microbenchmarks, the GPU check script and the static kernel report (DESIGN.md §6-§7).

  python -m benchmarks.run            time every kernel through the public API (CPU or CUDA)
  python -m benchmarks.kernel_report  registers / spills / tensor-core and 128-bit load counts,
                                      compiled for sm_80 and sm_90 without a GPU
  benchmarks/gpu_check.sh             everything at once on a lent GPU (build, tests, sanitizer, bench)

Benchmarks are measurements, not tests: nothing here asserts a time.
"""

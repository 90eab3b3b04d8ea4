// The GEMV's per-dtype entry points, between gemv_cuda.cu (the C API: argument checks, dtype switch)
// and the kernels in gemv_kernels.cuh, which gemv_f32.cu, gemv_f16.cu and gemv_bf16.cu compile
// once per activation dtype TX (in parallel: one translation unit held all ~130 kernel instances,
// a minute of nvcc per architecture).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda/common.cuh"

namespace nf4kit {
namespace cuda {

constexpr int kMaxM = 8;          // the row kernels
constexpr int kMmaMaxM = 16;      // the tensor-core GEMVs: two n-tiles of 8 batch rows
constexpr int kMmaGemmMaxM = 64;  // the table GEMM (experimental): x staged for 64 batch rows

template <typename TX>
struct GemvLaunch {
  // gemv_4bit's launch for x, y of type TX, its arguments checked (as in cuda_kernels.h, with am
  // the absmax pointers and log2_bs = log2(blocksize)).
  static int gemv(const void* x, int M, int N, int64_t K, const uint8_t* packed, const detail::Absmax& am,
                  int log2_bs, int quant_type, int rows_per_warp, int depth, int options, int S, float* partial,
                  const float* bias, const float* lora_t, const float* lora_b, int r, void* y, cudaStream_t stream);
  // gemm_table_clusters_fit for x of type TX.
  static int table_clusters_fit(int M, int N, bool compact, int S, int* fits);
  // splitk_finalize for y of type TX.
  static int finalize(const float* partial, int S, int M, int N, const float* bias, const float* lora_t,
                      const float* lora_b, int r, void* y, cudaStream_t stream);
};

}  // namespace cuda
}  // namespace nf4kit

// The decode GEMV's C API (cuda_kernels.h): argument checks and the switch on the activation dtype.
// The kernels, and what each is for, are in gemv_kernels.cuh, compiled once per dtype.
#include "cuda/common.cuh"
#include "cuda/cuda_kernels.h"
#include "cuda/gemv_launch.h"

namespace nf4kit {
namespace cuda {

int splitk_finalize(const float* partial, int S, int M, int N, const float* bias, const float* lora_t,
                    const float* lora_b, int r, void* y, int y_dtype, void* stream) {
  if (S < 1 || M < 1 || N < 1 || partial == nullptr || y == nullptr) return kBadArgument;
  if ((lora_t == nullptr) != (lora_b == nullptr) || (lora_t != nullptr && r < 1)) return kBadArgument;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (y_dtype) {
    case core::kFloat32: return GemvLaunch<float>::finalize(partial, S, M, N, bias, lora_t, lora_b, r, y, s);
    case core::kFloat16: return GemvLaunch<__half>::finalize(partial, S, M, N, bias, lora_t, lora_b, r, y, s);
    case core::kBFloat16:
      return GemvLaunch<__nv_bfloat16>::finalize(partial, S, M, N, bias, lora_t, lora_b, r, y, s);
    default: return kUnsupported;
  }
}

int gemm_table_clusters_fit(int x_dtype, int M, int N, int compact, int S, int* fits) {
  if (fits == nullptr) return kBadArgument;
  *fits = 0;
  if (M < 1 || M > kMmaGemmMaxM || N < 1 || S < 1) return kBadArgument;
  switch (x_dtype) {
    case core::kFloat16: return GemvLaunch<__half>::table_clusters_fit(M, N, compact != 0, S, fits);
    case core::kBFloat16: return GemvLaunch<__nv_bfloat16>::table_clusters_fit(M, N, compact != 0, S, fits);
    default: return kUnsupported;
  }
}

int gemv_4bit(const void* x, int x_dtype, int M, int N, int64_t K, const uint8_t* packed, const float* absmax,
              const uint8_t* absmax_q, const float* nested_absmax, const float* nested_code, const float* offset,
              int blocksize, int quant_type, int rows_per_warp, int depth, int options, int S, float* partial,
              const float* bias, const float* lora_t, const float* lora_b, int r, void* y, void* stream) {
  const int max_m = (options & kGemvMmaGemm) != 0 ? kMmaGemmMaxM : (options & kGemvMma) != 0 ? kMmaMaxM : kMaxM;
  if (M < 1 || M > max_m || N < 1 || K < 32 || (K % 32) != 0) return kUnsupported;
  if ((options & ~(kGemvStream | kGemvMma | kGemvMmaBlockReduce | kGemvMmaGemm | kGemvMmaGemmCompact |
                   kGemvMmaGemmCluster | kGemvMmaCompact | kGemvPdl)) != 0)
    return kBadArgument;  // among them the retired bits 1, 2, 16 and 32
  if ((options & kGemvMmaCompact) != 0 && (options & (kGemvMma | kGemvMmaBlockReduce)) != (kGemvMma | kGemvMmaBlockReduce))
    return kBadArgument;
  if ((options & (kGemvMmaGemmCompact | kGemvMmaGemmCluster)) != 0 && (options & kGemvMmaGemm) == 0) return kBadArgument;
  if ((options & kGemvMmaBlockReduce) != 0 && (options & kGemvMma) == 0) return kBadArgument;
  if (!detail::valid_4bit_blocksize(blocksize) || (quant_type != core::kNF4 && quant_type != core::kFP4))
    return kBadArgument;
  if (S < 1 || (int64_t)S > K / 32) return kBadArgument;
  if (absmax_q ? (!nested_absmax || !nested_code || !offset) : !absmax) return kBadArgument;
  if ((lora_t == nullptr) != (lora_b == nullptr) || (lora_t != nullptr && r < 1)) return kBadArgument;
  if ((reinterpret_cast<uintptr_t>(x) & 15) || (reinterpret_cast<uintptr_t>(packed) & 15)) return kUnsupported;
  const detail::Absmax am{absmax, absmax_q, nested_absmax, nested_code, offset};
  const int log2_bs = detail::log2_exact(blocksize);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (x_dtype) {
    case core::kFloat32:
      return GemvLaunch<float>::gemv(x, M, N, K, packed, am, log2_bs, quant_type, rows_per_warp, depth, options, S,
                                     partial, bias, lora_t, lora_b, r, y, s);
    case core::kFloat16:
      return GemvLaunch<__half>::gemv(x, M, N, K, packed, am, log2_bs, quant_type, rows_per_warp, depth, options, S,
                                      partial, bias, lora_t, lora_b, r, y, s);
    case core::kBFloat16:
      return GemvLaunch<__nv_bfloat16>::gemv(x, M, N, K, packed, am, log2_bs, quant_type, rows_per_warp, depth,
                                             options, S, partial, bias, lora_t, lora_b, r, y, s);
    default:
      return kUnsupported;
  }
}

}  // namespace cuda
}  // namespace nf4kit

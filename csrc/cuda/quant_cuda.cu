// CUDA quantize / dequantize kernels.  Arithmetic from core/nf4_core.h.
#include <cuda_runtime.h>

#include "core/nf4_core.h"
#include "core/status.h"
#include "cuda/cuda_kernels.h"

namespace nf4kit {
namespace cuda {

const char* error_string(int status) { return cudaGetErrorString(static_cast<cudaError_t>(status)); }

namespace {

template <int kDType>
__device__ __forceinline__ float load_f32(const void* p, int64_t i) {
  if (kDType == core::kFloat32) return static_cast<const float*>(p)[i];
  uint16_t h = static_cast<const uint16_t*>(p)[i];
  return kDType == core::kFloat16 ? core::f16_bits_to_f32(h) : core::bf16_bits_to_f32(h);
}

// One warp per block of the 4-bit format; lanes stride over the block's element pairs.
template <int kDType>
__global__ void quantize_4bit_kernel(const void* __restrict__ in, int64_t n, int blocksize, int quant_type,
                                     uint8_t* __restrict__ packed, float* __restrict__ absmax, int64_t nblocks) {
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= nblocks) return;
  const int64_t start = warp * blocksize;
  const int count = (int)((n - start) < blocksize ? (n - start) : blocksize);
  float amax = 0.0f;
  for (int j = lane; j < count; j += 32) amax = fmaxf(amax, fabsf(load_f32<kDType>(in, start + j)));
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if (lane == 0) absmax[warp] = amax;
  const float inv = core::block_inverse(amax);
  for (int j = 2 * lane; j < count; j += 64) {
    uint8_t hi = core::quantize_value(quant_type, load_f32<kDType>(in, start + j), inv);
    uint8_t lo = (j + 1 < count) ? core::quantize_value(quant_type, load_f32<kDType>(in, start + j + 1), inv)
                                 : core::zero_code(quant_type);
    packed[(start + j) >> 1] = core::pack_pair(hi, lo);
  }
}

}  // namespace

int quantize_4bit(const void* in, int in_dtype, int64_t n, int blocksize, int quant_type, uint8_t* packed,
                  float* absmax, void* stream) {
  if (n <= 0 || blocksize <= 0 || (blocksize & 1)) return kBadArgument;
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const int threads = 256;
  const int64_t grid = (nblocks * 32 + threads - 1) / threads;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (in_dtype) {
    case core::kFloat32:
      quantize_4bit_kernel<core::kFloat32><<<grid, threads, 0, s>>>(in, n, blocksize, quant_type, packed, absmax, nblocks);
      break;
    case core::kFloat16:
      quantize_4bit_kernel<core::kFloat16><<<grid, threads, 0, s>>>(in, n, blocksize, quant_type, packed, absmax, nblocks);
      break;
    case core::kBFloat16:
      quantize_4bit_kernel<core::kBFloat16><<<grid, threads, 0, s>>>(in, n, blocksize, quant_type, packed, absmax, nblocks);
      break;
    default:
      return kUnsupported;
  }
  return (int)cudaGetLastError();
}

}  // namespace cuda
}  // namespace nf4kit

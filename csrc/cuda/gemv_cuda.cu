// Decode GEMV for M <= 8: y[M, N] = x[M, K] . deq(W)^T (+ bias, + LoRA), W packed 4-bit.
// Bandwidth-bound: every packed byte of W is read once with 16-byte loads, the codes are
// looked up in a 16-entry shared table, products accumulate in fp32.  Split-K (S splits of
// J chunks per lane) keeps the GPU busy when N is small; partial sums go to an fp32
// scratch buffer [S, M, N] and a small second kernel reduces them and applies the epilogue.
#include "cuda/common.cuh"
#include "cuda/cuda_kernels.h"

namespace nf4kit {
namespace cuda {
namespace {
using namespace detail;

constexpr int kGemvThreads = 128;  // 4 warps, one (row, split) each
constexpr int kMaxM = 8;
constexpr int kMaxJ = 4;

// 32 consecutive activations (16-byte aligned) as fp32.
__device__ __forceinline__ void load_x32(const float* p, float (&v)[32]) {
  const float4* q = reinterpret_cast<const float4*>(p);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float4 f = __ldg(q + i);
    v[4 * i] = f.x; v[4 * i + 1] = f.y; v[4 * i + 2] = f.z; v[4 * i + 3] = f.w;
  }
}
template <typename T>
__device__ __forceinline__ void load_x32(const T* p, float (&v)[32]) {
  const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint4 u = __ldg(q + i);
    unpack2<T>(u.x, v[8 * i], v[8 * i + 1]);
    unpack2<T>(u.y, v[8 * i + 2], v[8 * i + 3]);
    unpack2<T>(u.z, v[8 * i + 4], v[8 * i + 5]);
    unpack2<T>(u.w, v[8 * i + 6], v[8 * i + 7]);
  }
}

// One warp per (row n, split s).  Lane L handles chunks c = s*32*J + j*32 + L (j < J) of
// 32 elements: 16 packed bytes and one absmax each (blocksize >= 32, K % 32 == 0, so a
// chunk lies in one row and one block).  All J weight loads are issued before any math.
template <typename TX>
__global__ void __launch_bounds__(kGemvThreads)
    gemv_4bit_kernel(const TX* __restrict__ x, int M, int N, int64_t K, const uint8_t* __restrict__ packed, Absmax am,
                     int log2_bs, int quant_type, int J, int S, float* __restrict__ partial) {
  __shared__ float table[16];
  init_table(table, quant_type);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t gw = (int64_t)blockIdx.x * (kGemvThreads / 32) + (threadIdx.x >> 5);
  if (gw >= (int64_t)N * S) return;  // whole warps exit together
  const int n = (int)(gw / S);
  const int s = (int)(gw % S);
  const int64_t cpr = K >> 5;  // chunks per row
  const int64_t cbase = (int64_t)s * 32 * J;
  const int64_t row_e = (int64_t)n * K;

  uint4 wq[kMaxJ];
  float sc[kMaxJ];
#pragma unroll
  for (int j = 0; j < kMaxJ; ++j) {
    const int64_t c = cbase + j * 32 + lane;
    wq[j] = make_uint4(0u, 0u, 0u, 0u);
    sc[j] = 0.0f;
    if (j < J && c < cpr) {
      const int64_t e0 = row_e + (c << 5);
      wq[j] = __ldcs(reinterpret_cast<const uint4*>(packed + (e0 >> 1)));  // read once: evict first
      sc[j] = am(e0 >> log2_bs);
    }
  }

  float acc[kMaxM];
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) acc[m] = 0.0f;
#pragma unroll
  for (int j = 0; j < kMaxJ; ++j) {
    const int64_t c = cbase + j * 32 + lane;
    if (j < J && c < cpr) {
      float wv[32];
      lookup32(wq[j], table, wv);
#pragma unroll
      for (int m = 0; m < kMaxM; ++m) {
        if (m < M) {
          float xv[32];
          load_x32(x + (int64_t)m * K + (c << 5), xv);
          float d = 0.0f;
#pragma unroll
          for (int i = 0; i < 32; ++i) d = fmaf(xv[i], wv[i], d);
          acc[m] = fmaf(d, sc[j], acc[m]);  // absmax applied once per chunk
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) {
    if (m < M) {
      float v = acc[m];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) partial[((int64_t)s * M + m) * N + n] = v;
    }
  }
}

// y[m, n] = T(sum_s partial[s, m, n] + bias[n] + sum_j lora_t[m, j] * lora_b[n, j]).
template <typename TX>
__global__ void __launch_bounds__(256)
    gemv_finalize_kernel(const float* __restrict__ partial, int S, int M, int N, const float* __restrict__ bias,
                         const float* __restrict__ lora_t, const float* __restrict__ lora_b, int r,
                         TX* __restrict__ y) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (int64_t)M * N) return;
  const int m = (int)(idx / N), n = (int)(idx % N);
  float v = 0.0f;
  for (int s = 0; s < S; ++s) v += partial[((int64_t)s * M + m) * N + n];
  if (bias != nullptr) v += bias[n];
  if (lora_t != nullptr) {
    float l = 0.0f;
    for (int j = 0; j < r; ++j) l = fmaf(lora_t[(int64_t)m * r + j], lora_b[(int64_t)n * r + j], l);
    v += l;
  }
  y[idx] = from_f32<TX>(v);
}

template <typename TX>
int launch_gemv(const void* x, int M, int N, int64_t K, const uint8_t* packed, Absmax am, int log2_bs, int quant_type,
                int J, int S, float* partial, const float* bias, const float* lora_t, const float* lora_b, int r,
                void* y, cudaStream_t stream) {
  const int64_t warps = (int64_t)N * S;
  const int64_t blocks = (warps + (kGemvThreads / 32) - 1) / (kGemvThreads / 32);
  if (blocks > 0x7fffffff) return kUnsupported;
  gemv_4bit_kernel<TX><<<(unsigned)blocks, kGemvThreads, 0, stream>>>(static_cast<const TX*>(x), M, N, K, packed, am,
                                                                       log2_bs, quant_type, J, S, partial);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return (int)err;
  const int64_t outs = (int64_t)M * N;
  gemv_finalize_kernel<TX><<<(unsigned)((outs + 255) / 256), 256, 0, stream>>>(partial, S, M, N, bias, lora_t, lora_b,
                                                                               r, static_cast<TX*>(y));
  return (int)cudaGetLastError();
}

}  // namespace

int gemv_4bit(const void* x, int x_dtype, int M, int N, int64_t K, const uint8_t* packed, const float* absmax,
              const uint8_t* absmax_q, const float* nested_absmax, const float* nested_code, const float* offset,
              int blocksize, int quant_type, int J, int S, float* partial, const float* bias, const float* lora_t,
              const float* lora_b, int r, void* y, void* stream) {
  if (M < 1 || M > kMaxM || N < 1 || K < 32 || (K % 32) != 0) return kUnsupported;
  if (!detail::valid_4bit_blocksize(blocksize) || (quant_type != core::kNF4 && quant_type != core::kFP4))
    return kBadArgument;
  if (J < 1 || J > kMaxJ || S < 1 || (int64_t)S * 32 * J * 32 < K) return kBadArgument;
  if (absmax_q ? (!nested_absmax || !nested_code || !offset) : !absmax) return kBadArgument;
  if ((lora_t == nullptr) != (lora_b == nullptr) || (lora_t != nullptr && r < 1)) return kBadArgument;
  if ((reinterpret_cast<uintptr_t>(x) & 15) || (reinterpret_cast<uintptr_t>(packed) & 15)) return kUnsupported;
  const Absmax am{absmax, absmax_q, nested_absmax, nested_code, offset};
  const int log2_bs = detail::log2_exact(blocksize);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (x_dtype) {
    case core::kFloat32:
      return launch_gemv<float>(x, M, N, K, packed, am, log2_bs, quant_type, J, S, partial, bias, lora_t, lora_b, r,
                                y, s);
    case core::kFloat16:
      return launch_gemv<__half>(x, M, N, K, packed, am, log2_bs, quant_type, J, S, partial, bias, lora_t, lora_b, r,
                                 y, s);
    case core::kBFloat16:
      return launch_gemv<__nv_bfloat16>(x, M, N, K, packed, am, log2_bs, quant_type, J, S, partial, bias, lora_t,
                                        lora_b, r, y, s);
    default:
      return kUnsupported;
  }
}

}  // namespace cuda
}  // namespace nf4kit

// CUDA quantize / dequantize kernels (4-bit NF4/FP4 and the 8-bit dynamic map).
// Arithmetic from core/nf4_core.h; every kernel is bit-identical to reference.py.
#include "cuda/common.cuh"
#include "cuda/cuda_kernels.h"

namespace nf4kit {
namespace cuda {

const char* error_string(int status) { return cudaGetErrorString(static_cast<cudaError_t>(status)); }

namespace {
using namespace detail;

constexpr int kThreads = 256;

inline unsigned grid_for(int64_t work_items, int threads) {
  int64_t g = (work_items + threads - 1) / threads;
  if (g < 1) g = 1;
  if (g > (int64_t(1) << 30)) g = int64_t(1) << 30;  // the kernels loop over the rest (grid stride)
  return (unsigned)g;
}

// max |src[j]| over j < count, computed by the whole warp (lane strides of 32), in every lane.
template <typename T>
__device__ __forceinline__ float warp_block_absmax(const T* src, int count, int lane) {
  float v = 0.0f;
  for (int j = lane; j < count; j += 32) v = fmaxf(v, fabsf(to_f32(src[j])));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ------------------------------------------------------------------ 4-bit quantize
// One warp per block: warp-level absmax, then each lane encodes element pairs (one byte).
// Blocks have an even size, so a byte never straddles two blocks.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    quantize_4bit_kernel(const T* __restrict__ in, int64_t n, int blocksize, int quant_type,
                         uint8_t* __restrict__ packed, float* __restrict__ absmax, int64_t nblocks) {
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = (int64_t)gridDim.x * (kThreads / 32);
  for (int64_t blk = ((int64_t)blockIdx.x * kThreads + threadIdx.x) >> 5; blk < nblocks; blk += nwarps) {
    const int64_t start = blk * blocksize;
    const int count = (int)(n - start < blocksize ? n - start : blocksize);
    const T* src = in + start;
    const float amax = warp_block_absmax(src, count, lane);
    if (lane == 0) absmax[blk] = amax;
    const float inv = core::block_inverse(amax);  // __frcp_rn: correctly rounded
    uint8_t* dst = packed + (start >> 1);
    for (int j = 2 * lane; j < count; j += 64) {
      const uint8_t hi = core::quantize_value(quant_type, to_f32(src[j]), inv);
      const uint8_t lo =
          j + 1 < count ? core::quantize_value(quant_type, to_f32(src[j + 1]), inv) : core::zero_code(quant_type);
      dst[j >> 1] = core::pack_pair(hi, lo);
    }
  }
}

// ------------------------------------------------------------------ 4-bit dequantize
// Coalesced: per step a lane decodes 16/sizeof(T) consecutive codes (bf16/fp16: 8 codes, one
// 4-byte load; fp32: 4 codes, one 2-byte load) into exactly one 16-byte store, so each warp store
// writes 512 contiguous bytes; 4 or 8 warp-strided steps per tile, all loads issued before the math.
constexpr int kDqTile = 1024;  // elements per warp per tile

template <typename T> struct DqWord { using type = uint32_t; };   // 8 codes
template <> struct DqWord<float> { using type = uint16_t; };       // 4 codes

// Codes of a little-endian packed word (byte i: element 2i high nibble, 2i+1 low) times s.
template <typename T, typename W>
__device__ __forceinline__ void dq_store16(T* out, W w, const float* table, float s) {
  constexpr int kCodes = 2 * (int)sizeof(W);
  float v[kCodes];
#pragma unroll
  for (int i = 0; i < kCodes / 2; ++i) {
    v[2 * i] = __fmul_rn(table[(uint32_t(w) >> (8 * i + 4)) & 15u], s);
    v[2 * i + 1] = __fmul_rn(table[(uint32_t(w) >> (8 * i)) & 15u], s);
  }
  // Plain (not streaming) store: the output is usually read right away by the matmul.
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<float4*>(out) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    *reinterpret_cast<uint4*>(out) =
        make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]), pack2<T>(v[6], v[7]));
  }
}

// The absmaxes of N steps (element e + u * stride), all loads issued together: the branch on
// the state kind is taken once, and the nested decode's dependent map[q] loads overlap.
template <int N>
__device__ __forceinline__ void dq_scales(const Absmax& am, int64_t e, int stride, int log2_bs, float (&s)[N]) {
  if (am.q == nullptr) {
#pragma unroll
    for (int u = 0; u < N; ++u) s[u] = __ldg(am.absmax + ((e + u * stride) >> log2_bs));
  } else {
    uint8_t q[N];
    float nested[N];
#pragma unroll
    for (int u = 0; u < N; ++u) {
      const int64_t b = (e + u * stride) >> log2_bs;
      q[u] = __ldg(am.q + b);
      nested[u] = __ldg(am.nested + b / core::kNestedBlocksize);
    }
    const float offset = __ldg(am.offset);
#pragma unroll
    for (int u = 0; u < N; ++u) s[u] = core::nested_absmax_decode(q[u], am.code, nested[u], offset);  // == am(b)
  }
}

// One warp per tile of kDqTile elements (grid stride); a lane-step's codes are 4/8-aligned and
// blocksize >= 32 is a power of two, so each step needs one absmax (nested decoded in-launch).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    dequantize_4bit_kernel(const uint8_t* __restrict__ packed, Absmax am, int64_t n, int log2_bs, int quant_type,
                           T* __restrict__ out) {
  using W = typename DqWord<T>::type;
  constexpr int kCodes = 2 * (int)sizeof(W);       // 16 / sizeof(T)
  constexpr int kSpan = 32 * kCodes;               // elements per warp step
  constexpr int kSteps = kDqTile / kSpan;          // 4 (16-bit out) or 8 (fp32 out)
  __shared__ float table[16];
  init_table(table, quant_type);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const bool vec_ok = (reinterpret_cast<uintptr_t>(packed) & (sizeof(W) - 1)) == 0 &&
                      (reinterpret_cast<uintptr_t>(out) & 15) == 0;
  const int64_t ntiles = (n + kDqTile - 1) / kDqTile;
  const int64_t nwarps = (int64_t)gridDim.x * (kThreads / 32);
  for (int64_t t = ((int64_t)blockIdx.x * kThreads + threadIdx.x) >> 5; t < ntiles; t += nwarps) {
    const int64_t e = t * kDqTile + lane * kCodes;  // this lane's first element of step 0
    if (vec_ok && (t + 1) * kDqTile <= n) {
      const W* src = reinterpret_cast<const W*>(packed + (e >> 1));
      W w[kSteps];
      float s[kSteps];
#pragma unroll
      for (int u = 0; u < kSteps; ++u) w[u] = __ldcs(src + u * 32);  // streamed once
      dq_scales(am, e, kSpan, log2_bs, s);
#pragma unroll
      for (int u = 0; u < kSteps; ++u) dq_store16<T>(out + e + u * kSpan, w[u], table, s[u]);
    } else {  // last tile, or an unaligned view
      for (int u = 0; u < kSteps; ++u) {
        const int64_t e0 = e + u * kSpan;
        if (e0 >= n) break;
        const float s = am(e0 >> log2_bs);
        if (vec_ok && e0 + kCodes <= n) {
          dq_store16<T>(out + e0, __ldcs(reinterpret_cast<const W*>(packed + (e0 >> 1))), table, s);
        } else {  // element by element
          for (int j = 0; j < kCodes && e0 + j < n; ++j) {
            const uint8_t byte = packed[(e0 + j) >> 1];
            const int code = (j & 1) ? core::low_code(byte) : core::high_code(byte);
            out[e0 + j] = from_f32<T>(__fmul_rn(table[code], s));
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------ 8-bit dynamic map
template <typename T>
__global__ void __launch_bounds__(kThreads)
    quantize_blockwise_kernel(const T* __restrict__ in, int64_t n, int blocksize, const float* __restrict__ code,
                              uint8_t* __restrict__ q, float* __restrict__ absmax, int64_t nblocks) {
  __shared__ float map[256];
  map[threadIdx.x] = code[threadIdx.x];  // kThreads == 256
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = (int64_t)gridDim.x * (kThreads / 32);
  for (int64_t blk = ((int64_t)blockIdx.x * kThreads + threadIdx.x) >> 5; blk < nblocks; blk += nwarps) {
    const int64_t start = blk * blocksize;
    const int count = (int)(n - start < blocksize ? n - start : blocksize);
    const T* src = in + start;
    const float amax = warp_block_absmax(src, count, lane);
    if (lane == 0) absmax[blk] = amax;
    const float inv = core::block_inverse(amax);
    for (int j = lane; j < count; j += 32) q[start + j] = core::dynamic_encode(core::mul_rn(to_f32(src[j]), inv), map);
  }
}

// One thread per 16 codes (one 16-byte load); blocksize >= 16 is a power of two.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    dequantize_blockwise_kernel(const uint8_t* __restrict__ q, const float* __restrict__ absmax,
                                const float* __restrict__ code, int64_t n, int log2_bs, T* __restrict__ out) {
  __shared__ float map[256];
  map[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  const int64_t nchunks = (n + 15) >> 4;
  const bool vec_ok = (reinterpret_cast<uintptr_t>(q) & 15) == 0 && (reinterpret_cast<uintptr_t>(out) & 15) == 0;
  const int64_t stride = (int64_t)gridDim.x * kThreads;
  for (int64_t c = (int64_t)blockIdx.x * kThreads + threadIdx.x; c < nchunks; c += stride) {
    const int64_t e0 = c << 4;
    const float s = __ldg(absmax + (e0 >> log2_bs));
    if (vec_ok && e0 + 16 <= n) {
      const uint4 w = __ldcs(reinterpret_cast<const uint4*>(q + e0));
      float v[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const uint32_t word = i < 4 ? w.x : i < 8 ? w.y : i < 12 ? w.z : w.w;  // resolved at compile time
        v[i] = __fmul_rn(map[(word >> (8 * (i & 3))) & 0xffu], s);
      }
      if constexpr (sizeof(T) == 4) {
        float4* o = reinterpret_cast<float4*>(out + e0);
#pragma unroll
        for (int i = 0; i < 4; ++i) o[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
      } else {
        uint4* o = reinterpret_cast<uint4*>(out + e0);
#pragma unroll
        for (int i = 0; i < 2; ++i)
          o[i] = make_uint4(pack2<T>(v[8 * i], v[8 * i + 1]), pack2<T>(v[8 * i + 2], v[8 * i + 3]),
                            pack2<T>(v[8 * i + 4], v[8 * i + 5]), pack2<T>(v[8 * i + 6], v[8 * i + 7]));
      }
    } else {
      const int count = (int)(n - e0 < 16 ? n - e0 : 16);
      for (int j = 0; j < count; ++j) out[e0 + j] = from_f32<T>(__fmul_rn(map[q[e0 + j]], s));
    }
  }
}

template <template <typename> class Launcher, typename... Args>
int dispatch_dtype(int dtype, Args... args) {
  switch (dtype) {
    case core::kFloat32: Launcher<float>::run(args...); break;
    case core::kFloat16: Launcher<__half>::run(args...); break;
    case core::kBFloat16: Launcher<__nv_bfloat16>::run(args...); break;
    default: return kUnsupported;
  }
  return (int)cudaGetLastError();
}

template <typename T>
struct Quantize4 {
  static void run(const void* in, int64_t n, int blocksize, int quant_type, uint8_t* packed, float* absmax,
                  int64_t nblocks, cudaStream_t s) {
    quantize_4bit_kernel<T><<<grid_for(nblocks * 32, kThreads), kThreads, 0, s>>>(
        static_cast<const T*>(in), n, blocksize, quant_type, packed, absmax, nblocks);
  }
};
template <typename T>
struct Dequantize4 {
  static void run(const uint8_t* packed, Absmax am, int64_t n, int log2_bs, int quant_type, void* out,
                  cudaStream_t s) {
    const int64_t ntiles = (n + kDqTile - 1) / kDqTile;  // one warp per tile
    dequantize_4bit_kernel<T><<<grid_for(ntiles * 32, kThreads), kThreads, 0, s>>>(packed, am, n, log2_bs,
                                                                                  quant_type, static_cast<T*>(out));
  }
};
template <typename T>
struct QuantizeBw {
  static void run(const void* in, int64_t n, int blocksize, const float* code, uint8_t* q, float* absmax,
                  int64_t nblocks, cudaStream_t s) {
    quantize_blockwise_kernel<T><<<grid_for(nblocks * 32, kThreads), kThreads, 0, s>>>(
        static_cast<const T*>(in), n, blocksize, code, q, absmax, nblocks);
  }
};
template <typename T>
struct DequantizeBw {
  static void run(const uint8_t* q, const float* absmax, const float* code, int64_t n, int log2_bs, void* out,
                  cudaStream_t s) {
    dequantize_blockwise_kernel<T><<<grid_for((n + 15) / 16, kThreads), kThreads, 0, s>>>(
        q, absmax, code, n, log2_bs, static_cast<T*>(out));
  }
};

}  // namespace

int quantize_4bit(const void* in, int in_dtype, int64_t n, int blocksize, int quant_type, uint8_t* packed,
                  float* absmax, void* stream) {
  if (n <= 0 || !valid_4bit_blocksize(blocksize) || (quant_type != core::kNF4 && quant_type != core::kFP4))
    return kBadArgument;
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  return dispatch_dtype<Quantize4>(in_dtype, in, n, blocksize, quant_type, packed, absmax, nblocks,
                                   static_cast<cudaStream_t>(stream));
}

int dequantize_4bit(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q, const float* nested_absmax,
                    const float* nested_code, const float* offset, int64_t n, int blocksize, int quant_type,
                    void* out, int out_dtype, void* stream) {
  if (n <= 0 || !valid_4bit_blocksize(blocksize) || (quant_type != core::kNF4 && quant_type != core::kFP4))
    return kBadArgument;
  if (absmax_q ? (!nested_absmax || !nested_code || !offset) : !absmax) return kBadArgument;
  const Absmax am{absmax, absmax_q, nested_absmax, nested_code, offset};
  return dispatch_dtype<Dequantize4>(out_dtype, packed, am, n, detail::log2_exact(blocksize), quant_type, out,
                                     static_cast<cudaStream_t>(stream));
}

int quantize_blockwise(const void* in, int in_dtype, int64_t n, int blocksize, const float* code, uint8_t* q,
                       float* absmax, void* stream) {
  if (n <= 0 || blocksize <= 0 || (blocksize & 1) || blocksize > (1 << 20)) return kBadArgument;
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  return dispatch_dtype<QuantizeBw>(in_dtype, in, n, blocksize, code, q, absmax, nblocks,
                                    static_cast<cudaStream_t>(stream));
}

int dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n, int blocksize,
                         void* out, int out_dtype, void* stream) {
  if (n <= 0 || blocksize < 16 || detail::log2_exact(blocksize) < 0) return kUnsupported;
  return dispatch_dtype<DequantizeBw>(out_dtype, q, absmax, code, n, detail::log2_exact(blocksize), out,
                                      static_cast<cudaStream_t>(stream));
}

}  // namespace cuda
}  // namespace nf4kit

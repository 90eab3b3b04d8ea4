// Device helpers shared by the CUDA kernels: dtype conversion, the code table in
// shared memory, the (possibly double-quantized) block absmax.  Arithmetic is core's.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "core/nf4_core.h"
#include "core/status.h"

namespace nf4kit {
namespace cuda {
namespace detail {

// Code tables (core's literals) in constant memory: copied into shared memory by each
// CTA, since lanes index them with different codes (constant memory would serialise).
static __constant__ float kCodeTables[2][16] = {NF4KIT_NF4_VALUES, NF4KIT_FP4_VALUES};

template <int D> struct DTypeOf;
template <> struct DTypeOf<core::kFloat32> { using T = float; };
template <> struct DTypeOf<core::kFloat16> { using T = __half; };
template <> struct DTypeOf<core::kBFloat16> { using T = __nv_bfloat16; };

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round to nearest even, as torch's .to(dtype) does.
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Two 16-bit values as one 32-bit word (the first in the low half: memory order).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  return (uint32_t)__half_as_ushort(__float2half_rn(lo)) | ((uint32_t)__half_as_ushort(__float2half_rn(hi)) << 16);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  return (uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(lo)) |
         ((uint32_t)__bfloat16_as_ushort(__float2bfloat16_rn(hi)) << 16);
}

// 16-bit word pair -> two floats (exact).
template <typename T> __device__ __forceinline__ void unpack2(uint32_t w, float& lo, float& hi);
template <> __device__ __forceinline__ void unpack2<__nv_bfloat16>(uint32_t w, float& lo, float& hi) {
  lo = __uint_as_float(w << 16);
  hi = __uint_as_float(w & 0xffff0000u);
}
template <> __device__ __forceinline__ void unpack2<__half>(uint32_t w, float& lo, float& hi) {
  __half2 h = *reinterpret_cast<__half2*>(&w);
  float2 f = __half22float2(h);
  lo = f.x;
  hi = f.y;
}

// Store 32 consecutive outputs (v[j] already the fp32 product) at a 16-byte aligned address,
// rounding each once into T.
template <typename T> __device__ __forceinline__ void store32(T* out, const float (&v)[32]);
template <> __device__ __forceinline__ void store32<float>(float* out, const float (&v)[32]) {
  float4* o = reinterpret_cast<float4*>(out);
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
}
template <typename T> __device__ __forceinline__ void store32(T* out, const float (&v)[32]) {
  uint4* o = reinterpret_cast<uint4*>(out);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    o[i] = make_uint4(pack2<T>(v[8 * i], v[8 * i + 1]), pack2<T>(v[8 * i + 2], v[8 * i + 3]),
                      pack2<T>(v[8 * i + 4], v[8 * i + 5]), pack2<T>(v[8 * i + 6], v[8 * i + 7]));
  }
}

// Fill a 16-entry shared table (call from >= 16 threads, then __syncthreads()).
__device__ __forceinline__ void init_table(float* table, int quant_type) {
  if (threadIdx.x < 16) table[threadIdx.x] = kCodeTables[quant_type == core::kNF4 ? 0 : 1][threadIdx.x];
}

// Unpack 16 packed bytes (32 codes, high nibble first) into table values.
__device__ __forceinline__ void lookup32(const uint4& w, const float* table, float (&v)[32]) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const uint32_t byte = (words[i] >> (8 * b)) & 0xffu;
      v[8 * i + 2 * b] = table[byte >> 4];
      v[8 * i + 2 * b + 1] = table[byte & 15u];
    }
  }
}

// The fp32 absmax of a 4-bit block: stored, or decoded from the double quantization
// (core::nested_absmax_decode: one rounded multiply, then one rounded add; no FMA).
struct Absmax {
  const float* absmax;
  const uint8_t* q;
  const float* nested;
  const float* code;
  const float* offset;
  __device__ __forceinline__ float operator()(int64_t block) const {
    if (q == nullptr) return __ldg(absmax + block);
    return core::nested_absmax_decode(__ldg(q + block), code, __ldg(nested + (block / core::kNestedBlocksize)),
                                      __ldg(offset));
  }
};

inline int log2_exact(int64_t v) {
  int l = 0;
  while ((int64_t(1) << l) < v) ++l;
  return (int64_t(1) << l) == v ? l : -1;
}

// D = A . B + D on tensor cores, m16n8k16, fp16 or bf16 fragments, fp32 accumulators (PTX ISA fragment
// layouts: A row-major 16x16 in 4 x 2 halves per lane, B column-major 16x8 in 2 x 2, C/D 16x8 in 4 floats).
template <typename T> __device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                                     const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                              const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Programmatic dependent launch (sm_90+; PTX griddepcontrol).  A kernel that calls
// pdl_launch_dependents lets the next kernel on the stream, if that one was launched with
// programmatic stream serialization, be scheduled before it has finished; that kernel calls pdl_wait
// before touching memory, which returns once this grid has completed and its writes are visible.
// Both are no-ops for an ordinary launch, and compile to nothing below sm_90.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Thread-block clusters (sm_90+; PTX barrier.cluster, mapa): the blocks of a cluster are co-scheduled
// and read each other's shared memory.  cluster_sync is a barrier of every thread of the cluster that
// orders its shared-memory writes before the reads after it (release / acquire); cluster_ld_f32 reads
// the float at shared address `addr` of the cluster's block `rank`.  Below sm_90 they trap: the host
// launches clusters on sm_90+ only.
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
#endif
  return r;
}
__device__ __forceinline__ float cluster_ld_f32(uint32_t addr, uint32_t rank) {
  float v = 0.0f;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(addr), "r"(rank));
  // No memory clobber: kept between the cluster barriers (volatile asm keeps its order), while the
  // caller's other loads and stores may overlap it.
  asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(remote));
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
  return v;
}

inline bool valid_4bit_blocksize(int blocksize) {
  return blocksize >= 32 && blocksize <= 4096 && log2_exact(blocksize) >= 0;
}

}  // namespace detail
}  // namespace cuda
}  // namespace nf4kit

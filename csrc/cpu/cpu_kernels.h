// C++ CPU kernels.  Pointers are raw; Python (nf4kit/backends/cpu.py) validates every
// shape and dtype before calling, so these functions trust their sizes.
//
// Each entry point in namespace nf4kit::cpu picks, at run time, the best implementation the
// CPU has: AVX-512 (csrc/cpu/*_avx512.cpp, namespace nf4kit::cpu::avx512: 4-bit dequantize
// and the fused GEMVs; needs AVX-512 F/BW/VL plus the AVX2 set), then AVX2
// (csrc/cpu/*_avx2.cpp, nf4kit::cpu::avx2: AVX2 + FMA + F16C), then the portable code.
// All are bit-identical for the quantize/dequantize ops.
#pragma once
#include <stdint.h>

namespace nf4kit {
namespace cpu {

// The 4-bit quant state as the kernels read it.  Plain: absmax fp32 [nblocks].  Nested
// (absmax_q != nullptr): absmax_q uint8 [nblocks], nested_absmax fp32 [ceil(nblocks/256)],
// nested_code fp32 [256], offset fp32 [1]; absmax must then be nullptr.
struct Q4Args {
  const uint8_t* packed;
  const float* absmax;
  const uint8_t* absmax_q;
  const float* nested_absmax;
  const float* nested_code;
  const float* offset;
  int64_t n;        // elements in the whole quantized tensor
  int blocksize;
  int quant_type;
};

// Run-time ISA level: 0 generic, 1 AVX2 (AVX2, FMA, F16C), 2 AVX-512 (AVX2 set + AVX-512
// F/BW/VL).  Environment: NF4KIT_CPU_GENERIC=1 forces 0; NF4KIT_CPU_ISA=generic|avx2|avx512
// caps the level (never above what the CPU has).  Read once, at the first call.
int isa_level();
// Benchmarks / tests: cap the level at run time (0, 1, 2; never above the detected one).
// Returns the level now in force.  Not meant to be called while kernels run.
int set_isa_cap(int level);
// True when the AVX2 kernels (level >= 1) / AVX-512 kernels (level 2) run.
bool use_avx2();
bool use_avx512();
// Which implementation serves calls: "avx512", "avx2" or "generic".
const char* isa();

// A [n] (dtype in_dtype: core::DType) -> packed [(n+1)/2] uint8, absmax [ceil(n/blocksize)] fp32.
int quantize_4bit(const void* in, int in_dtype, int64_t n, int blocksize, int quant_type,
                  uint8_t* packed, float* absmax);

// packed [(n+1)/2] -> out [n] (out_dtype).  See Q4Args for plain / nested state.
int dequantize_4bit(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q,
                    const float* nested_absmax, const float* nested_code, const float* offset,
                    int64_t n, int blocksize, int quant_type, void* out, int out_dtype);

// A tile of a quantized [N, K] weight (flattened row-major, q.n == N*K): rows [n0, n1),
// columns [k0, k1) -> out row-major [n1-n0, k1-k0] in out_dtype.  Bit-identical to the same
// elements of dequantize_4bit.
int dequantize_4bit_tile(const Q4Args& q, int64_t N, int64_t K, int64_t n0, int64_t n1, int64_t k0,
                         int64_t k1, void* out, int out_dtype);

// 8-bit dynamic-map blockwise quantization: A [n] fp32/fp16/bf16 -> q [n] uint8, absmax fp32.
int quantize_blockwise(const void* in, int in_dtype, int64_t n, int blocksize, const float* code,
                       uint8_t* q, float* absmax);
int dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                         int blocksize, void* out, int out_dtype);

// Textbook absmax int8.  blocksize 0 = one block for the whole tensor.
//   c = fp32(fp32(1 / max(absmax, 1e-30)) * 127)   (what torch computes for 127.0 / t)
//   q = clamp(round_half_even(fp32(x * c)), -127, 127)
int quantize_absmax_int8(const void* in, int in_dtype, int64_t n, int64_t blocksize, int8_t* q, float* absmax);
//   out = T(fp32(q) * fp32(absmax / 127))
int dequantize_absmax_int8(const int8_t* q, const float* absmax, int64_t n, int64_t blocksize, void* out,
                           int out_dtype);

// Fused small-M forward: y [M, N] fp32 = x [M, K] fp32 · deq(W [N, K])ᵀ (+ bias fp32 [N] if
// given).  W is decoded on the fly (fp32 accumulation); the dequantized weight is never
// stored.  AVX2 / AVX-512 only (kUnsupported on the generic path).
int gemv_4bit(const float* x, int64_t M, const Q4Args& q, int64_t N, int64_t K, const float* bias, float* y);

// Fused small-M backward: dx [M, K] fp32 = dy [M, N] fp32 · deq(W [N, K]).  AVX2 only.
int gemv_t_4bit(const float* dy, int64_t M, const Q4Args& q, int64_t N, int64_t K, float* dx);

namespace avx2 {
int quantize_4bit(const void* in, int in_dtype, int64_t n, int blocksize, int quant_type,
                  uint8_t* packed, float* absmax);
int dequantize_4bit(const Q4Args& q, void* out, int out_dtype);
int dequantize_4bit_tile(const Q4Args& q, int64_t N, int64_t K, int64_t n0, int64_t n1, int64_t k0,
                         int64_t k1, void* out, int out_dtype);
int quantize_blockwise(const void* in, int in_dtype, int64_t n, int blocksize, const float* code,
                       uint8_t* q, float* absmax);
int dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                         int blocksize, void* out, int out_dtype);
int quantize_absmax_int8(const void* in, int in_dtype, int64_t n, int64_t blocksize, int8_t* q, float* absmax);
int dequantize_absmax_int8(const int8_t* q, const float* absmax, int64_t n, int64_t blocksize, void* out,
                           int out_dtype);
int gemv_4bit(const float* x, int64_t M, const Q4Args& q, int64_t N, int64_t K, const float* bias, float* y);
int gemv_t_4bit(const float* dy, int64_t M, const Q4Args& q, int64_t N, int64_t K, float* dx);
}  // namespace avx2

namespace avx512 {
int dequantize_4bit(const Q4Args& q, void* out, int out_dtype);
int dequantize_4bit_tile(const Q4Args& q, int64_t N, int64_t K, int64_t n0, int64_t n1, int64_t k0,
                         int64_t k1, void* out, int out_dtype);
int gemv_4bit(const float* x, int64_t M, const Q4Args& q, int64_t N, int64_t K, const float* bias, float* y);
int gemv_t_4bit(const float* dy, int64_t M, const Q4Args& q, int64_t N, int64_t K, float* dx);
}  // namespace avx512

// Linux: ask for transparent huge pages on the 2 MiB-aligned interior of a large fresh
// output buffer before the first write.  A freshly mmapped buffer costs one page fault
// per 4 KiB otherwise, which on this kind of machine halves the write bandwidth.
void advise_hugepages(void* p, int64_t bytes);

}  // namespace cpu
}  // namespace nf4kit

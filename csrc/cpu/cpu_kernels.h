// C++ CPU kernels.  Pointers are raw; Python (nf4kit/backends/cpu.py) validates every
// shape and dtype before calling, so these functions trust their sizes.
#pragma once
#include <stdint.h>

namespace nf4kit {
namespace cpu {

// A [n] (dtype in_dtype: core::DType) -> packed [(n+1)/2] uint8, absmax [ceil(n/blocksize)] fp32.
int quantize_4bit(const void* in, int in_dtype, int64_t n, int blocksize, int quant_type,
                  uint8_t* packed, float* absmax);

// packed [(n+1)/2] -> out [n] (out_dtype).  Plain state: absmax fp32 [nblocks].  Nested
// state (absmax_q != nullptr): absmax_q uint8 [nblocks], nested_absmax fp32
// [ceil(nblocks/256)], nested_code fp32 [256], offset fp32 [1]; absmax must be nullptr.
int dequantize_4bit(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q,
                    const float* nested_absmax, const float* nested_code, const float* offset,
                    int64_t n, int blocksize, int quant_type, void* out, int out_dtype);

// 8-bit dynamic-map blockwise quantization: A [n] fp32/fp16/bf16 -> q [n] uint8, absmax fp32.
int quantize_blockwise(const void* in, int in_dtype, int64_t n, int blocksize, const float* code,
                       uint8_t* q, float* absmax);
int dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                         int blocksize, void* out, int out_dtype);

}  // namespace cpu
}  // namespace nf4kit

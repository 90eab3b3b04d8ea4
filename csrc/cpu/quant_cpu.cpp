// Portable CPU quantize / dequantize kernels: OpenMP over blocks, scalar inner loops
// written so the compiler vectorises them.  Arithmetic comes from core/nf4_core.h.
#include <math.h>
#include <string.h>

#include "core/nf4_core.h"
#include "core/status.h"
#include "cpu/cpu_kernels.h"

namespace nf4kit {
namespace cpu {
namespace {

inline float load_as_f32(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case core::kFloat32: return static_cast<const float*>(p)[i];
    case core::kFloat16: return core::f16_bits_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return core::bf16_bits_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
}

// Writes out[i..i+count) = values[0..count) converted to dtype.
inline void store_from_f32(void* p, int dtype, int64_t i, const float* values, int count) {
  if (dtype == core::kFloat32) {
    memcpy(static_cast<float*>(p) + i, values, sizeof(float) * count);
  } else if (dtype == core::kFloat16) {
    uint16_t* o = static_cast<uint16_t*>(p) + i;
    for (int j = 0; j < count; ++j) o[j] = core::f32_to_f16_bits(values[j]);
  } else {
    uint16_t* o = static_cast<uint16_t*>(p) + i;
    for (int j = 0; j < count; ++j) o[j] = core::f32_to_bf16_bits(values[j]);
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

int quantize_4bit(const void* in, int in_dtype, int64_t n, int blocksize, int quant_type,
                  uint8_t* packed, float* absmax) {
  if (n <= 0 || blocksize <= 0 || (blocksize & 1)) return kBadArgument;
  const int64_t nblocks = ceil_div(n, blocksize);
  // Blocks have an even size, so every block starts on a byte boundary.
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t start = b * blocksize;
    const int64_t count = (n - start < blocksize) ? n - start : blocksize;
    float amax = 0.0f;
    for (int64_t j = 0; j < count; ++j) amax = fmaxf(amax, fabsf(load_as_f32(in, in_dtype, start + j)));
    absmax[b] = amax;
    const float inv = core::block_inverse(amax);
    for (int64_t j = 0; j < count; j += 2) {
      uint8_t hi = core::quantize_value(quant_type, load_as_f32(in, in_dtype, start + j), inv);
      uint8_t lo = (j + 1 < count) ? core::quantize_value(quant_type, load_as_f32(in, in_dtype, start + j + 1), inv)
                                   : core::zero_code(quant_type);
      packed[(start + j) >> 1] = core::pack_pair(hi, lo);
    }
  }
  return kOk;
}

int dequantize_4bit(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q,
                    const float* nested_absmax, const float* nested_code, const float* offset,
                    int64_t n, int blocksize, int quant_type, void* out, int out_dtype) {
  if (n <= 0 || blocksize <= 0 || (blocksize & 1)) return kBadArgument;
  if (absmax == nullptr && (absmax_q == nullptr || nested_absmax == nullptr || nested_code == nullptr ||
                            offset == nullptr))
    return kBadArgument;
  const int64_t nblocks = ceil_div(n, blocksize);
  float table[16];
  for (int c = 0; c < 16; ++c) table[c] = core::code_value(quant_type, c);
  const float off = offset ? *offset : 0.0f;
#pragma omp parallel
  {
    float buf[4096];
#pragma omp for schedule(static)
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t start = b * blocksize;
      const int count = (int)((n - start < blocksize) ? n - start : blocksize);
      const float scale = absmax ? absmax[b]
                                 : core::nested_absmax_decode(absmax_q[b], nested_code,
                                                              nested_absmax[b / core::kNestedBlocksize], off);
      const uint8_t* src = packed + (start >> 1);
      for (int j = 0; j < count / 2; ++j) {
        buf[2 * j] = table[core::high_code(src[j])] * scale;
        buf[2 * j + 1] = table[core::low_code(src[j])] * scale;
      }
      if (count & 1) buf[count - 1] = table[core::high_code(src[count / 2])] * scale;
      store_from_f32(out, out_dtype, start, buf, count);
    }
  }
  return kOk;
}

int quantize_blockwise(const void* in, int in_dtype, int64_t n, int blocksize, const float* code,
                       uint8_t* q, float* absmax) {
  if (n <= 0 || blocksize <= 0) return kBadArgument;
  const int64_t nblocks = ceil_div(n, blocksize);
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t start = b * blocksize;
    const int64_t count = (n - start < blocksize) ? n - start : blocksize;
    float amax = 0.0f;
    for (int64_t j = 0; j < count; ++j) amax = fmaxf(amax, fabsf(load_as_f32(in, in_dtype, start + j)));
    absmax[b] = amax;
    const float inv = core::block_inverse(amax);
    for (int64_t j = 0; j < count; ++j)
      q[start + j] = core::dynamic_encode(core::mul_rn(load_as_f32(in, in_dtype, start + j), inv), code);
  }
  return kOk;
}

int dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                         int blocksize, void* out, int out_dtype) {
  if (n <= 0 || blocksize <= 0) return kBadArgument;
  const int64_t nblocks = ceil_div(n, blocksize);
#pragma omp parallel
  {
    float buf[4096];
#pragma omp for schedule(static)
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t start = b * blocksize;
      const int64_t total = (n - start < blocksize) ? n - start : blocksize;
      for (int64_t done = 0; done < total; done += 4096) {
        const int count = (int)((total - done < 4096) ? total - done : 4096);
        for (int j = 0; j < count; ++j) buf[j] = code[q[start + done + j]] * absmax[b];
        store_from_f32(out, out_dtype, start + done, buf, count);
      }
    }
  }
  return kOk;
}

}  // namespace cpu
}  // namespace nf4kit

// nf4kit core arithmetic: the single definition of the 4-bit format shared by the
// C++ CPU kernels and the CUDA kernels (and mirrored, value for value, by
// python/nf4kit/format.py and reference.py).
//
// Everything here is __host__ __device__ inline and free of libtorch.  Values are
// written as hex float literals so that host and device see the same fp32 bits.
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define NF4_HD __host__ __device__ __forceinline__
#else
#define NF4_HD inline
#endif

namespace nf4kit {
namespace core {

enum QuantType : int { kNF4 = 0, kFP4 = 1 };
// Output / input dtype codes, shared with python/nf4kit/backends/_native.py.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Block of the nested (double-quant) absmax: fixed by the bitsandbytes format.
constexpr int kNestedBlocksize = 256;

// ---------------------------------------------------------------- code tables
// NF4 code -> value (bitsandbytes get_4bit_type("nf4"), as fp32).
#define NF4KIT_NF4_VALUES                                                        \
  {-0x1.000000p+0f, -0x1.647362p-1f, -0x1.0cd660p-1f, -0x1.946540p-2f,          \
   -0x1.23449ap-2f, -0x1.7a6a7ep-3f, -0x1.74f0e2p-4f, 0x0.0p+0f,                \
   0x1.45f5fep-4f,  0x1.4995c6p-3f,  0x1.f809bap-3f,  0x1.5a0674p-2f,           \
   0x1.c34970p-2f,  0x1.200f56p-1f,  0x1.722766p-1f,  0x1.000000p+0f}

// FP4 code -> value: [0, 0.0625, 8, 12, 4, 6, 2, 3] / 12, codes 8..15 negated
// (code 8 is +0.0, as bitsandbytes stores it).
#define NF4KIT_FP4_VALUES                                                        \
  {0x0.0p+0f,       0x1.555556p-8f,  0x1.555556p-1f,  0x1.000000p+0f,           \
   0x1.555556p-2f,  0x1.000000p-1f,  0x1.555556p-3f,  0x1.000000p-2f,           \
   0x0.0p+0f,       -0x1.555556p-8f, -0x1.555556p-1f, -0x1.000000p+0f,          \
   -0x1.555556p-2f, -0x1.000000p-1f, -0x1.555556p-3f, -0x1.000000p-2f}

// The code of 0.0: fills all-zero blocks and the padding nibble of an odd count.
NF4_HD uint8_t zero_code(int quant_type) { return quant_type == kNF4 ? 7 : 0; }

NF4_HD float code_value(int quant_type, int code) {
  const float nf4[16] = NF4KIT_NF4_VALUES;
  const float fp4[16] = NF4KIT_FP4_VALUES;
  return quant_type == kNF4 ? nf4[code & 15] : fp4[code & 15];
}

// ---------------------------------------------------------------- encoding
// code = number of the 15 fp32 midpoints (between neighbouring sorted table values)
// strictly below xn: ties go to the lower code.  Written as a 4-level decision tree
// so that it needs no table in memory on the device.
NF4_HD uint8_t nf4_encode(float x) {
  if (x > 0x1.45f5fep-5f) {                      // > t7
    if (x > 0x1.8ea7f2p-2f) {                    // > t11
      if (x > 0x1.491b5ep-1f) return x > 0x1.b913b4p-1f ? 15 : 14;   // t13, t14
      return x > 0x1.00da08p-1f ? 13 : 12;                           // t12
    }
    if (x > 0x1.a0cfc0p-3f) return x > 0x1.2b05a8p-2f ? 11 : 10;     // t9, t10
    return x > 0x1.ec90c4p-4f ? 9 : 8;                               // t8
  }
  if (x > -0x1.5bd4ecp-2f) {                     // > t3
    if (x > -0x1.1a7178p-3f) return x > -0x1.74f0e2p-5f ? 7 : 6;     // t5, t6
    return x > -0x1.e079d8p-3f ? 5 : 4;                              // t4
  }
  if (x > -0x1.38a4e0p-1f) return x > -0x1.d70900p-2f ? 3 : 2;       // t1, t2
  return x > -0x1.b239b0p-1f ? 1 : 0;                                // t0
}

// FP4: the same rule over the value-sorted table; the leaf is the sorted position
// mapped back to its code (sorted order 11,10,13,12,15,14,9,0,8,1,6,7,4,5,2,3).
NF4_HD uint8_t fp4_encode(float x) {
  if (x > 0x0.0p+0f) {                           // > s7 (the midpoint of the two zeros)
    if (x > 0x1.2aaaacp-2f) {                    // > s11
      if (x > 0x1.2aaaacp-1f) return x > 0x1.aaaaacp-1f ? 3 : 2;     // s13, s14
      return x > 0x1.aaaaacp-2f ? 5 : 4;                             // s12
    }
    if (x > 0x1.600000p-4f) return x > 0x1.aaaaacp-3f ? 7 : 6;       // s9, s10
    return x > 0x1.555556p-9f ? 1 : 8;                               // s8
  }
  if (x > -0x1.2aaaacp-2f) {                     // > s3
    if (x > -0x1.600000p-4f) return x > -0x1.555556p-9f ? 0 : 9;     // s5, s6
    return x > -0x1.aaaaacp-3f ? 14 : 15;                            // s4
  }
  if (x > -0x1.2aaaacp-1f) return x > -0x1.aaaaacp-2f ? 12 : 13;     // s1, s2
  return x > -0x1.aaaaacp-1f ? 10 : 11;                              // s0
}

NF4_HD uint8_t encode(int quant_type, float xn) {
  return quant_type == kNF4 ? nf4_encode(xn) : fp4_encode(xn);
}

// Correctly rounded fp32 reciprocal (no rcp.approx on the device).
NF4_HD float reciprocal_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __frcp_rn(a);
#else
  return 1.0f / a;
#endif
}

// Multiply / add without FMA contraction (the double-quant decode must be one fp32
// multiply followed by one fp32 add on every backend).
NF4_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;  // host code is compiled with -ffp-contract=off
#endif
}
NF4_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// Reciprocal used to normalise a block: 1 / max(absmax, 1e-38), correctly rounded.
// The clamp (as bitsandbytes does) keeps an all-zero block at xn = 0, so it encodes
// every element as the code of 0.0, and keeps tiny subnormal blocks finite.
NF4_HD float block_inverse(float absmax) {
  return reciprocal_rn(absmax > 1e-38f ? absmax : 1e-38f);
}

NF4_HD uint8_t quantize_value(int quant_type, float x, float inv_absmax) {
  return encode(quant_type, mul_rn(x, inv_absmax));
}

// ---------------------------------------------------------------- packing
NF4_HD uint8_t pack_pair(uint8_t first, uint8_t second) {
  return (uint8_t)((first << 4) | (second & 15));
}
NF4_HD uint8_t high_code(uint8_t byte) { return byte >> 4; }   // element 2i
NF4_HD uint8_t low_code(uint8_t byte) { return byte & 15; }    // element 2i+1

// Code of element g of a packed tensor (element 2i in the high nibble of byte i).
NF4_HD int code_at(const uint8_t* packed, int64_t g) {
  const uint8_t b = packed[g >> 1];
  return (g & 1) ? low_code(b) : high_code(b);
}

// ---------------------------------------------------------------- 8-bit dynamic map
// Nearest entry of a sorted 256-value map: the number of the 255 midpoints
// (map[i] + map[i+1]) * 0.5 strictly below x (ties to the lower code).
NF4_HD uint8_t dynamic_encode(float x, const float* map) {
  int lo = 0, hi = 255;
  while (lo < hi) {
    int mid = (lo + hi) >> 1;
    float m = mul_rn(add_rn(map[mid], map[mid + 1]), 0.5f);
    if (m < x) lo = mid + 1; else hi = mid;
  }
  return (uint8_t)lo;
}

// Reconstructed block absmax of a double-quantized state from its code's value map[q]:
// fp32(map[q] * nested_absmax[block / 256]) then + offset, as two roundings.
NF4_HD float nested_absmax_from_code(float code_value, float nested_absmax, float offset) {
  return add_rn(mul_rn(code_value, nested_absmax), offset);
}
NF4_HD float nested_absmax_decode(uint8_t q, const float* map, float nested_absmax, float offset) {
  return nested_absmax_from_code(map[q], nested_absmax, offset);
}

// Per-block absmax of a plain (absmax != nullptr) or double-quantized state.
struct BlockScales {
  const float* absmax;
  const uint8_t* absmax_q;
  const float* nested_absmax;
  const float* nested_code;
  float offset;
  NF4_HD float operator()(int64_t b) const {
    if (absmax) return absmax[b];
    return nested_absmax_decode(absmax_q[b], nested_code, nested_absmax[b / kNestedBlocksize], offset);
  }
};

// ---------------------------------------------------------------- dtype conversion
NF4_HD uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
NF4_HD float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

// fp32 -> bf16, round to nearest even; NaN stays a quiet NaN (as torch does).
NF4_HD uint16_t f32_to_bf16_bits(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
NF4_HD float bf16_bits_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

// fp32 -> fp16, round to nearest even, subnormals and overflow to inf included.
NF4_HD uint16_t f32_to_f16_bits(float f) {
  uint32_t x = f32_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return (uint16_t)(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);          // rounds to inf (>= 65520)
  if (ax < 0x38800000u) {                                            // below 2^-14: subnormal
    // Adding 0.5 puts the fp16 subnormal step (2^-24) at the fp32 ulp: the hardware
    // add does the round to nearest even for us.
    float t = bits_f32(ax) + 0.5f;
    return (uint16_t)(sign | (f32_bits(t) - 0x3f000000u));
  }
  uint32_t odd = (ax >> 13) & 1u;
  ax += 0xc8000fffu + odd;                                           // rebias (-112 << 23), round
  return (uint16_t)(sign | (ax >> 13));
}
NF4_HD float f16_bits_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) {  // zero / subnormal: exact in fp32
    float v = (float)mant * 0x1p-24f;
    return bits_f32(f32_bits(v) | sign);
  }
  if (exp == 31) return bits_f32(sign | 0x7f800000u | (mant << 13));
  return bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

}  // namespace core
}  // namespace nf4kit

// AVX2 + FMA + F16C CPU kernels (this file is compiled with -mavx2 -mfma -mf16c and only
// called after quant_cpu.cpp checked the CPU at run time).
//
// Bit-exact ops (quantize / dequantize) use exactly the arithmetic of core/nf4_core.h:
//   * dequant: one fp32 multiply table[code] * absmax, then one rounding to the output dtype
//     (RNE: bf16 by integer rounding, fp16 by F16C's round-to-nearest-even conversion);
//   * nested absmax: fp32 multiply then fp32 add, never an FMA (scalar, per block);
//   * quantize: xn = x * fp32(1/absmax) (one multiply), code = number of fp32 midpoints < xn.
// FMA is used only in the matmul kernels, whose results are compared with a tolerance.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

// The core header's inline functions are compiled here with AVX2 enabled.  Including it
// inside an anonymous namespace gives these copies internal linkage, so the linker can never
// pick an AVX2-encoded copy for the generic translation unit (which runs on any x86-64).
namespace {
#include "core/nf4_core.h"
namespace acore = ::nf4kit::core;
}  // namespace

#include "core/status.h"
#include "cpu/cpu_kernels.h"

namespace nf4kit {
namespace cpu {
namespace avx2 {
namespace {

// ---------------------------------------------------------------- code tables
struct Tables {
  __m256 lo, hi;  // table[0..7], table[8..15]
};

// 16-entry lookup: two 8-entry permutes (low 3 bits of the code) and a blend on bit 3.
NF4_AI __m256 lut16(__m256i codes, const Tables& t) {
  const __m256 lo = _mm256_permutevar8x32_ps(t.lo, codes);
  const __m256 hi = _mm256_permutevar8x32_ps(t.hi, codes);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));
}

// Codes of 8 consecutive elements starting at an even element index (byte p[0] holds the
// first two): 4 bytes, high nibble first.
NF4_AI __m256i codes8_even(const uint8_t* p) {
  uint32_t w;
  memcpy(&w, p, 4);
  const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32((int)w), _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24));
  return _mm256_and_si256(v, _mm256_set1_epi32(15));
}

// Codes of 8 consecutive elements starting at an odd element index (the low nibble of p[0]):
// 5 bytes.  Swapping the nibbles of every byte puts element e at bits 4e..4e+3.
NF4_AI __m256i codes8_odd(const uint8_t* p) {
  uint64_t w = 0;
  memcpy(&w, p, 5);
  const uint64_t m = 0x0F0F0F0F0F0F0F0FULL;
  const uint64_t s = ((w >> 4) & m) | ((w & m) << 4);
  const uint32_t e = (uint32_t)(s >> 4);
  const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32((int)e), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
  return _mm256_and_si256(v, _mm256_set1_epi32(15));
}

using acore::code_at;

// ---------------------------------------------------------------- per-call decoder
// What the 4-bit kernels read for every element: the code table (as two vectors for lut16,
// and as floats for single elements) and the per-block scales (plain or nested decode, two
// roundings: -ffp-contract=off keeps it so despite -mfma in this file).
struct Decoder {
  float table[16];
  Tables t;
  acore::BlockScales sc;
  explicit Decoder(const Q4Args& q) : sc(block_scales<acore::BlockScales>(q)) {
    for (int c = 0; c < 16; ++c) table[c] = acore::code_value(q.quant_type, c);
    t = Tables{_mm256_loadu_ps(table), _mm256_loadu_ps(table + 8)};
  }
};

// ---------------------------------------------------------------- output conversion
NF4_AI void store8(void* out, int dtype, int64_t i, __m256 v) {
  if (dtype == acore::kFloat32) {
    _mm256_storeu_ps(static_cast<float*>(out) + i, v);
    return;
  }
  uint16_t* o = static_cast<uint16_t*>(out) + i;
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  if (dtype == acore::kFloat16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    // bf16, round to nearest even: u + 0x7fff + ((u >> 16) & 1), keep the high half.
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o),
                     _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
  }
  if (__builtin_expect(_mm256_movemask_ps(nan) != 0, 0)) {
    // NaN (only from a NaN / inf absmax): the core's scalar rule for the exact bits.
    float f[8];
    _mm256_storeu_ps(f, v);
    for (int j = 0; j < 8; ++j)
      o[j] = dtype == acore::kFloat16 ? acore::f32_to_f16_bits(f[j]) : acore::f32_to_bf16_bits(f[j]);
  }
}

NF4_AI void store1(void* out, int dtype, int64_t i, float v) {
  if (dtype == acore::kFloat32)
    static_cast<float*>(out)[i] = v;
  else if (dtype == acore::kFloat16)
    static_cast<uint16_t*>(out)[i] = acore::f32_to_f16_bits(v);
  else
    static_cast<uint16_t*>(out)[i] = acore::f32_to_bf16_bits(v);
}

NF4_AI __m256 load8(const void* in, int dtype, int64_t i) {
  if (dtype == acore::kFloat32) return _mm256_loadu_ps(static_cast<const float*>(in) + i);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(in) + i));
  if (dtype == acore::kFloat16) return _mm256_cvtph_ps(h);  // exact widening
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

NF4_AI float load1(const void* in, int dtype, int64_t i) {
  if (dtype == acore::kFloat32) return static_cast<const float*>(in)[i];
  const uint16_t h = static_cast<const uint16_t*>(in)[i];
  return dtype == acore::kFloat16 ? acore::f16_bits_to_f32(h) : acore::bf16_bits_to_f32(h);
}

NF4_AI float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---------------------------------------------------------------- span walker
// Walks the elements [g0, g0+len) of a 4-bit tensor in block segments and calls
//   vec(w8, j)   for 8 elements j..j+7 (relative to g0), w8 = table[code] (not yet scaled)
//   pair(w8a, w8b, j) for 16 elements (two vectors), when 16 remain in the segment
//   one(wv, j)   for single leftover elements
//   seg_begin(scale) / seg_end(scale) around each block segment.
// Block boundaries are even (blocksizes are even), so within a segment the parity of the
// element index is fixed and one nibble decoder (codes8_even or codes8_odd) serves it all.
template <class Begin, class Vec, class Pair, class One, class End>
NF4_AI void walk_span(const uint8_t* packed, const Decoder& d, int blocksize, int64_t g0, int64_t len,
                      Begin&& seg_begin, Vec&& vec, Pair&& pair, One&& one, End&& seg_end) {
  for_each_block_segment(g0, g0 + len, blocksize, [&](int64_t b, int64_t g, int64_t send) NF4_AI_LAMBDA {
    const float scale = d.sc(b);
    seg_begin(scale);
    const auto vectors = [&](auto codes8) NF4_AI_LAMBDA {
      for (; g + 16 <= send; g += 16)
        pair(lut16(codes8(packed + (g >> 1)), d.t), lut16(codes8(packed + (g >> 1) + 4), d.t), g - g0);
      for (; g + 8 <= send; g += 8) vec(lut16(codes8(packed + (g >> 1)), d.t), g - g0);
    };
    if ((g & 1) == 0)
      vectors([](const uint8_t* p) { return codes8_even(p); });
    else
      vectors([](const uint8_t* p) { return codes8_odd(p); });
    for (; g < send; ++g) one(d.table[code_at(packed, g)], g - g0);
    seg_end(scale);
  });
}

// Two vectors -> 16 bf16 (round to nearest even) in one pack.
NF4_AI void store16_bf16(uint16_t* o, __m256 v0, __m256 v1) {
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff);
  const __m256i u0 = _mm256_castps_si256(v0), u1 = _mm256_castps_si256(v1);
  const __m256i r0 = _mm256_srli_epi32(
      _mm256_add_epi32(u0, _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u0, 16), one), bias)), 16);
  const __m256i r1 = _mm256_srli_epi32(
      _mm256_add_epi32(u1, _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u1, 16), one), bias)), 16);
  const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(r0, r1), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), p);
  const __m256 nan = _mm256_or_ps(_mm256_cmp_ps(v0, v0, _CMP_UNORD_Q), _mm256_cmp_ps(v1, v1, _CMP_UNORD_Q));
  if (__builtin_expect(_mm256_movemask_ps(nan) != 0, 0)) {
    float f[16];
    _mm256_storeu_ps(f, v0);
    _mm256_storeu_ps(f + 8, v1);
    for (int j = 0; j < 16; ++j) o[j] = acore::f32_to_bf16_bits(f[j]);
  }
}

// Elements [g0, g0+len) -> out[0..len) in dtype DT, bit-exact.
template <int DT>
void dequant_span_t(const Q4Args& q, const Decoder& d, int64_t g0, int64_t len, void* out) {
  __m256 sv = _mm256_setzero_ps();
  float s1 = 0.0f;
  walk_span(
      q.packed, d, q.blocksize, g0, len,
      [&](float s) { sv = _mm256_set1_ps(s); s1 = s; },
      [&](__m256 w, int64_t j) { store8(out, DT, j, _mm256_mul_ps(w, sv)); },
      [&](__m256 w0, __m256 w1, int64_t j) {
        if (DT == acore::kBFloat16) {
          store16_bf16(static_cast<uint16_t*>(out) + j, _mm256_mul_ps(w0, sv), _mm256_mul_ps(w1, sv));
        } else {
          store8(out, DT, j, _mm256_mul_ps(w0, sv));
          store8(out, DT, j + 8, _mm256_mul_ps(w1, sv));
        }
      },
      [&](float w, int64_t j) { store1(out, DT, j, w * s1); }, [](float) {});
}

void dequant_span_any(const Q4Args& q, const Decoder& d, int64_t g0, int64_t len, void* out, int dtype) {
  switch (dtype) {
    case acore::kFloat32: dequant_span_t<acore::kFloat32>(q, d, g0, len, out); break;
    case acore::kFloat16: dequant_span_t<acore::kFloat16>(q, d, g0, len, out); break;
    default: dequant_span_t<acore::kBFloat16>(q, d, g0, len, out); break;
  }
}

inline int64_t dtype_size(int dtype) { return dtype == acore::kFloat32 ? 4 : 2; }

}  // namespace

// ================================================================ 4-bit dequantize
int dequantize_4bit(const Q4Args& q, void* out, int out_dtype) {
  const Decoder d(q);
  const int64_t es = dtype_size(out_dtype);
  const auto span = [=](int64_t g0, int64_t len) NF4_AI_LAMBDA {
    dequant_span_any(q, d, g0, len, static_cast<char*>(out) + g0 * es, out_dtype);
  };
  for_each_block_chunk(q.n, q.blocksize, span, [] {});
  return kOk;
}

int dequantize_4bit_tile(const Q4Args& q, int64_t N, int64_t K, int64_t n0, int64_t n1, int64_t k0, int64_t k1,
                         void* out, int out_dtype) {
  (void)N;
  const Decoder d(q);
  const auto row = [=](int64_t g0, int64_t len, void* o) NF4_AI_LAMBDA {
    dequant_span_any(q, d, g0, len, o, out_dtype);
  };
  for_each_tile_row(K, n0, n1, k0, k1, out, dtype_size(out_dtype), row);
  return kOk;
}

// ================================================================ 4-bit quantize
namespace {
// Sorted fp32 midpoints between neighbouring table values: the thresholds of the decision
// trees in core/nf4_core.h (nf4_encode / fp4_encode), in ascending order.
alignas(32) const float kNF4Mid[15] = {
    -0x1.b239b0p-1f, -0x1.38a4e0p-1f, -0x1.d70900p-2f, -0x1.5bd4ecp-2f, -0x1.e079d8p-3f,
    -0x1.1a7178p-3f, -0x1.74f0e2p-5f, 0x1.45f5fep-5f,  0x1.ec90c4p-4f,  0x1.a0cfc0p-3f,
    0x1.2b05a8p-2f,  0x1.8ea7f2p-2f,  0x1.00da08p-1f,  0x1.491b5ep-1f,  0x1.b913b4p-1f};
alignas(32) const float kFP4Mid[15] = {
    -0x1.aaaaacp-1f, -0x1.2aaaacp-1f, -0x1.aaaaacp-2f, -0x1.2aaaacp-2f, -0x1.aaaaacp-3f,
    -0x1.600000p-4f, -0x1.555556p-9f, 0x0.0p+0f,       0x1.555556p-9f,  0x1.600000p-4f,
    0x1.aaaaacp-3f,  0x1.2aaaacp-2f,  0x1.aaaaacp-2f,  0x1.2aaaacp-1f,  0x1.aaaaacp-1f};
// FP4: sorted position -> code.
alignas(32) const int32_t kFP4Order[16] = {11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3};

struct Encoder {
  __m256 mid[15];
  bool fp4;
  __m256i ord_lo, ord_hi;
  explicit Encoder(int quant_type) {
    fp4 = quant_type == acore::kFP4;
    const float* m = fp4 ? kFP4Mid : kNF4Mid;
    for (int i = 0; i < 15; ++i) mid[i] = _mm256_set1_ps(m[i]);
    ord_lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(kFP4Order));
    ord_hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(kFP4Order + 8));
  }
  // code = (FP4: order of) the number of midpoints strictly below xn.
  NF4_AI __m256i encode(__m256 xn) const {
    __m256i pos = _mm256_setzero_si256();
    for (int i = 0; i < 15; ++i)  // compare masks are -1: subtracting counts them
      pos = _mm256_sub_epi32(pos, _mm256_castps_si256(_mm256_cmp_ps(xn, mid[i], _CMP_GT_OQ)));
    if (!fp4) return pos;
    const __m256i lo = _mm256_permutevar8x32_epi32(ord_lo, pos);
    const __m256i hi = _mm256_permutevar8x32_epi32(ord_hi, pos);
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(lo), _mm256_castsi256_ps(hi),
                                                _mm256_castsi256_ps(_mm256_slli_epi32(pos, 28))));
  }
};

// 32 codes (4 vectors of int32, element order) -> 16 packed bytes, first element high.
NF4_AI __m128i pack32(__m256i c0, __m256i c1, __m256i c2, __m256i c3) {
  const __m256i p01 = _mm256_packs_epi32(c0, c1);
  const __m256i p23 = _mm256_packs_epi32(c2, c3);
  __m256i b = _mm256_packus_epi16(p01, p23);
  b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));  // element order
  // pairs (hi, lo) -> hi * 16 + lo as int16, then to bytes.
  const __m256i m = _mm256_maddubs_epi16(b, _mm256_set1_epi16(0x0110));
  const __m256i bytes = _mm256_permute4x64_epi64(_mm256_packus_epi16(m, m), 0x08);
  return _mm256_castsi256_si128(bytes);
}
// max |x| over in[start, start + count), 8 lanes at a time.
NF4_AI float block_absmax(const void* in, int dtype, int64_t start, int64_t count) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 m8 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= count; j += 8) m8 = _mm256_max_ps(m8, _mm256_and_ps(load8(in, dtype, start + j), absmask));
  alignas(32) float f[8];
  _mm256_store_ps(f, m8);
  float amax = 0.0f;
  for (int i = 0; i < 8; ++i) amax = fmaxf(amax, f[i]);
  for (; j < count; ++j) amax = fmaxf(amax, fabsf(load1(in, dtype, start + j)));
  return amax;
}

}  // namespace

int quantize_4bit(const void* in, int in_dtype, int64_t n, int blocksize, int quant_type, uint8_t* packed,
                  float* absmax) {
  const Encoder enc(quant_type);
  for_each_block(n, blocksize, [=](int64_t b, int64_t start, int64_t count) NF4_AI_LAMBDA {
    const float amax = block_absmax(in, in_dtype, start, count);
    absmax[b] = amax;
    const float inv = acore::block_inverse(amax);
    const __m256 iv = _mm256_set1_ps(inv);
    int64_t j = 0;
    for (; j + 32 <= count; j += 32) {
      const __m256i c0 = enc.encode(_mm256_mul_ps(load8(in, in_dtype, start + j), iv));
      const __m256i c1 = enc.encode(_mm256_mul_ps(load8(in, in_dtype, start + j + 8), iv));
      const __m256i c2 = enc.encode(_mm256_mul_ps(load8(in, in_dtype, start + j + 16), iv));
      const __m256i c3 = enc.encode(_mm256_mul_ps(load8(in, in_dtype, start + j + 24), iv));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(packed + ((start + j) >> 1)), pack32(c0, c1, c2, c3));
    }
    for (; j < count; j += 2) {
      const uint8_t hi = acore::quantize_value(quant_type, load1(in, in_dtype, start + j), inv);
      const uint8_t lo = (j + 1 < count) ? acore::quantize_value(quant_type, load1(in, in_dtype, start + j + 1), inv)
                                         : acore::zero_code(quant_type);
      packed[(start + j) >> 1] = acore::pack_pair(hi, lo);
    }
  });
  return kOk;
}

// ================================================================ 8-bit dynamic map
int quantize_blockwise(const void* in, int in_dtype, int64_t n, int blocksize, const float* code, uint8_t* q,
                       float* absmax) {
  // The 255 midpoints exactly as core::dynamic_encode computes them; the branch-free search
  // below counts the midpoints < x (the same answer as its binary search on a sorted map).
  alignas(32) float mid[256];
  for (int i = 0; i < 255; ++i) mid[i] = acore::mul_rn(acore::add_rn(code[i], code[i + 1]), 0.5f);
  mid[255] = 0.0f;  // never read
  for_each_block(n, blocksize, [=](int64_t b, int64_t start, int64_t count) NF4_AI_LAMBDA {
    const float amax = block_absmax(in, in_dtype, start, count);
    absmax[b] = amax;
    const float inv = acore::block_inverse(amax);
    const __m256 iv = _mm256_set1_ps(inv);
    int64_t j = 0;
    for (; j + 8 <= count; j += 8) {
      const __m256 x = _mm256_mul_ps(load8(in, in_dtype, start + j), iv);
      __m256i pos = _mm256_setzero_si256();
      for (int step = 128; step >= 1; step >>= 1) {
        const __m256i idx = _mm256_add_epi32(pos, _mm256_set1_epi32(step - 1));
        const __m256 m = _mm256_i32gather_ps(mid, idx, 4);
        const __m256i lt = _mm256_castps_si256(_mm256_cmp_ps(m, x, _CMP_LT_OQ));
        pos = _mm256_add_epi32(pos, _mm256_and_si256(lt, _mm256_set1_epi32(step)));
      }
      const __m256i p16 = _mm256_packus_epi32(pos, pos);
      const __m256i p8 = _mm256_packus_epi16(p16, p16);
      const uint32_t lo = (uint32_t)_mm256_extract_epi32(p8, 0), hi = (uint32_t)_mm256_extract_epi32(p8, 4);
      memcpy(q + start + j, &lo, 4);
      memcpy(q + start + j + 4, &hi, 4);
    }
    for (; j < count; ++j) q[start + j] = acore::dynamic_encode(acore::mul_rn(load1(in, in_dtype, start + j), inv), code);
  });
  return kOk;
}

int dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n, int blocksize,
                         void* out, int out_dtype) {
  for_each_chunk_segment(n, blocksize, 8192, [=](int64_t b, int64_t e, int64_t send) NF4_AI_LAMBDA {
    const float s = absmax[b];
    const __m256 sv = _mm256_set1_ps(s);
    for (; e + 8 <= send; e += 8) {
      const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + e)));
      store8(out, out_dtype, e, _mm256_mul_ps(_mm256_i32gather_ps(code, idx, 4), sv));
    }
    for (; e < send; ++e) store1(out, out_dtype, e, code[q[e]] * s);
  });
  return kOk;
}

// ================================================================ int8 absmax
namespace {
// q[start, start + count) = int8_encode(in[...], c), 8 lanes at a time.
NF4_AI void int8_encode_span(const void* in, int dtype, int64_t start, int64_t count, float c, int8_t* q) {
  const __m256 cv = _mm256_set1_ps(c);
  const __m256 hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
  int64_t j = 0;
  for (; j + 8 <= count; j += 8) {
    __m256 v = _mm256_round_ps(_mm256_mul_ps(load8(in, dtype, start + j), cv),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
    const __m256i i32 = _mm256_cvtps_epi32(v);
    const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + start + j), _mm_packs_epi16(i16, i16));
  }
  for (; j < count; ++j) q[start + j] = int8_encode(load1(in, dtype, start + j), c);
}
}  // namespace

int quantize_absmax_int8(const void* in, int in_dtype, int64_t n, int64_t blocksize, int8_t* q, float* absmax) {
  const int64_t bs = blocksize == 0 ? n : blocksize;
  const int64_t nblocks = ceil_div(n, bs);
  // Large blocks (per tensor, typically) are split into chunks so both passes run in parallel.
  if (bs >= 65536) {
    const int64_t chunk = 32768;
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t start = b * bs;
      const int64_t count = (n - start < bs) ? n - start : bs;
      const int64_t nch = ceil_div(count, chunk);
      float amax = 0.0f;
#pragma omp parallel for reduction(max : amax) schedule(static)
      for (int64_t c = 0; c < nch; ++c) {
        const int64_t s = start + c * chunk;
        const int64_t len = (start + count - s < chunk) ? start + count - s : chunk;
        amax = fmaxf(amax, block_absmax(in, in_dtype, s, len));
      }
      absmax[b] = amax;
      const float cst = int8_scale(amax);
#pragma omp parallel for schedule(static)
      for (int64_t c = 0; c < nch; ++c) {
        const int64_t s = start + c * chunk;
        const int64_t len = (start + count - s < chunk) ? start + count - s : chunk;
        int8_encode_span(in, in_dtype, s, len, cst, q);
      }
    }
    return kOk;
  }
  for_each_block(n, bs, [=](int64_t b, int64_t start, int64_t count) NF4_AI_LAMBDA {
    const float amax = block_absmax(in, in_dtype, start, count);
    absmax[b] = amax;
    int8_encode_span(in, in_dtype, start, count, int8_scale(amax), q);
  });
  return kOk;
}

int dequantize_absmax_int8(const int8_t* q, const float* absmax, int64_t n, int64_t blocksize, void* out,
                           int out_dtype) {
  const int64_t bs = blocksize == 0 ? n : blocksize;
  for_each_chunk_segment(n, bs, 8192, [=](int64_t b, int64_t e, int64_t send) NF4_AI_LAMBDA {
    const float s = absmax[b] / 127.0f;  // true fp32 division, as the reference
    const __m256 sv = _mm256_set1_ps(s);
    for (; e + 8 <= send; e += 8) {
      const __m256i i32 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + e)));
      store8(out, out_dtype, e, _mm256_mul_ps(_mm256_cvtepi32_ps(i32), sv));
    }
    for (; e < send; ++e) store1(out, out_dtype, e, (float)q[e] * s);
  });
  return kOk;
}

// ================================================================ fused small-M matmuls
namespace {
// One output row n for an M tile of MT rows of x: y[m] = Σ_k x[m, k] · W[n, k].
// Per block segment the unscaled table values are accumulated (two FMA chains for MT ≤ 2
// to hide the FMA latency), then folded in with the block scale.
template <int MT>
NF4_AI void row_dot(const Q4Args& q, const Decoder& d, int64_t n, int64_t K, const float* x, int64_t ldx,
                    float* outv) {
  __m256 acc[MT], s0[MT], s1[MT];
  float tail[MT], stail[MT];
  for (int m = 0; m < MT; ++m) {
    acc[m] = _mm256_setzero_ps();
    tail[m] = 0.0f;
  }
  walk_span(
      q.packed, d, q.blocksize, n * K, K,
      [&](float) {
        for (int m = 0; m < MT; ++m) {
          s0[m] = _mm256_setzero_ps();
          s1[m] = _mm256_setzero_ps();
          stail[m] = 0.0f;
        }
      },
      [&](__m256 w, int64_t j) {
        for (int m = 0; m < MT; ++m) s0[m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * ldx + j), s0[m]);
      },
      [&](__m256 w0, __m256 w1, int64_t j) {
        for (int m = 0; m < MT; ++m) {
          s0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * ldx + j), s0[m]);
          s1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * ldx + j + 8), s1[m]);
        }
      },
      [&](float w, int64_t j) {
        for (int m = 0; m < MT; ++m) stail[m] += w * x[m * ldx + j];
      },
      [&](float scale) {
        const __m256 sv = _mm256_set1_ps(scale);
        for (int m = 0; m < MT; ++m) {
          acc[m] = _mm256_fmadd_ps(_mm256_add_ps(s0[m], s1[m]), sv, acc[m]);
          tail[m] += stail[m] * scale;
        }
      });
  for (int m = 0; m < MT; ++m) outv[m] = hsum(acc[m]) + tail[m];
}

template <int MT>
void gemv_tile(const Q4Args& q, const Decoder& d, const float* x, int64_t M0, int64_t N, int64_t K, const float* bias,
               float* y) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    float o[MT];
    row_dot<MT>(q, d, n, K, x + M0 * K, K, o);
    const float bv = bias ? bias[n] : 0.0f;
    for (int m = 0; m < MT; ++m) y[(M0 + m) * N + n] = o[m] + bv;
  }
}
}  // namespace

int gemv_4bit(const float* x, int64_t M, const Q4Args& q, int64_t N, int64_t K, const float* bias, float* y) {
  const Decoder d(q);
  // M tiles of at most 4 rows of x: 4 x 2 accumulator chains + decode temporaries fit the
  // 16 ymm registers.  Each tile reads the packed weight once more (it stays in L2/L3 for
  // the small M this kernel serves).
  for_each_m_tile(M, [&](auto mt, int64_t m0) NF4_AI_LAMBDA {
    gemv_tile<decltype(mt)::value>(q, d, x, m0, N, K, bias, y);
  });
  return kOk;
}

// dx [M, K] = dy [M, N] · W (gemv_t_threads): W is read once, row by row, exactly as in the
// forward.
int gemv_t_4bit(const float* dy, int64_t M, const Q4Args& q, int64_t N, int64_t K, float* dx) {
  const Decoder d(q);
  // Private accumulators with a padded row stride: rows K floats apart (K a multiple of 1024)
  // would all map to the same L1 sets and evict each other.
  const int64_t ld = ((K + 15) / 16) * 16 + 16;
  const bool ok = gemv_t_threads(
      M, N, K, ld,
      [=](int64_t n_begin, int64_t n_end, float* acc) NF4_AI_LAMBDA {
        // Per block segment: dv[m] = dy[m, n] * scale, then a[m, k] += W_code[k] * dv[m].
        Scratch<float> dv_buf(8 * (size_t)M), d1_buf((size_t)M);
        __m256* const dv = reinterpret_cast<__m256*>(dv_buf.data());
        float* const d1 = d1_buf.data();
        for (int64_t n = n_begin; n < n_end; ++n) {
          walk_span(
              q.packed, d, q.blocksize, n * K, K,
              [&](float s) {
                for (int64_t m = 0; m < M; ++m) {
                  d1[m] = dy[m * N + n] * s;
                  dv[m] = _mm256_set1_ps(d1[m]);
                }
              },
              [&](__m256 w, int64_t j) {
                for (int64_t m = 0; m < M; ++m) {
                  float* a = acc + m * ld + j;
                  _mm256_storeu_ps(a, _mm256_fmadd_ps(w, dv[m], _mm256_loadu_ps(a)));
                }
              },
              [&](__m256 w0, __m256 w1, int64_t j) {
                for (int64_t m = 0; m < M; ++m) {
                  float* a = acc + m * ld + j;
                  _mm256_storeu_ps(a, _mm256_fmadd_ps(w0, dv[m], _mm256_loadu_ps(a)));
                  _mm256_storeu_ps(a + 8, _mm256_fmadd_ps(w1, dv[m], _mm256_loadu_ps(a + 8)));
                }
              },
              [&](float w, int64_t j) {
                for (int64_t m = 0; m < M; ++m) acc[m * ld + j] += w * d1[m];
              },
              [](float) {});
        }
      },
      [=](int64_t m, const float* sum) NF4_AI_LAMBDA { memcpy(dx + m * K, sum, sizeof(float) * (size_t)K); });
  return ok ? kOk : kNoMemory;
}

}  // namespace avx2
}  // namespace cpu
}  // namespace nf4kit

// AVX-512 (F + BW + VL) CPU kernels for the 4-bit ops: dequantize (whole tensor and tiles)
// and the fused small-M GEMV forward / backward.  This file is compiled with
// -mavx512f -mavx512bw -mavx512vl (+ FMA, F16C) and only called after quant_cpu.cpp checked
// the CPU at run time.  The other ops (quantize, 8-bit, int8) keep their AVX2 kernels.
//
// Dequantize: per block, the 16 possible outputs are computed once --
//   out16[c] = T(fp32(table[c] * absmax))      (T = output dtype, round to nearest even)
// -- with exactly the arithmetic of core/nf4_core.h, and every element is then a table
// lookup: one vpermw gives 32 bf16/fp16 outputs, one vpermps 16 fp32 outputs.  So the
// result is bit-identical to the reference by construction, and the per-element work is a
// nibble decode, one permute and the store.
//   * bf16 rounding is done with integer arithmetic (u + 0x7fff + lsb) >> 16, NOT with
//     vcvtneps2bf16: that instruction treats fp32 subnormal inputs as zero (checked on
//     this Zen 4: 0x007fffff -> 0x0000 instead of 0x0080), which the reference does not.
//   * NaN (only from a NaN/inf absmax) takes the core's scalar rule, per block table.
//   * nested absmax: fp32 multiply then fp32 add (scalar, per block), never an FMA.
// GEMV: the 16-entry table scaled by the block's absmax (the exact dequantized weight
// values) is looked up with vpermps and multiplied into x with FMA (fp32 accumulation).
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

// As in quant_avx2.cpp: the core's inline functions get internal linkage here, so an
// AVX-512-encoded copy can never be picked by the linker for another translation unit.
namespace {
#include "core/nf4_core.h"
namespace acore = ::nf4kit::core;
}  // namespace

#include "core/status.h"
#include "cpu/cpu_kernels.h"

namespace nf4kit {
namespace cpu {
namespace avx512 {
namespace {

NF4_AI __m512 load_table(int quant_type) {
  alignas(64) float t[16];
  for (int c = 0; c < 16; ++c) t[c] = acore::code_value(quant_type, c);
  return _mm512_load_ps(t);
}

using acore::code_at;

// ---------------------------------------------------------------- block scales
// Per-block scales (plain or nested decode, two roundings: -ffp-contract=off keeps it so
// despite -mfma in this file).
using Scales = acore::BlockScales;

// ---------------------------------------------------------------- nibble decode
// 16 packed bytes (32 elements from an even index) -> 32 word lanes in element order whose
// bits 3..0 are the codes.  Word j of x is byte j; (x >> 4) | (x << 8) puts the high nibble
// in the low byte and the whole byte in the high byte; widening those bytes to words gives
// lane 2j = high nibble (element 2j), lane 2j+1 = byte j, whose bits 3..0 are element
// 2j+1's code.  Bit 4 of that lane is junk: vpermw reads 5 index bits, so the 16 table
// words are duplicated into lanes 16..31.
NF4_AI __m512i codes32_w(const uint8_t* p) {
  const __m256i x = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i y = _mm256_or_si256(_mm256_srli_epi16(x, 4), _mm256_slli_epi16(x, 8));
  return _mm512_cvtepu8_epi16(y);
}

// 8 packed bytes (16 elements from an even index) -> 16 dword lanes in element order, bits
// 3..0 the codes (vpermps reads only those 4 bits).
NF4_AI __m512i codes16_d(const uint8_t* p) {
  const __m128i x = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m128i y = _mm_or_si128(_mm_srli_epi16(x, 4), _mm_slli_epi16(x, 8));
  return _mm512_cvtepu8_epi32(y);
}

// ---------------------------------------------------------------- per-block output tables
// 16 fp32 products -> their 16-bit outputs (RNE), duplicated into both 256-bit halves.
template <int DT>
NF4_AI __m512i table_w(__m512 p) {
  __m256i h;
  if (DT == acore::kBFloat16) {
    const __m512i u = _mm512_castps_si512(p);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    h = _mm512_cvtepi32_epi16(r);
  } else {
    h = _mm512_cvtps_ph(p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  if (__builtin_expect(_mm512_cmp_ps_mask(p, p, _CMP_UNORD_Q) != 0, 0)) {
    // NaN: the core's scalar rule gives the exact bits (payload / quiet bit).
    alignas(64) float f[16];
    alignas(32) uint16_t o[16];
    _mm512_store_ps(f, p);
    for (int j = 0; j < 16; ++j)
      o[j] = DT == acore::kBFloat16 ? acore::f32_to_bf16_bits(f[j]) : acore::f32_to_f16_bits(f[j]);
    h = _mm256_load_si256(reinterpret_cast<const __m256i*>(o));
  }
  return _mm512_broadcast_i64x4(h);
}

// The block's 16 possible outputs as a lookup vector: the fp32 products themselves
// (vpermps), or their 16-bit outputs in word lanes (vpermw).
template <int DT>
NF4_AI auto block_outputs(__m512 p) {
  if constexpr (DT == acore::kFloat32)
    return p;
  else
    return table_w<DT>(p);
}

// One 64-byte group of outputs from an even element index (p: its first packed byte):
// 16 fp32 or 32 16-bit outputs.
NF4_AI __m512 lookup_group(__m512 outs, const uint8_t* p) { return _mm512_permutexvar_ps(codes16_d(p), outs); }
NF4_AI __m512i lookup_group(__m512i outs, const uint8_t* p) { return _mm512_permutexvar_epi16(codes32_w(p), outs); }

template <bool NT>
NF4_AI void store_group(float* o, __m512 v) {
  if (NT)
    _mm512_stream_ps(o, v);
  else
    _mm512_storeu_ps(o, v);
}
template <bool NT>
NF4_AI void store_group(uint16_t* o, __m512i v) {
  if (NT)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(o), v);
  else
    _mm512_storeu_si512(o, v);
}

// o[g .. end) one element at a time (odd starts, tails) from the block's output vector.
template <class T, class V>
NF4_AI void lookup_scalar(V outs, const uint8_t* packed, T* o, int64_t g, int64_t end) {
  alignas(64) T t[64 / sizeof(T)];
  memcpy(t, &outs, 64);
  for (; g < end; ++g) o[g] = t[code_at(packed, g)];
}

// ---------------------------------------------------------------- dequantize a span
// Elements [g0, g0+len) -> out[0..len) in dtype DT, bit-exact.  NT: non-temporal stores for
// the full 64-byte groups (the caller guarantees they are 64-byte aligned: out is, and every
// block segment starts a multiple of 32 elements after g0).
template <int DT, bool NT>
void dequant_span(const Q4Args& q, const Scales& sc, __m512 tab, int64_t g0, int64_t len, void* out) {
  using T = std::conditional_t<DT == acore::kFloat32, float, uint16_t>;
  constexpr int64_t kGroup = 64 / sizeof(T);
  const uint8_t* packed = q.packed;
  T* o = static_cast<T*>(out) - g0;
  for_each_block_segment<true>(g0, g0 + len, q.blocksize, [&](int64_t b, int64_t g, int64_t send) NF4_AI_LAMBDA {
    const auto outs = block_outputs<DT>(_mm512_mul_ps(tab, _mm512_set1_ps(sc(b))));  // table[c] * absmax, exact fp32
    if (g & 1) {  // odd start (tiles only): one element, then even from here on
      lookup_scalar(outs, packed, o, g, g + 1);
      ++g;
    }
    for (; g + kGroup <= send; g += kGroup) store_group<NT>(o + g, lookup_group(outs, packed + (g >> 1)));
    if constexpr (DT != acore::kFloat32) {
      // 16 left: codes of 32, first 16 used.  The 16 bytes read lie in this segment or in
      // the next bytes of the tensor only if g+32 <= n; otherwise the scalar loop does them.
      if (g + 16 <= send && ((g + 32) >> 1) <= ((q.n + 1) >> 1)) {
        const __m512i v = lookup_group(outs, packed + (g >> 1));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + g), _mm512_castsi512_si256(v));
        g += 16;
      }
    }
    if (g < send) lookup_scalar(outs, packed, o, g, send);
  });
}

template <bool NT>
void dequant_span_any(const Q4Args& q, const Scales& sc, __m512 tab, int64_t g0, int64_t len, void* out, int dtype) {
  switch (dtype) {
    case acore::kFloat32: dequant_span<acore::kFloat32, NT>(q, sc, tab, g0, len, out); break;
    case acore::kFloat16: dequant_span<acore::kFloat16, NT>(q, sc, tab, g0, len, out); break;
    default: dequant_span<acore::kBFloat16, NT>(q, sc, tab, g0, len, out); break;
  }
}

inline int64_t dtype_size(int dtype) { return dtype == acore::kFloat32 ? 4 : 2; }

// Outputs at least this large are written with non-temporal stores: they cannot stay in
// the caches anyway, and streaming stores skip the read-for-ownership of every line.
constexpr int64_t kStreamBytes = int64_t(16) << 20;

}  // namespace

// ================================================================ 4-bit dequantize
int dequantize_4bit(const Q4Args& q, void* out, int out_dtype) {
  const __m512 tab = load_table(q.quant_type);
  const Scales sc = block_scales<Scales>(q);
  const int64_t es = dtype_size(out_dtype);
  // Streaming needs every 64-byte group aligned: out aligned and groups at multiples of
  // 32 elements from a chunk start (blocksizes are >= 32 and chunks are whole blocks).
  const bool nt = q.n * es >= kStreamBytes && (reinterpret_cast<uintptr_t>(out) & 63) == 0 && q.blocksize >= 32;
  for_each_block_chunk(
      q.n, q.blocksize,
      [=](int64_t g0, int64_t len) NF4_AI_LAMBDA {
        void* o = static_cast<char*>(out) + g0 * es;
        if (nt)
          dequant_span_any<true>(q, sc, tab, g0, len, o, out_dtype);
        else
          dequant_span_any<false>(q, sc, tab, g0, len, o, out_dtype);
      },
      [=]() NF4_AI_LAMBDA {
        if (nt) _mm_sfence();  // streaming stores visible before the caller reads out
      });
  return kOk;
}

int dequantize_4bit_tile(const Q4Args& q, int64_t N, int64_t K, int64_t n0, int64_t n1, int64_t k0, int64_t k1,
                         void* out, int out_dtype) {
  (void)N;
  const __m512 tab = load_table(q.quant_type);
  const Scales sc = block_scales<Scales>(q);
  // The tile is transient and re-read at once by the GEMM: ordinary (cached) stores.
  const auto row = [=](int64_t g0, int64_t len, void* o) NF4_AI_LAMBDA {
    dequant_span_any<false>(q, sc, tab, g0, len, o, out_dtype);
  };
  for_each_tile_row(K, n0, n1, k0, k1, out, dtype_size(out_dtype), row);
  return kOk;
}

// ================================================================ fused small-M matmuls
// Fast path layout (K % 32 == 0): every 32-element group of a row lies in one block and
// starts at an even element.  Its 16 bytes widen to 16 dwords d_j = byte j: the high
// nibbles (d >> 4) are the codes of the even elements 2j, the low nibbles (d, vpermps reads
// bits 3..0) those of the odd elements 2j+1.  So x is rearranged once per call into
// "even half, odd half" per group of 32, and no interleaving is needed in the inner loop.
namespace {

// x [M, K] -> xp [M, K]: per group of 32, x[2j] at j and x[2j+1] at 16 + j.
void split_even_odd(const float* x, int64_t M, int64_t K, float* xp) {
  const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int64_t i = 0; i < M * K; i += 32) {
    const __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + i + 16);
    _mm512_storeu_ps(xp + i, _mm512_permutex2var_ps(a, ev, b));
    _mm512_storeu_ps(xp + i + 16, _mm512_permutex2var_ps(a, od, b));
  }
}

// The inverse of split_even_odd for one row of K.
void merge_even_odd(const float* xp, int64_t K, float* x) {
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t i = 0; i < K; i += 32) {
    const __m512 e = _mm512_loadu_ps(xp + i), o = _mm512_loadu_ps(xp + i + 16);
    _mm512_storeu_ps(x + i, _mm512_permutex2var_ps(e, lo, o));
    _mm512_storeu_ps(x + i + 16, _mm512_permutex2var_ps(e, hi, o));
  }
}

// The weights of the 32 elements from an even index (p: their 16 packed bytes) in the split
// layout: even elements (high nibbles) and odd elements (low nibbles), looked up in the
// block's 16 weight values w16.
NF4_AI void weights32(const uint8_t* p, __m512 w16, __m512& even, __m512& odd) {
  const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  even = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), w16);
  odd = _mm512_permutexvar_ps(c, w16);
}

// y[m] = Σ_k xp[m, k] · W[n, k] for MT rows of x (xp in the split layout, row stride K).
// Per block segment the 16 weight values are table[c] * absmax (the exact dequantized
// values); two groups per step into separate accumulators to cover the FMA latency.
template <int MT>
NF4_AI void row_dot(const uint8_t* packed, const Scales& sc, __m512 tab, int blocksize, int64_t n, int64_t K,
                    const float* xp, float* outv) {
  __m512 a0[MT], a1[MT], a2[MT], a3[MT];
  for (int m = 0; m < MT; ++m) a0[m] = a1[m] = a2[m] = a3[m] = _mm512_setzero_ps();
  const int64_t r0 = n * K;
  for_each_block_segment<true>(r0, r0 + K, blocksize, [&](int64_t b, int64_t g, int64_t send) NF4_AI_LAMBDA {
    const __m512 p = _mm512_mul_ps(tab, _mm512_set1_ps(sc(b)));
    for (; g + 64 <= send; g += 64) {
      __m512 we0, wo0, we1, wo1;
      weights32(packed + (g >> 1), p, we0, wo0);
      weights32(packed + (g >> 1) + 16, p, we1, wo1);
      const float* xk = xp + (g - r0);
      for (int m = 0; m < MT; ++m) {
        a0[m] = _mm512_fmadd_ps(we0, _mm512_loadu_ps(xk + m * K), a0[m]);
        a1[m] = _mm512_fmadd_ps(wo0, _mm512_loadu_ps(xk + m * K + 16), a1[m]);
        a2[m] = _mm512_fmadd_ps(we1, _mm512_loadu_ps(xk + m * K + 32), a2[m]);
        a3[m] = _mm512_fmadd_ps(wo1, _mm512_loadu_ps(xk + m * K + 48), a3[m]);
      }
    }
    if (g < send) {  // one group of 32 left (segments are multiples of 32)
      __m512 we0, wo0;
      weights32(packed + (g >> 1), p, we0, wo0);
      const float* xk = xp + (g - r0);
      for (int m = 0; m < MT; ++m) {
        a0[m] = _mm512_fmadd_ps(we0, _mm512_loadu_ps(xk + m * K), a0[m]);
        a1[m] = _mm512_fmadd_ps(wo0, _mm512_loadu_ps(xk + m * K + 16), a1[m]);
      }
    }
  });
  for (int m = 0; m < MT; ++m)
    outv[m] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0[m], a1[m]), _mm512_add_ps(a2[m], a3[m])));
}

// Wide path (K % 128 == 0, blocksize >= 64): a 64-byte load holds 128 codes, dword lane i
// the 8 codes of elements 8i..8i+7.  Shifting the whole vector right by 4j (no masking:
// vpermps reads bits 3..0) gives one code per lane -- element 8i + kNib[j] -- so the decode
// is 7 shifts instead of widening shuffles, and the shuffle port only does the lookups.
// x is rearranged to match (split_by_nibble); lanes 0..7 lie in one block and lanes 8..15
// in one block, so the (unscaled) products of a group are scaled by a two-valued vector.
constexpr int kNib[8] = {1, 0, 3, 2, 5, 4, 7, 6};  // nibble j of a little-endian dword -> element

// x [M, K] -> xq [M, K]: per group of 128, xq[16j + i] = x[8i + kNib[j]].
void split_by_nibble(const float* x, int64_t M, int64_t K, float* xq) {
  for (int64_t g = 0; g < M * K; g += 128)
    for (int j = 0; j < 8; ++j)
      for (int i = 0; i < 16; ++i) xq[g + 16 * j + i] = x[g + 8 * i + kNib[j]];
}

template <int MT>
NF4_AI void row_dot_wide(const uint8_t* packed, const Scales& sc, __m512 tab, int blocksize, int64_t n, int64_t K,
                         const float* xq, float* outv) {
  const int lg = __builtin_ctz((unsigned)blocksize);
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  const int64_t r0 = n * K;
  for (int64_t k = 0; k < K; k += 128) {
    const int64_t g = r0 + k;
    const float s0 = sc(g >> lg), s1 = sc((g + 64) >> lg);
    const __m512 sv = _mm512_mask_mov_ps(_mm512_set1_ps(s0), 0xFF00, _mm512_set1_ps(s1));
    const __m512i v = _mm512_loadu_si512(packed + (g >> 1));
    __m512 p0[MT], p1[MT];
    {
      const __m512 w0 = _mm512_permutexvar_ps(v, tab);
      const __m512 w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tab);
      for (int m = 0; m < MT; ++m) {
        p0[m] = _mm512_mul_ps(w0, _mm512_loadu_ps(xq + m * K + k));
        p1[m] = _mm512_mul_ps(w1, _mm512_loadu_ps(xq + m * K + k + 16));
      }
    }
#define NF4_NIB(J, P)                                                                     \
  {                                                                                       \
    const __m512 w = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * (J)), tab);           \
    for (int m = 0; m < MT; ++m) P[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xq + m * K + k + 16 * (J)), P[m]); \
  }
    NF4_NIB(2, p0) NF4_NIB(3, p1) NF4_NIB(4, p0) NF4_NIB(5, p1) NF4_NIB(6, p0) NF4_NIB(7, p1)
#undef NF4_NIB
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_fmadd_ps(_mm512_add_ps(p0[m], p1[m]), sv, acc[m]);
  }
  for (int m = 0; m < MT; ++m) outv[m] = _mm512_reduce_add_ps(acc[m]);
}

template <bool WIDE>
void gemv_rows(const Q4Args& q, const Scales& sc, __m512 tab, const float* xp, int64_t M, int64_t N, int64_t K,
               const float* bias, float* y) {
  // OpenMP over output rows; all M tiles of a row back to back, so the row's packed bytes
  // are read from memory once and from L1 for the other tiles.
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float bv = bias ? bias[n] : 0.0f;
    for_each_m_tile(M, [&](auto mt, int64_t m0) NF4_AI_LAMBDA {
      constexpr int MT = decltype(mt)::value;
      float o[MT];
      if constexpr (WIDE)
        row_dot_wide<MT>(q.packed, sc, tab, q.blocksize, n, K, xp + m0 * K, o);
      else
        row_dot<MT>(q.packed, sc, tab, q.blocksize, n, K, xp + m0 * K, o);
      for (int m = 0; m < MT; ++m) y[(m0 + m) * N + n] = o[m] + bv;
    });
  }
}

}  // namespace

int gemv_4bit(const float* x, int64_t M, const Q4Args& q, int64_t N, int64_t K, const float* bias, float* y) {
  if (K % 32 != 0 || q.blocksize < 32) return avx2::gemv_4bit(x, M, q, N, K, bias, y);
  const __m512 tab = load_table(q.quant_type);
  const Scales sc = block_scales<Scales>(q);
  Scratch<float> xs((size_t)(M * K));
  if (!xs.data()) return kNoMemory;
  if (K % 128 == 0 && q.blocksize >= 64) {
    split_by_nibble(x, M, K, xs.data());
    gemv_rows<true>(q, sc, tab, xs.data(), M, N, K, bias, y);
  } else {
    split_even_odd(x, M, K, xs.data());
    gemv_rows<false>(q, sc, tab, xs.data(), M, N, K, bias, y);
  }
  return kOk;
}

// dx [M, K] = dy [M, N] · W (gemv_t_threads), the accumulators in the split layout:
// re-interleaved as each row of dx is written.
int gemv_t_4bit(const float* dy, int64_t M, const Q4Args& q, int64_t N, int64_t K, float* dx) {
  if (K % 32 != 0 || q.blocksize < 32) return avx2::gemv_t_4bit(dy, M, q, N, K, dx);
  const __m512 tab = load_table(q.quant_type);
  const Scales sc = block_scales<Scales>(q);
  // Padded row stride: rows K floats apart (K a multiple of 1024) would share L1 sets.
  const int64_t ld = K + 32;
  const bool ok = gemv_t_threads(
      M, N, K, ld,
      [=](int64_t n_begin, int64_t n_end, float* acc) NF4_AI_LAMBDA {
        for (int64_t n = n_begin; n < n_end; ++n) {
          const int64_t r0 = n * K;
          for_each_block_segment<true>(r0, r0 + K, q.blocksize, [&](int64_t b, int64_t g, int64_t send) NF4_AI_LAMBDA {
            const __m512 p = _mm512_mul_ps(tab, _mm512_set1_ps(sc(b)));
            for (; g < send; g += 32) {
              __m512 we, wo;
              weights32(q.packed + (g >> 1), p, we, wo);
              float* a = acc + (g - r0);
              for (int64_t m = 0; m < M; ++m) {
                const __m512 d = _mm512_set1_ps(dy[m * N + n]);
                float* am = a + m * ld;
                _mm512_storeu_ps(am, _mm512_fmadd_ps(we, d, _mm512_loadu_ps(am)));
                _mm512_storeu_ps(am + 16, _mm512_fmadd_ps(wo, d, _mm512_loadu_ps(am + 16)));
              }
            }
          });
        }
      },
      [=](int64_t m, const float* sum) NF4_AI_LAMBDA { merge_even_odd(sum, K, dx + m * K); });
  return ok ? kOk : kNoMemory;
}

}  // namespace avx512
}  // namespace cpu
}  // namespace nf4kit

// Portable CPU quantize / dequantize kernels: OpenMP over blocks, scalar inner loops
// written so the compiler vectorises them.  Arithmetic comes from core/nf4_core.h.
// The public entry points at the end of this file dispatch to the AVX-512 kernels
// (quant_avx512.cpp) or the AVX2 kernels (quant_avx2.cpp) when the CPU has them; the code
// here is the generic fallback.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>
#if defined(__linux__)
#include <sys/mman.h>
#endif

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

inline int64_t dtype_size(int dtype) { return dtype == core::kFloat32 ? 4 : 2; }

// max |x| over in[start, start + count).
inline float block_absmax(const void* in, int dtype, int64_t start, int64_t count) {
  float amax = 0.0f;
  for (int64_t j = 0; j < count; ++j) amax = fmaxf(amax, fabsf(load_as_f32(in, dtype, start + j)));
  return amax;
}

inline void fill_code_table(int quant_type, float* table) {
  for (int c = 0; c < 16; ++c) table[c] = core::code_value(quant_type, c);
}

}  // namespace

static int generic_quantize_4bit(const void* in, int in_dtype, int64_t n, int blocksize, int quant_type,
                                 uint8_t* packed, float* absmax) {
  // Blocks have an even size, so every block starts on a byte boundary.
  for_each_block(n, blocksize, [=](int64_t b, int64_t start, int64_t count) NF4_AI_LAMBDA {
    const float amax = block_absmax(in, in_dtype, start, count);
    absmax[b] = amax;
    const float inv = core::block_inverse(amax);
    for (int64_t j = 0; j < count; j += 2) {
      uint8_t hi = core::quantize_value(quant_type, load_as_f32(in, in_dtype, start + j), inv);
      uint8_t lo = (j + 1 < count) ? core::quantize_value(quant_type, load_as_f32(in, in_dtype, start + j + 1), inv)
                                   : core::zero_code(quant_type);
      packed[(start + j) >> 1] = core::pack_pair(hi, lo);
    }
  });
  return kOk;
}

static int generic_dequantize_4bit(const Q4Args& q, void* out, int out_dtype) {
  float table[16];
  fill_code_table(q.quant_type, table);
  const core::BlockScales sc = block_scales<core::BlockScales>(q);
  for_each_block(q.n, q.blocksize, [=](int64_t b, int64_t start, int64_t count64) NF4_AI_LAMBDA {
    const int count = (int)count64;
    const float scale = sc(b);
    const uint8_t* src = q.packed + (start >> 1);
    float buf[4096];
    for (int j = 0; j < count / 2; ++j) {
      buf[2 * j] = table[core::high_code(src[j])] * scale;
      buf[2 * j + 1] = table[core::low_code(src[j])] * scale;
    }
    if (count & 1) buf[count - 1] = table[core::high_code(src[count / 2])] * scale;
    store_from_f32(out, out_dtype, start, buf, count);
  });
  return kOk;
}

static int generic_quantize_blockwise(const void* in, int in_dtype, int64_t n, int blocksize, const float* code,
                                      uint8_t* q, float* absmax) {
  for_each_block(n, blocksize, [=](int64_t b, int64_t start, int64_t count) NF4_AI_LAMBDA {
    const float amax = block_absmax(in, in_dtype, start, count);
    absmax[b] = amax;
    const float inv = core::block_inverse(amax);
    for (int64_t j = 0; j < count; ++j)
      q[start + j] = core::dynamic_encode(core::mul_rn(load_as_f32(in, in_dtype, start + j), inv), code);
  });
  return kOk;
}

static int generic_dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                                        int blocksize, void* out, int out_dtype) {
  for_each_block(n, blocksize, [=](int64_t b, int64_t start, int64_t total) NF4_AI_LAMBDA {
    float buf[4096];
    for (int64_t done = 0; done < total; done += 4096) {
      const int count = (int)((total - done < 4096) ? total - done : 4096);
      for (int j = 0; j < count; ++j) buf[j] = code[q[start + done + j]] * absmax[b];
      store_from_f32(out, out_dtype, start + done, buf, count);
    }
  });
  return kOk;
}

// Elements [g0, g0 + len) of a 4-bit tensor -> out[0 .. len), scalar.
static void generic_dequantize_span(const Q4Args& q, const core::BlockScales& sc, const float* table, int64_t g0,
                                    int64_t len, void* out, int out_dtype) {
  const uint8_t* packed = q.packed;
  float buf[256];
  for_each_block_segment(g0, g0 + len, q.blocksize, [&](int64_t b, int64_t e, int64_t seg_end) NF4_AI_LAMBDA {
    const float scale = sc(b);
    while (e < seg_end) {
      const int count = (int)(seg_end - e < 256 ? seg_end - e : 256);
      for (int j = 0; j < count; ++j) buf[j] = table[core::code_at(packed, e + j)] * scale;
      store_from_f32(out, out_dtype, e - g0, buf, count);
      e += count;
    }
  });
}

static int generic_dequantize_4bit_tile(const Q4Args& q, int64_t N, int64_t K, int64_t n0, int64_t n1, int64_t k0,
                                        int64_t k1, void* out, int out_dtype) {
  (void)N;
  float table[16];
  fill_code_table(q.quant_type, table);
  const core::BlockScales sc = block_scales<core::BlockScales>(q);
  const auto row = [=](int64_t g0, int64_t len, void* o) NF4_AI_LAMBDA {
    generic_dequantize_span(q, sc, table, g0, len, o, out_dtype);
  };
  for_each_tile_row(K, n0, n1, k0, k1, out, dtype_size(out_dtype), row);
  return kOk;
}

// ---------------------------------------------------------------- int8 absmax (generic)
static int generic_quantize_absmax_int8(const void* in, int in_dtype, int64_t n, int64_t blocksize, int8_t* q,
                                        float* absmax) {
  const int64_t bs = blocksize == 0 ? n : blocksize;
  if (ceil_div(n, bs) == 1) {
    // One block (per tensor): parallel max, then parallel encode.
    float amax = 0.0f;
#pragma omp parallel for reduction(max : amax) schedule(static)
    for (int64_t i = 0; i < n; ++i) amax = fmaxf(amax, fabsf(load_as_f32(in, in_dtype, i)));
    absmax[0] = amax;
    const float c = int8_scale(amax);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) q[i] = int8_encode(load_as_f32(in, in_dtype, i), c);
    return kOk;
  }
  for_each_block(n, bs, [=](int64_t b, int64_t start, int64_t count) NF4_AI_LAMBDA {
    const float amax = block_absmax(in, in_dtype, start, count);
    absmax[b] = amax;
    const float c = int8_scale(amax);
    for (int64_t j = 0; j < count; ++j) q[start + j] = int8_encode(load_as_f32(in, in_dtype, start + j), c);
  });
  return kOk;
}

static int generic_dequantize_absmax_int8(const int8_t* q, const float* absmax, int64_t n, int64_t blocksize,
                                          void* out, int out_dtype) {
  const int64_t bs = blocksize == 0 ? n : blocksize;
  const int64_t chunk = 4096;
#pragma omp parallel
  {
    float buf[4096];
#pragma omp for schedule(static)
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
      const int count = (int)(n - c0 < chunk ? n - c0 : chunk);
      for (int j = 0; j < count; ++j) buf[j] = (float)q[c0 + j] * (absmax[(c0 + j) / bs] / 127.0f);
      store_from_f32(out, out_dtype, c0, buf, count);
    }
  }
  return kOk;
}

// ---------------------------------------------------------------- dispatch
namespace {
int detect_isa() {
#if defined(__x86_64__) || defined(__i386__)
  const char* env = getenv("NF4KIT_CPU_GENERIC");
  if (env && env[0] && env[0] != '0') return 0;
  __builtin_cpu_init();
  int level = 0;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    level = 1;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
      level = 2;
  }
  // NF4KIT_CPU_ISA caps the level (tests run every path on one machine).
  const char* cap = getenv("NF4KIT_CPU_ISA");
  if (cap && cap[0]) {
    const int c = strcmp(cap, "generic") == 0 ? 0 : strcmp(cap, "avx2") == 0 ? 1 : 2;
    if (c < level) level = c;
  }
  return level;
#else
  return 0;
#endif
}
}  // namespace

namespace {
int detected_isa() {
  static const int level = detect_isa();
  return level;
}
std::atomic<int> g_isa_cap{2};
}  // namespace

int isa_level() {
  const int d = detected_isa(), c = g_isa_cap.load(std::memory_order_relaxed);
  return c < d ? c : d;
}

int set_isa_cap(int level) {
  g_isa_cap.store(level < 0 ? 0 : level, std::memory_order_relaxed);
  return isa_level();
}
bool use_avx2() { return isa_level() >= 1; }
bool use_avx512() { return isa_level() >= 2; }

const char* isa() {
  switch (isa_level()) {
    case 2: return "avx512";
    case 1: return "avx2";
    default: return "generic";
  }
}

void advise_hugepages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = uintptr_t(2) << 20;
  if (bytes < (int64_t)(4 * huge)) return;
  const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + huge - 1) & ~(huge - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + (uintptr_t)bytes) & ~(huge - 1);
  if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);  // advice only: errors are harmless
#else
  (void)p;
  (void)bytes;
#endif
}

static bool valid_dtype(int dtype) { return dtype >= core::kFloat32 && dtype <= core::kBFloat16; }
static bool is_pow2(int blocksize) { return (blocksize & (blocksize - 1)) == 0; }
// The state pointers a plain or a nested 4-bit state needs (see Q4Args).
static bool has_state(const Q4Args& q) {
  return q.absmax != nullptr ||
         (q.absmax_q != nullptr && q.nested_absmax != nullptr && q.nested_code != nullptr && q.offset != nullptr);
}

int quantize_4bit(const void* in, int in_dtype, int64_t n, int blocksize, int quant_type, uint8_t* packed,
                  float* absmax) {
  if (n <= 0 || blocksize <= 0 || (blocksize & 1) || !valid_dtype(in_dtype)) return kBadArgument;
  if (quant_type != core::kNF4 && quant_type != core::kFP4) return kBadArgument;
  if (use_avx2()) return avx2::quantize_4bit(in, in_dtype, n, blocksize, quant_type, packed, absmax);
  return generic_quantize_4bit(in, in_dtype, n, blocksize, quant_type, packed, absmax);
}

int dequantize_4bit(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q,
                    const float* nested_absmax, const float* nested_code, const float* offset, int64_t n,
                    int blocksize, int quant_type, void* out, int out_dtype) {
  const Q4Args q{packed, absmax, absmax_q, nested_absmax, nested_code, offset, n, blocksize, quant_type};
  if (n <= 0 || blocksize <= 0 || (blocksize & 1) || !valid_dtype(out_dtype) || !has_state(q)) return kBadArgument;
  advise_hugepages(out, n * dtype_size(out_dtype));
  if (use_avx512() && is_pow2(blocksize)) return avx512::dequantize_4bit(q, out, out_dtype);
  if (use_avx2()) return avx2::dequantize_4bit(q, out, out_dtype);
  return generic_dequantize_4bit(q, out, out_dtype);
}

int dequantize_4bit_tile(const Q4Args& q, int64_t N, int64_t K, int64_t n0, int64_t n1, int64_t k0, int64_t k1,
                         void* out, int out_dtype) {
  if (q.blocksize <= 0 || (q.blocksize & 1) || !valid_dtype(out_dtype) || N <= 0 || K <= 0 || N * K != q.n)
    return kBadArgument;
  if (n0 < 0 || n1 > N || n0 >= n1 || k0 < 0 || k1 > K || k0 >= k1 || !has_state(q)) return kBadArgument;
  if (use_avx512() && is_pow2(q.blocksize))
    return avx512::dequantize_4bit_tile(q, N, K, n0, n1, k0, k1, out, out_dtype);
  if (use_avx2()) return avx2::dequantize_4bit_tile(q, N, K, n0, n1, k0, k1, out, out_dtype);
  return generic_dequantize_4bit_tile(q, N, K, n0, n1, k0, k1, out, out_dtype);
}

int quantize_blockwise(const void* in, int in_dtype, int64_t n, int blocksize, const float* code, uint8_t* q,
                       float* absmax) {
  if (n <= 0 || blocksize <= 0 || !valid_dtype(in_dtype)) return kBadArgument;
  if (use_avx2()) return avx2::quantize_blockwise(in, in_dtype, n, blocksize, code, q, absmax);
  return generic_quantize_blockwise(in, in_dtype, n, blocksize, code, q, absmax);
}

int dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n, int blocksize,
                         void* out, int out_dtype) {
  if (n <= 0 || blocksize <= 0 || !valid_dtype(out_dtype)) return kBadArgument;
  advise_hugepages(out, n * dtype_size(out_dtype));
  if (use_avx2()) return avx2::dequantize_blockwise(q, absmax, code, n, blocksize, out, out_dtype);
  return generic_dequantize_blockwise(q, absmax, code, n, blocksize, out, out_dtype);
}

int quantize_absmax_int8(const void* in, int in_dtype, int64_t n, int64_t blocksize, int8_t* q, float* absmax) {
  if (n <= 0 || blocksize < 0 || !valid_dtype(in_dtype)) return kBadArgument;
  if (use_avx2()) return avx2::quantize_absmax_int8(in, in_dtype, n, blocksize, q, absmax);
  return generic_quantize_absmax_int8(in, in_dtype, n, blocksize, q, absmax);
}

int dequantize_absmax_int8(const int8_t* q, const float* absmax, int64_t n, int64_t blocksize, void* out,
                           int out_dtype) {
  if (n <= 0 || blocksize < 0 || !valid_dtype(out_dtype)) return kBadArgument;
  advise_hugepages(out, n * dtype_size(out_dtype));
  if (use_avx2()) return avx2::dequantize_absmax_int8(q, absmax, n, blocksize, out, out_dtype);
  return generic_dequantize_absmax_int8(q, absmax, n, blocksize, out, out_dtype);
}

static bool valid_q4(const Q4Args& q, int64_t N, int64_t K) {
  if (N <= 0 || K <= 0 || N * K != q.n || q.blocksize <= 0 || !is_pow2(q.blocksize) || !has_state(q)) return false;
  return q.quant_type == core::kNF4 || q.quant_type == core::kFP4;
}

int gemv_4bit(const float* x, int64_t M, const Q4Args& q, int64_t N, int64_t K, const float* bias, float* y) {
  if (M <= 0 || !valid_q4(q, N, K)) return kBadArgument;
  if (use_avx512()) return avx512::gemv_4bit(x, M, q, N, K, bias, y);
  if (!use_avx2()) return kUnsupported;
  return avx2::gemv_4bit(x, M, q, N, K, bias, y);
}

int gemv_t_4bit(const float* dy, int64_t M, const Q4Args& q, int64_t N, int64_t K, float* dx) {
  if (M <= 0 || !valid_q4(q, N, K)) return kBadArgument;
  if (use_avx512()) return avx512::gemv_t_4bit(dy, M, q, N, K, dx);
  if (!use_avx2()) return kUnsupported;
  return avx2::gemv_t_4bit(dy, M, q, N, K, dx);
}

}  // namespace cpu
}  // namespace nf4kit


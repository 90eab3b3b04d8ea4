// C++ CPU kernels.  Pointers are raw; Python (nf4kit/backends/cpu.py) validates every
// shape and dtype before calling, so these functions trust their sizes.
//
// Each entry point in namespace nf4kit::cpu picks, at run time, the best implementation the
// CPU has: AVX-512 (csrc/cpu/*_avx512.cpp, namespace nf4kit::cpu::avx512: 4-bit dequantize
// and the fused GEMVs; needs AVX-512 F/BW/VL plus the AVX2 set), then AVX2
// (csrc/cpu/*_avx2.cpp, nf4kit::cpu::avx2: AVX2 + FMA + F16C), then the portable code.
// All are bit-identical for the quantize/dequantize ops.
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <type_traits>

#ifdef NF4KIT_WITH_OPENMP
#include <omp.h>
#endif

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

// ---------------------------------------------------------------- kernel signatures
// One function type per kernel: the public entry points and each ISA's implementation are
// declared with it (a function type declares, it cannot define), so the signatures are
// written once.

// A [n] (dtype in_dtype: core::DType) -> packed [(n+1)/2] uint8, absmax [ceil(n/blocksize)] fp32.
using Quantize4bitFn = int(const void* in, int in_dtype, int64_t n, int blocksize, int quant_type,
                           uint8_t* packed, float* absmax);
// packed [(q.n+1)/2] -> out [q.n] (out_dtype).
using Dequantize4bitFn = int(const Q4Args& q, void* out, int out_dtype);
// A tile of a quantized [N, K] weight (flattened row-major, q.n == N*K): rows [n0, n1),
// columns [k0, k1) -> out row-major [n1-n0, k1-k0] in out_dtype.  Bit-identical to the same
// elements of dequantize_4bit.
using Dequantize4bitTileFn = int(const Q4Args& q, int64_t N, int64_t K, int64_t n0, int64_t n1, int64_t k0,
                                 int64_t k1, void* out, int out_dtype);
// 8-bit dynamic-map blockwise quantization: A [n] fp32/fp16/bf16 -> q [n] uint8, absmax fp32.
using QuantizeBlockwiseFn = int(const void* in, int in_dtype, int64_t n, int blocksize, const float* code,
                                uint8_t* q, float* absmax);
using DequantizeBlockwiseFn = int(const uint8_t* q, const float* absmax, const float* code, int64_t n,
                                  int blocksize, void* out, int out_dtype);
// Textbook absmax int8.  blocksize 0 = one block for the whole tensor.
//   c = fp32(fp32(1 / max(absmax, 1e-30)) * 127)   (what torch computes for 127.0 / t)
//   q = clamp(round_half_even(fp32(x * c)), -127, 127)
using QuantizeAbsmaxInt8Fn = int(const void* in, int in_dtype, int64_t n, int64_t blocksize, int8_t* q,
                                 float* absmax);
//   out = T(fp32(q) * fp32(absmax / 127))
using DequantizeAbsmaxInt8Fn = int(const int8_t* q, const float* absmax, int64_t n, int64_t blocksize, void* out,
                                   int out_dtype);
// Fused small-M forward: y [M, N] fp32 = x [M, K] fp32 · deq(W [N, K])ᵀ (+ bias fp32 [N] if
// given).  W is decoded on the fly (fp32 accumulation); the dequantized weight is never
// stored.
using Gemv4bitFn = int(const float* x, int64_t M, const Q4Args& q, int64_t N, int64_t K, const float* bias,
                       float* y);
// Fused small-M backward: dx [M, K] fp32 = dy [M, N] fp32 · deq(W [N, K]).
using GemvT4bitFn = int(const float* dy, int64_t M, const Q4Args& q, int64_t N, int64_t K, float* dx);

// ---------------------------------------------------------------- public entry points
Quantize4bitFn quantize_4bit;
// packed [(n+1)/2] -> out [n] (out_dtype).  See Q4Args for plain / nested state.
int dequantize_4bit(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q,
                    const float* nested_absmax, const float* nested_code, const float* offset,
                    int64_t n, int blocksize, int quant_type, void* out, int out_dtype);
Dequantize4bitTileFn dequantize_4bit_tile;
QuantizeBlockwiseFn quantize_blockwise;
DequantizeBlockwiseFn dequantize_blockwise;
QuantizeAbsmaxInt8Fn quantize_absmax_int8;
DequantizeAbsmaxInt8Fn dequantize_absmax_int8;
// The fused GEMVs run on AVX2 / AVX-512 only (kUnsupported on the generic path).
Gemv4bitFn gemv_4bit;
GemvT4bitFn gemv_t_4bit;

namespace avx2 {
Quantize4bitFn quantize_4bit;
Dequantize4bitFn dequantize_4bit;
Dequantize4bitTileFn dequantize_4bit_tile;
QuantizeBlockwiseFn quantize_blockwise;
DequantizeBlockwiseFn dequantize_blockwise;
QuantizeAbsmaxInt8Fn quantize_absmax_int8;
DequantizeAbsmaxInt8Fn dequantize_absmax_int8;
Gemv4bitFn gemv_4bit;
GemvT4bitFn gemv_t_4bit;
}  // namespace avx2

namespace avx512 {
Dequantize4bitFn dequantize_4bit;
Dequantize4bitTileFn dequantize_4bit_tile;
Gemv4bitFn gemv_4bit;
GemvT4bitFn gemv_t_4bit;
}  // namespace avx512

// Linux: ask for transparent huge pages on the 2 MiB-aligned interior of a large fresh
// output buffer before the first write.  A freshly mmapped buffer costs one page fault
// per 4 KiB otherwise, which on this kind of machine halves the write bandwidth.
void advise_hugepages(void* p, int64_t bytes);

// ================================================================ shared by the kernel files
// Loop skeletons and helpers of quant_cpu.cpp (generic), quant_avx2.cpp and quant_avx512.cpp:
// each file supplies only its per-ISA body, as a lambda.  Every one of those files is
// compiled for its own ISA, so all of this has internal linkage (unnamed namespace): the
// linker can never pick an AVX2- or AVX-512-encoded copy for a file that must run without
// them.  The skeletons are force-inlined templates, and so are the bodies passed to them
// (NF4_AI_LAMBDA after the lambda's parameter list): no calls in the hot loops.
#define NF4_AI inline __attribute__((always_inline))
#define NF4_AI_LAMBDA __attribute__((always_inline))

namespace {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int num_threads() {
#ifdef NF4KIT_WITH_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Uninitialised, 64-byte aligned scratch of `count` T; data() is nullptr when out of memory.
// Not std::vector: its out-of-line template members would be weak symbols compiled for this
// file's ISA, which the linker could pick for another file.
template <class T>
class Scratch {
 public:
  explicit Scratch(size_t count)
      : p_(static_cast<T*>(aligned_alloc(64, ((count * sizeof(T) + 63) / 64) * 64 + 64))) {}
  ~Scratch() { free(p_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* data() const { return p_; }

 private:
  T* p_;
};

// The per-block scales of a 4-bit state.  BlockScales is core::BlockScales as the calling
// file sees it (the ISA files include core/nf4_core.h into an unnamed namespace).
template <class BlockScales>
NF4_AI BlockScales block_scales(const Q4Args& q) {
  return BlockScales{q.absmax, q.absmax_q, q.nested_absmax, q.nested_code, q.offset ? *q.offset : 0.0f};
}

// int8 absmax: c = fp32(127 * fp32(1 / max(absmax, 1e-30))); q = clamp(round_half_even(x * c)).
NF4_AI float int8_scale(float amax) { return (1.0f / (amax > 1e-30f ? amax : 1e-30f)) * 127.0f; }
NF4_AI int8_t int8_encode(float x, float c) {
  const float v = nearbyintf(x * c);
  return (int8_t)(v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v));
}

// ---------------------------------------------------------------- loop skeletons
// The skeletons with an OpenMP region run a private copy of each body on every thread, and
// the bodies capture by value ([=]).  The captured values then live in the thread's
// registers, where the body's own stores (through uint8_t or vector pointers, which may
// alias anything) cannot clobber them; captured by reference, each would be reloaded after
// every such store.

// Blockwise quantizers / dequantizers: body(b, start, count) for every block b of [0, n)
// (elements [start, start + count); the tail block is shorter), blocks in parallel.
template <class Body>
NF4_AI void for_each_block(int64_t n, int64_t blocksize, const Body& body) {
  const int64_t nblocks = ceil_div(n, blocksize);
#pragma omp parallel
  {
    const Body run = body;
#pragma omp for schedule(static) nowait
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t start = b * blocksize;
      run(b, start, n - start < blocksize ? n - start : blocksize);
    }
  }
}

// Splits the elements [g, gend) at block boundaries: seg(b, start, end) for each piece, in
// order.  Power-of-two blocksizes (all the 4-bit format allows) index blocks by shifts: an
// integer division per segment costs as much as decoding it.  kPow2: the caller guarantees a
// power of two, so there is no run-time test.
template <bool kPow2 = false, class Seg>
NF4_AI void for_each_block_segment(int64_t g, int64_t gend, int64_t blocksize, Seg&& seg) {
  const bool pow2 = kPow2 || (blocksize & (blocksize - 1)) == 0;
  const int lg = __builtin_ctzll((unsigned long long)blocksize);
  while (g < gend) {
    const int64_t b = pow2 ? g >> lg : g / blocksize;
    const int64_t bend = pow2 ? (b + 1) << lg : (b + 1) * blocksize;
    const int64_t send = bend < gend ? bend : gend;
    seg(b, g, send);
    g = send;
  }
}

// Elementwise dequantizers: [0, n) in chunks of `chunk` elements in parallel, each chunk
// split at block boundaries: seg(b, start, end).
template <class Seg>
NF4_AI void for_each_chunk_segment(int64_t n, int64_t blocksize, int64_t chunk, const Seg& seg) {
  const int64_t nchunks = ceil_div(n, chunk);
#pragma omp parallel
  {
    const Seg run = seg;
#pragma omp for schedule(static) nowait
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t e0 = c * chunk;
      for_each_block_segment(e0, n - e0 < chunk ? n : e0 + chunk, blocksize, run);
    }
  }
}

// Whole-tensor 4-bit dequantize: [0, n) in chunks of whole blocks, ~16K elements (enough
// work per chunk, an L1/L2-sized output), in parallel: span(g0, len); then thread_done()
// once on every thread, after its last chunk.
template <class Span, class ThreadDone>
NF4_AI void for_each_block_chunk(int64_t n, int blocksize, const Span& span, const ThreadDone& thread_done) {
  const int64_t bpc = blocksize >= 16384 ? 1 : 16384 / blocksize;
  const int64_t chunk = bpc * blocksize;
  const int64_t nchunks = ceil_div(ceil_div(n, blocksize), bpc);
#pragma omp parallel
  {
    const Span run = span;
#pragma omp for schedule(static) nowait
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t g0 = c * chunk;
      run(g0, n - g0 < chunk ? n - g0 : chunk);
    }
    thread_done();
  }
}

// Tile dequantize: rows [n0, n1) x columns [k0, k1) of a row-major [N, K] weight, rows in
// parallel: row(g0, len, out_row) writes the elements [g0, g0 + len) to out_row.
template <class Row>
NF4_AI void for_each_tile_row(int64_t K, int64_t n0, int64_t n1, int64_t k0, int64_t k1, void* out,
                              int64_t elem_size, const Row& row) {
  const int64_t width = k1 - k0;
#pragma omp parallel
  {
    const Row run = row;
#pragma omp for schedule(static) nowait
    for (int64_t r = n0; r < n1; ++r) run(r * K + k0, width, static_cast<char*>(out) + (r - n0) * width * elem_size);
  }
}

// Fused forward GEMV: tile(std::integral_constant<int, MT>{}, m0) for the M tiles
// [m0, m0 + MT) of at most 4 rows of x (MT a compile-time constant for the tile kernel).
template <class Tile>
NF4_AI void for_each_m_tile(int64_t M, Tile&& tile) {
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4) tile(std::integral_constant<int, 4>{}, m0);
  switch (M - m0) {
    case 3: tile(std::integral_constant<int, 3>{}, m0); break;
    case 2: tile(std::integral_constant<int, 2>{}, m0); break;
    case 1: tile(std::integral_constant<int, 1>{}, m0); break;
    default: break;
  }
}

// Fused backward GEMV, dx [M, K] = dy [M, N] · W: each thread takes a contiguous range of
// rows of W and adds dy[m, n] · W[n, :] into its own zeroed fp32 accumulator [M, ld]:
// add_rows(n_begin, n_end, acc).  Then rows of dx are split across the threads: row m of
// the accumulators is summed in thread order into the first one (only this thread reads
// row m any more), and store_row(m, sum) writes it out.  Returns false when the
// accumulators cannot be allocated.
template <class AddRows, class StoreRow>
NF4_AI bool gemv_t_threads(int64_t M, int64_t N, int64_t K, int64_t ld, const AddRows& add_rows,
                           const StoreRow& store_row) {
  const int nt = (int)(num_threads() < N ? num_threads() : N);
  Scratch<float> partial_buf((size_t)nt * (size_t)(M * ld));
  float* const partial = partial_buf.data();
  if (!partial) return false;
#pragma omp parallel num_threads(nt)
  {
#ifdef NF4KIT_WITH_OPENMP
    const int tid = omp_get_thread_num();
    const int nth = omp_get_num_threads();
#else
    const int tid = 0, nth = 1;
#endif
    const AddRows add = add_rows;
    const StoreRow store = store_row;
    float* acc = partial + (size_t)tid * (size_t)(M * ld);
    memset(acc, 0, sizeof(float) * (size_t)(M * ld));
    add(N * tid / nth, N * (tid + 1) / nth, acc);
#pragma omp barrier
    for (int64_t m = M * tid / nth; m < M * (tid + 1) / nth; ++m) {
      float* s = partial + m * ld;
      for (int p = 1; p < nth; ++p) {
        const float* src = partial + (size_t)p * (size_t)(M * ld) + m * ld;
        for (int64_t i = 0; i < K; ++i) s[i] += src[i];
      }
      store(m, s);
    }
  }
  return true;
}

}  // namespace
}  // namespace cpu
}  // namespace nf4kit

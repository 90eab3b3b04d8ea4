// Decode GEMV for M <= 8 (M <= 16 on tensor cores): y[M, N] = x[M, K] . deq(W)^T (+ bias, + LoRA),
// W packed 4-bit.
//
// Bandwidth-bound: every packed byte of W is read once (16-byte streaming loads).  A warp owns
// kRowsPerWarp (1, 2, 4 or 8) rows and one K-split; lane L walks the split's 32-element chunks L, L+32, ...
// so each warp load covers 512 contiguous bytes per row, and the next chunk's weights (and
// raw absmax bytes) are loaded before the current chunk is multiplied: a register double
// buffer that keeps HBM busy while the ALUs decode.  The x chunk is loaded once per chunk and
// shared by the warp's rows.  Codes are decoded with a 16-entry shared table indexed by
// nibble*4 byte offsets built four at a time (two masks per 32-bit word, one byte_perm per
// code) and the (double-quantized) absmax is applied once per chunk.  fp32 accumulation.
// Split-K partial sums go to an fp32 scratch [S, M, N]; splitk_finalize() reduces them in a
// fixed order (deterministic) and applies bias and LoRA.
//
// Experimental memory-order stream (M = 1, K % 1024 == 0; kGemvStream): the kernel above keeps
// thousands of separate row streams in flight (every warp walks its own rows), and all of its
// variants stall at ~1.1 TB/s while a copy of the same bytes runs at ~3 TB/s.  Here a persistent
// grid reads W in memory order: warp g owns one 1024-wide K-tile (kt = g % tiles_per_row, so its
// 32 x values per lane sit in registers for the whole kernel) and visits rows n0, n0 + R, ... with
// R = warps / tiles_per_row; at any moment the grid's loads cover one contiguous window of
// ~warps x 512 bytes, as a copy's do.  Each (row, K-tile) dot is warp-reduced into partial[kt][n],
// and splitk_finalize sums the tiles in order (deterministic).
//
// Tensor-core stream (M <= 16, fp16/bf16 x; kGemvMma): the same memory order with a 256-wide
// K-tile per warp, the code pairs looked up straight into mma.sync A fragments (see
// gemv_4bit_mma_kernel and, for M > 1, gemv_4bit_mma_batch_kernel): about 1.9 instructions per
// weight at M = 1 against the stream kernel's 6.
//
// Compiled once per activation dtype (gemv_f32.cu, gemv_f16.cu, gemv_bf16.cu instantiate GemvLaunch<TX>),
// so that its ~80 kernel instances (per arch) build in parallel; everything up to GemvLaunch has internal
// linkage, so each of those translation units holds only its own dtype's kernels.
#pragma once

#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/cuda_kernels.h"
#include "cuda/gemv_launch.h"

namespace nf4kit {
namespace cuda {
namespace {
using namespace detail;

constexpr int kGemvThreads = 128;  // 4 warps
constexpr int kMaxClusterSplits = 8;  // the table GEMM's cluster sums: the portable cluster size

// 32 consecutive activations (16-byte aligned) as fp32.
__device__ __forceinline__ void load_x32(const float* p, float (&v)[32]) {
  const float4* q = reinterpret_cast<const float4*>(p);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float4 f = __ldg(q + i);
    v[4 * i] = f.x; v[4 * i + 1] = f.y; v[4 * i + 2] = f.z; v[4 * i + 3] = f.w;
  }
}
template <typename T>
__device__ __forceinline__ void load_x32(const T* p, float (&v)[32]) {
  const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint4 u = __ldg(q + i);
    unpack2<T>(u.x, v[8 * i], v[8 * i + 1]);
    unpack2<T>(u.y, v[8 * i + 2], v[8 * i + 3]);
    unpack2<T>(u.z, v[8 * i + 4], v[8 * i + 5]);
    unpack2<T>(u.w, v[8 * i + 6], v[8 * i + 7]);
  }
}

// Table value of the code whose byte offset (code * 4) is byte `i` of `offs`.
__device__ __forceinline__ float table_at(const float* table, uint32_t offs, int i) {
  const uint32_t o = __byte_perm(offs, 0u, 0x4440u + (uint32_t)i);
  return *reinterpret_cast<const float*>(reinterpret_cast<const char*>(table) + o);
}

// sum_i x[i] * table[code_i] over the 32 codes of a 16-byte chunk (high nibble first).
__device__ __forceinline__ float dot32(const uint4& w, const float* table, const float (&xv)[32]) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  float d0 = 0.0f, d1 = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t hi = (words[i] >> 2) & 0x3c3c3c3cu;  // byte b: high code * 4
    const uint32_t lo = (words[i] << 2) & 0x3c3c3c3cu;  // byte b: low code * 4
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      d0 = fmaf(xv[8 * i + 2 * b], table_at(table, hi, b), d0);
      d1 = fmaf(xv[8 * i + 2 * b + 1], table_at(table, lo, b), d1);
    }
  }
  return d0 + d1;
}

// The code pair for packed byte v in the mma kernels' fragment type H (fp16 or bf16): the
// high-nibble code's value in the low half (it is the earlier weight), the low-nibble code's in the
// high half, each rounded to H.
template <typename H>
__device__ __forceinline__ uint32_t pair_entry_of(int quant_type, uint32_t v) {
  const float* t = kCodeTables[quant_type == core::kNF4 ? 0 : 1];
  if constexpr (std::is_same<H, __half>::value) {
    const uint32_t first = __half_as_ushort(__float2half_rn(t[v >> 4]));
    const uint32_t second = __half_as_ushort(__float2half_rn(t[v & 15u]));
    return first | (second << 16);
  } else {
    const uint32_t first = __bfloat16_as_ushort(__float2bfloat16_rn(t[v >> 4]));
    const uint32_t second = __bfloat16_as_ushort(__float2bfloat16_rn(t[v & 15u]));
    return first | (second << 16);
  }
}

// The block's shared decode tables: the 16-entry code table and, for double quant, the 256 nested
// absmax codes.  The caller syncs.
__device__ __forceinline__ void build_tables(float* table, float* code, int quant_type, const Absmax& am) {
  init_table(table, quant_type);
  if (am.q != nullptr) {
    for (int i = threadIdx.x; i < 256; i += kGemvThreads) code[i] = __ldg(am.code + i);
  }
}

// Raw per-chunk inputs of one row: 16 packed bytes and the block's absmax (plain) or its
// uint8 code and nested scale (double quant; decoded at use, from the shared code table).
struct ChunkLoad {
  uint4 w;
  float a;      // plain absmax, or the nested absmax
  uint32_t q;   // nested: the 8-bit absmax code
};

// y[m, n] = T(sum + bias[n] + lora_t[m, :] . lora_b[n, :]): the split-K sum's epilogue, shared by
// the finalize kernel and the kernels that write y themselves (the block-reduced M = 1 GEMV, the table
// GEMM with one split or its cluster sums), so that all of them round the same way.
template <typename TX>
__device__ __forceinline__ void store_output(float sum, int64_t m, int64_t n, int N, const float* bias,
                                             const float* lora_t, const float* lora_b, int r, TX* y) {
  if (bias != nullptr) sum += bias[n];
  if (lora_t != nullptr) {
    float l = 0.0f;
    for (int j = 0; j < r; ++j) l = fmaf(lora_t[m * r + j], lora_b[n * r + j], l);
    sum += l;
  }
  y[m * N + n] = from_f32<TX>(sum);
}

// What a kernel that writes y itself needs (store_output's arguments).
struct GemvEpilogue {
  void* y = nullptr;
  const float* bias = nullptr;
  const float* lora_t = nullptr;  // [M, r], already scaled
  const float* lora_b = nullptr;  // [N, r]
  int r = 0;
  bool cluster_reduce = false;  // the table GEMM's K-splits sum in their cluster (kGemvMmaGemmCluster)
};

// Warp-reduce each row's per-lane sums; lane 0 writes them to slice s of the partials.
template <int MT, int RW>
__device__ __forceinline__ void write_partials(float (&acc)[RW][MT], int lane, int M, int N, int64_t row0, int s,
                                               float* __restrict__ partial) {
#pragma unroll
  for (int r = 0; r < RW; ++r) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < M) {
        float v = acc[r][m];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        const int64_t n = row0 + r;
        if (lane == 0 && n < N) partial[((int64_t)s * M + m) * N + n] = v;
      }
    }
  }
}

template <typename TX, int MT, int kRowsPerWarp, int kDepth>
__global__ void __launch_bounds__(kGemvThreads)
    gemv_4bit_kernel(const TX* __restrict__ x, int M, int N, int64_t K, const uint8_t* __restrict__ packed, Absmax am,
                     int log2_bs, int quant_type, int S, float* __restrict__ partial) {
  static_assert(kDepth >= 2 && kDepth <= 8, "chunks per row in a lane's load ring");
  __shared__ float table[16];
  __shared__ float code[256];
  const bool nested = am.q != nullptr;
  const int lane = threadIdx.x & 31;
  const int64_t row0 = ((int64_t)blockIdx.x * (kGemvThreads / 32) + (threadIdx.x >> 5)) * kRowsPerWarp;
  const int s = blockIdx.y;
  const int64_t cpr = K >> 5;                  // 32-element chunks per row
  const int64_t cps = (cpr + S - 1) / S;       // per split
  const int64_t c_lo = (int64_t)s * cps;
  const int64_t c_hi = c_lo + cps < cpr ? c_lo + cps : cpr;

  // Loads chunk c of the warp's rows into ld (nothing past the split's end or the last row).
  auto fetch = [&](int64_t c, ChunkLoad (&ld)[kRowsPerWarp]) {
    if (c >= c_hi) return;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      if (row0 + r < N) {
        const int64_t e0 = (row0 + r) * K + (c << 5);
        const int64_t blk = e0 >> log2_bs;
        ld[r].w = __ldcs(reinterpret_cast<const uint4*>(packed + (e0 >> 1)));  // read once: evict first
        if (nested) {
          ld[r].q = __ldg(am.q + blk);
          ld[r].a = __ldg(am.nested + (blk / core::kNestedBlocksize));
        } else {
          ld[r].a = __ldg(am.absmax + blk);
        }
      }
    }
  };

  // A ring of kDepth chunks per row: one is multiplied while the others are in flight (kDepth - 1
  // loads per row).  The first ones are requested before the tables are built, so HBM is busy
  // from the start.
  ChunkLoad ring[kDepth][kRowsPerWarp];
#pragma unroll
  for (int d = 0; d < kDepth; ++d)
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) ring[d][r] = ChunkLoad{make_uint4(0u, 0u, 0u, 0u), 0.0f, 0u};
  const int64_t c0 = c_lo + lane;
  if (row0 < N) {
#pragma unroll
    for (int d = 0; d < kDepth - 1; ++d) fetch(c0 + 32 * d, ring[d]);
  }

  build_tables(table, code, quant_type, am);
  __syncthreads();
  if (row0 >= N) return;  // whole warps exit together (after the only __syncthreads)
  const float offset = nested ? __ldg(am.offset) : 0.0f;

  float acc[kRowsPerWarp][MT];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.0f;

  auto multiply = [&](int64_t c, const ChunkLoad (&ld)[kRowsPerWarp]) {
    float sc[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
      sc[r] = nested ? core::nested_absmax_decode((uint8_t)ld[r].q, code, ld[r].a, offset) : ld[r].a;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (MT == 1 || m < M) {
        float xv[32];
        load_x32(x + (int64_t)m * K + (c << 5), xv);
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          acc[r][m] = fmaf(dot32(ld[r].w, table, xv), sc[r], acc[r][m]);
        }
      }
    }
  };

  if constexpr (kDepth == 2) {
    // The double buffer as timed: a rolled loop whose closing move waits for the load issued at
    // its top, after the multiply has covered it.
    for (int64_t c = c0; c < c_hi; c += 32) {
      if (c + 32 < c_hi) {
        fetch(c + 32, ring[1]);
      } else {
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) ring[1][r] = ring[0][r];
      }
      multiply(c, ring[0]);
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) ring[0][r] = ring[1][r];
    }
  } else {
    // Unrolled by kDepth so that slots rotate by compile-time index: a register move out of a
    // slot would wait for its load and cut the ring back to a double buffer.
    for (int64_t base = c0; base < c_hi; base += 32 * kDepth) {
#pragma unroll
      for (int d = 0; d < kDepth; ++d) {
        const int64_t c = base + 32 * d;
        fetch(c + 32 * (kDepth - 1), ring[(d + kDepth - 1) % kDepth]);  // refills the slot multiplied last
        if (c < c_hi) multiply(c, ring[d]);
      }
    }
  }

  write_partials<MT, kRowsPerWarp>(acc, lane, M, N, row0, s, partial);
}


constexpr int kStreamTile = 1024;  // K-elements per warp-tile: 32 lanes x 32 codes (16 bytes)

template <typename TX, int kDepth>
__global__ void __launch_bounds__(kGemvThreads)
    gemv_4bit_stream_kernel(const TX* __restrict__ x, int N, int64_t K, const uint8_t* __restrict__ packed, Absmax am,
                            int log2_bs, int quant_type, int warps_used, float* __restrict__ partial) {
  static_assert(kDepth >= 2 && kDepth <= 8, "row tiles in a lane's load ring");
  pdl_launch_dependents();  // a finalize launched with kGemvPdl may be scheduled now (no-op otherwise)
  __shared__ float table[16];
  __shared__ float code[256];
  const bool nested = am.q != nullptr;
  const int lane = threadIdx.x & 31;
  const int g = blockIdx.x * (kGemvThreads / 32) + (threadIdx.x >> 5);
  const int tiles_per_row = (int)(K / kStreamTile);
  const int R = warps_used / tiles_per_row;  // rows apart between one warp's consecutive tiles
  const bool active = g < warps_used;        // warp-uniform
  const int kt = g % tiles_per_row;
  const int n0 = g / tiles_per_row;
  const int64_t col = (int64_t)kt * kStreamTile + (lane << 5);  // this lane's 32 codes in a row

  auto fetch = [&](int n, ChunkLoad& ld) {
    if (!active || n >= N) return;
    const int64_t e0 = (int64_t)n * K + col;
    const int64_t blk = e0 >> log2_bs;
    ld.w = __ldcs(reinterpret_cast<const uint4*>(packed + (e0 >> 1)));  // read once: evict first
    if (nested) {
      ld.q = __ldg(am.q + blk);
      ld.a = __ldg(am.nested + (blk / core::kNestedBlocksize));
    } else {
      ld.a = __ldg(am.absmax + blk);
    }
  };

  // The first kDepth - 1 tiles are requested before the tables are built.
  ChunkLoad ring[kDepth];
#pragma unroll
  for (int d = 0; d < kDepth; ++d) ring[d] = ChunkLoad{make_uint4(0u, 0u, 0u, 0u), 0.0f, 0u};
#pragma unroll
  for (int d = 0; d < kDepth - 1; ++d) fetch(n0 + d * R, ring[d]);

  build_tables(table, code, quant_type, am);
  __syncthreads();
  if (!active) return;  // whole warps exit together (after the only __syncthreads)
  const float offset = nested ? __ldg(am.offset) : 0.0f;
  float xv[32];
  load_x32(x + col, xv);  // the same K-tile for every row this warp visits

  // Unrolled by kDepth so that ring slots rotate by compile-time index (as the row kernel's ring).
  for (int base = n0; base < N; base += kDepth * R) {
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      const int n = base + d * R;
      fetch(n + (kDepth - 1) * R, ring[(d + kDepth - 1) % kDepth]);  // refills the slot used last
      if (n < N) {  // warp-uniform
        const ChunkLoad& ld = ring[d];
        const float sc = nested ? core::nested_absmax_decode((uint8_t)ld.q, code, ld.a, offset) : ld.a;
        float v = dot32(ld.w, table, xv) * sc;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) partial[(int64_t)kt * N + n] = v;
      }
    }
  }
}

// Experimental tensor-core variant of the stream kernel (kGemvMma; M = 1, fp16/bf16 x, K % 256 == 0,
// blocksize >= 64, N * K < 2^32 - 256).  The stream kernel's main loop spends 6 instructions per
// weight (PRMT + LDS + FFMA per code, the scale, the reduction; static sm_90 SASS); on the H100
// that issue rate, not HBM, holds M = 1 near 28 us.  Here a packed byte costs two instructions: one PRMT that writes the byte into bits 8-15
// of this lane's table address (a 64 KB per-lane table of fp16/bf16 pairs on a 64 KB boundary of
// the shared window, entry v of lane L at table + v * 256 + 4 L: always bank L, no conflicts, and
// no add) and the LDS that returns an mma A register (two consecutive k of one row).  mma.sync
// m16n8k16 then multiplies 16 rows x 16 k with fp32 accumulation.
//
// Warp g owns the 256-wide K-tile kt = g % (K / 256) and visits 16-row blocks rb0, rb0 + R, ...
// (the grid sweeps W in memory order, as the stream kernel).  A visit loads, per lane (grp, tid),
// 16 bytes of rows grp and grp + 8 at bytes 64 j + 16 tid of the row tile (j = 0, 1): those lie in
// 64-wide quarter Q = 2 j + tid / 2 of the tile, one quantization block at blocksize >= 64.  mma
// (j, i) takes bytes 2 i (k slot tid) and 2 i + 1 (slot tid + 4) of every lane, and B column c
// holds x only where the slot's quarter is c (lane (grp = Q, tid) loads x, the rest hold 0): so
// C[row][Q] is the unscaled dot of that row's quarter Q.  After the 16 mmas of a visit, lanes
// tid 0 and 1 hold quarters 2 tid and 2 tid + 1 of rows grp and grp + 8; their absmax are read by
// lanes tid & 1 (row grp) and tid | 2 (row grp + 8) and exchanged with one shuffle, and one more
// shuffle sums each row's four quarters into partial[kt][row]; splitk_finalize sums the tiles.
constexpr int kMmaTile = 256;     // K per warp tile: 4 quarters of 64
constexpr int kMmaThreads = 512;  // 16 warps share one table (one block per SM)
constexpr int kMmaTableBytes = 256 * 256;
// The table on the first 64 KB boundary of the block's shared window, then the nested absmax code.
constexpr int kMmaSmemBytes = 2 * kMmaTableBytes + 256 * (int)sizeof(float);

// 32-bit words at 32-bit shared-window addresses; lds_u32 adds kOff in the instruction itself
// (LDS [R + imm]: the compact table GEMM's table base).
template <uint32_t kOff = 0>
__device__ __forceinline__ uint32_t lds_u32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1+%2];\n" : "=r"(v) : "r"(addr), "n"(kOff));
  return v;
}
__device__ __forceinline__ uint2 lds_u64(uint32_t addr) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(addr));
  return v;
}
__device__ __forceinline__ void sts_f32(uint32_t addr, float v) {
  asm volatile("st.shared.f32 [%0], %1;\n" : : "r"(addr), "f"(v) : "memory");
}
__device__ __forceinline__ float lds_f32(uint32_t addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(addr));
  return v;
}

// This lane's shared-window addresses in the table below: its entry 0 (bits 8-15 take a packed byte,
// see mma_a_from_table) and the nested absmax code.
struct MmaTable {
  uint32_t lane_entry, code_at;
};

// The per-lane pair entries at `table` (entry v of lane L at table + v * 256 + 4 L; bytes 128..255
// of each 256 are left alone) and, for double quant, the nested absmax code at `code`.
template <typename TX>
__device__ __forceinline__ void mma_fill_table(unsigned char* table, float* code, int quant_type, const Absmax& am) {
  for (int i = threadIdx.x; i < 256 * 32; i += blockDim.x)
    *reinterpret_cast<uint32_t*>(table + (i >> 5) * 256 + 4 * (i & 31)) = pair_entry_of<TX>(quant_type, (uint32_t)i >> 5);
  if (am.q != nullptr)
    for (int i = threadIdx.x; i < 256; i += blockDim.x) code[i] = __ldg(am.code + i);
}

// The per-lane pair table on the first 64 KB boundary of the dynamic shared memory (entry v of lane
// L at table + v * 256 + 4 L) and, after it, the nested absmax code; returns this lane's addresses
// in them.  The caller synchronises before the first lookup.
template <typename TX>
__device__ __forceinline__ MmaTable mma_build_table(unsigned char* smem, int quant_type, const Absmax& am) {
  const uint32_t smem0 = (uint32_t)__cvta_generic_to_shared(smem);
  const uint32_t table_at = (smem0 + (kMmaTableBytes - 1)) & ~(uint32_t)(kMmaTableBytes - 1);
  unsigned char* table = smem + (table_at - smem0);
  mma_fill_table<TX>(table, reinterpret_cast<float*>(table + kMmaTableBytes), quant_type, am);
  return MmaTable{table_at | ((threadIdx.x & 31u) * 4u), table_at + kMmaTableBytes};
}

// Where the dynamic shared memory starts in a block's shared window when the kernel has no static
// shared variables: 0x400 from sm_90 on (1 KB reserved for the system), 0 before (nvcc 13's
// placement, checked at the compact kernel's start).
__device__ __forceinline__ constexpr uint32_t dynamic_smem_low() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return 0x400u;
#else
  return 0u;
#endif
}

// The compact M = 1 kernel's shared memory (kGemvMmaCompact), from the dynamic base D: the table at
// D itself (entry v of lane L at D + 256 v + 4 L; the LDS adds D as its immediate offset, as in the
// compact table GEMM), then the block's W <= 16 x tiles, 256 elements each, with 16 bytes of padding
// after every 64 elements (kTileStride = 576): a lane's B fragment reads (tid 0..3 at element 32 tid)
// then fall in four distinct 8-byte bank slots (0, 8, 2, 10 of 16).  Lanes whose quarter an mma does
// not take read zeros at kZero, one address for all of them (a broadcast) in bank slot 4 past the
// tiles', so no lane conflicts with them.  Then the nested absmax code and the BR row sums.  78 KB for
// 4 visits: two 16-warp blocks an SM where the single-block kernel's 129 KB table holds one.
struct MmaCompactLayout {
  static constexpr uint32_t kX = kMmaTableBytes, kTileStride = 2 * kMmaTile + 4 * 16;
  static constexpr uint32_t kZero = kX + 16 * kTileStride + 32;  // bank slot 4 of 16 past kX's 0
  static constexpr uint32_t kJStride = 2 * 128 + 2 * 16;          // x elements 128 j: two 64-element pieces
  static constexpr uint32_t kZeroBytes = kJStride + 64;           // every zero-lane read, j = 0, 1, i = 0..7
  static constexpr uint32_t kCode = kZero + kZeroBytes;
  static constexpr uint32_t kRed = kCode + 256 * (uint32_t)sizeof(float);
  // x element e of the block's tile w (e % 4 == 0: one 8-byte piece) from the dynamic base.
  __host__ __device__ static constexpr uint32_t x_at(int w, int e) {
    return kX + kTileStride * (uint32_t)w + 2u * (uint32_t)e + 16u * (uint32_t)(e >> 6);
  }
};
static_assert(MmaCompactLayout::x_at(0, 128) - MmaCompactLayout::x_at(0, 0) == MmaCompactLayout::kJStride,
              "the B reads of quarter pair j = 1 sit kJStride past j = 0's");
static_assert(MmaCompactLayout::kZero % 16 == 0 && (MmaCompactLayout::kZero / 8) % 16 == 4 &&
                  (MmaCompactLayout::kX / 8) % 16 == 0 && (MmaCompactLayout::kTileStride / 8) % 8 == 0,
              "zero reads in bank slot 4, the tiles' lane reads in slots 0, 2, 8, 10 (+ 8 w)");

// The compact layout's table at the dynamic base (its LDS adds the base, dynamic_smem_low()) and the
// nested absmax code: this lane's addresses, the entry relative to the base.
template <typename TX>
__device__ __forceinline__ MmaTable mma_build_compact_table(unsigned char* smem, uint32_t smem0, int quant_type,
                                                            const Absmax& am) {
  mma_fill_table<TX>(smem, reinterpret_cast<float*>(smem + MmaCompactLayout::kCode), quant_type, am);
  return MmaTable{(threadIdx.x & 31u) * 4u, smem0 + MmaCompactLayout::kCode};
}

// Where a warp of the tensor-core GEMVs works (persistent grid, memory order): the 256-wide K-tile
// kt, its first 16-row block rb0 and the R row blocks between its visits; inactive warps only help
// build the table.
struct MmaWarp {
  int kt, rb0, R, row_blocks;
  bool active;  // warp-uniform
};
__device__ __forceinline__ MmaWarp mma_warp(int N, int64_t K, int warps_used) {
  const int g = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int tiles_per_row = (int)(K / kMmaTile);
  return MmaWarp{g % tiles_per_row, g / tiles_per_row, warps_used / tiles_per_row, (N + 15) >> 4, g < warps_used};
}

// The block-reduced M = 1 kernel's warps (BR below): each row of K-tiles is split into
// row_parts = ceil(tiles / W) parts of W consecutive tiles, one per block, the last one part-idle
// when W does not divide the tiles; block b works on part b % row_parts of row blocks
// b / row_parts, b / row_parts + R, ... with R = gridDim.x / row_parts.  An idle warp (its tile
// past the row) gets no visits.
struct MmaBlockPart {
  int part, row_parts, first_row_block, active_warps;
};
__device__ __forceinline__ MmaBlockPart mma_block_part(int64_t K) {
  const int tiles_per_row = (int)(K / kMmaTile), W = blockDim.x >> 5;
  const int row_parts = (tiles_per_row + W - 1) / W, part = blockIdx.x % row_parts;
  return MmaBlockPart{part, row_parts, (int)blockIdx.x / row_parts, min(W, tiles_per_row - part * W)};
}
__device__ __forceinline__ MmaWarp mma_block_warp(int N, const MmaBlockPart& bp) {
  const int W = blockDim.x >> 5, warp = threadIdx.x >> 5, row_blocks = (N + 15) >> 4;
  const bool active = warp < bp.active_warps;
  return MmaWarp{bp.part * W + warp, active ? bp.first_row_block : row_blocks, (int)gridDim.x / bp.row_parts,
                 row_blocks, active};
}

// A ring of D visits' weight registers (Slot: one visit's bytes), zeroed, its first D - 1 fetched.
// Rows past N keep stale bytes later: they only reach their own rows of C, which are not written.
template <int D, typename Slot, typename Fetch>
__device__ __forceinline__ void mma_prefetch(const MmaWarp& w, Slot (&ring)[D], Fetch&& fetch) {
#pragma unroll
  for (int u = 0; u < D; ++u) ring[u] = Slot{};
  if (w.active) {
#pragma unroll
    for (int u = 0; u + 1 < D; ++u)
      if (w.rb0 + u * w.R < w.row_blocks) fetch(ring[u]);
  }
}

// The warp's visits rb0, rb0 + R, ..., each reading ring slot u while the slot D - 1 visits ahead
// fills (visit(rb, cur, next) fetches into next).
template <int D, typename Slot, typename Visit>
__device__ __forceinline__ void mma_sweep(const MmaWarp& w, Slot (&ring)[D], Visit&& visit) {
  for (int rb = w.rb0; rb < w.row_blocks; rb += D * w.R) {
#pragma unroll
    for (int u = 0; u < D; ++u) {
      if (rb + u * w.R >= w.row_blocks) break;
      visit(rb + u * w.R, ring[u], ring[(u + D - 1) % D]);
    }
  }
}

// An mma A fragment from the table: bytes lo and lo + 1 of word r0 (row grp) and of word r1 (row
// grp + 8) as k slots tid and tid + 4.  Each byte written into bits 8-15 of lane_entry (selectors
// 4, 6, 7 keep lane_entry's other bytes) is the shared address of its code pair: PRMT + LDS.
// kTableOff (the compact table GEMM's table, not on a 64 KB boundary): a constant added by the LDS
// itself (its immediate offset), so the lookup stays PRMT + LDS.
template <uint32_t kTableOff = 0>
__device__ __forceinline__ void mma_a_from_table(uint32_t (&a)[4], uint32_t r0, uint32_t r1, uint32_t lo,
                                                 uint32_t lane_entry) {
  const uint32_t sel_lo = 0x7604u | (lo << 4), sel_hi = 0x7604u | ((lo + 1u) << 4);
  a[0] = lds_u32<kTableOff>(__byte_perm(r0, lane_entry, sel_lo));
  a[1] = lds_u32<kTableOff>(__byte_perm(r1, lane_entry, sel_lo));
  a[2] = lds_u32<kTableOff>(__byte_perm(r0, lane_entry, sel_hi));
  a[3] = lds_u32<kTableOff>(__byte_perm(r1, lane_entry, sel_hi));
}

// This lane's read position in W: rows `row` and `row + 8` of the warp's next visit, at byte
// `lane_byte` of its K-tile, and the flat element index `scale_e` of the first absmax it reads
// there (row + scale_rows, element scale_k of the tile; N * K < 2^32); next() moves both on by the
// warp's R row blocks.  Steps in 32 bits (R * 16 * K / 2 < 2^32), and row grp + 8's bytes at
// rows8(K) from the kernel's own K rather than held: registers the compact M = 1 kernel needs.
struct MmaCursor {
  const uint8_t* p;
  int row;
  uint32_t step;
  int rows_step;
  uint32_t scale_e, scale_step;
  __device__ __forceinline__ static int64_t rows8(int64_t K) { return 8 * (K >> 1); }
  __device__ __forceinline__ MmaCursor(const uint8_t* packed, const MmaWarp& w, int64_t K, int grp, int lane_byte,
                                       int scale_rows, int scale_k)
      : p(packed + (int64_t)(w.rb0 * 16 + grp) * (K >> 1) + (int64_t)w.kt * (kMmaTile / 2) + lane_byte),
        row(w.rb0 * 16 + grp), step((uint32_t)w.R * 16u * (uint32_t)(K >> 1)), rows_step(16 * w.R),
        scale_e((uint32_t)(w.rb0 * 16 + grp + scale_rows) * (uint32_t)K + (uint32_t)w.kt * kMmaTile + scale_k),
        scale_step((uint32_t)w.R * 16u * (uint32_t)K) {}
  __device__ __forceinline__ void next() {
    row += rows_step;
    p += step;
    scale_e += scale_step;
  }
};

// One visit's weight bytes of the M = 1 kernel (rows grp, grp + 8 x 16 bytes at 64 j + 16 tid)
// and of the batch kernel (rows grp, grp + 8 x 8 bytes per quarter q at 32 q + 8 tid).
// Each slot also carries the visit's raw absmax inputs, fetched with its bytes, so that no visit
// waits on a dependent global load (absmax code, then nested scale) before its scales: two
// absmax codes packed as q0 | q1 << 16 and the nested scale(s) (double quant), or the plain absmax.
struct MmaBytes16 {
  uint4 w[2][2];
  uint32_t q;  // double quant: this lane's two absmax codes; plain: the second absmax's bits
  float s[1];  // double quant: the nested absmax (both blocks share it); plain: the first absmax
};
struct MmaBytes8 {
  uint2 w[2][4];
  uint32_t q;  // double quant: the absmax codes of rows grp and grp + 8
  float s[2];  // double quant: their nested absmax; plain: their absmax
};

// Raw scale inputs of absmax blocks b0, b1 (flat block indices) into a slot; double quant keeps
// one nested scale when both blocks share a nested block (kSameNested), whose slot then holds a
// plain second absmax in q (one register a slot fewer: the compact M = 1 kernel's ring spilled it).
template <bool kSameNested, typename Slot>
__device__ __forceinline__ void mma_fetch_scales(Slot& slot, const Absmax& am, uint32_t b0, uint32_t b1) {
  if (am.q != nullptr) {
    slot.q = (uint32_t)__ldg(am.q + b0) | ((uint32_t)__ldg(am.q + b1) << 16);
    slot.s[0] = __ldg(am.nested + b0 / core::kNestedBlocksize);
    if constexpr (!kSameNested) slot.s[1] = __ldg(am.nested + b1 / core::kNestedBlocksize);
  } else {
    slot.s[0] = __ldg(am.absmax + b0);
    if constexpr (kSameNested)
      slot.q = __float_as_uint(__ldg(am.absmax + b1));
    else
      slot.s[1] = __ldg(am.absmax + b1);
  }
}

// Absmax h (0 or 1) of a slot fetched by mma_fetch_scales, decoded (nested: through the shared code table).
template <bool kSameNested, typename Slot>
__device__ __forceinline__ float mma_scale(const Slot& slot, int h, bool nested, uint32_t code_at, float offset) {
  if constexpr (kSameNested) {
    if (!nested) return h == 0 ? slot.s[0] : __uint_as_float(slot.q);
    const uint32_t code = (slot.q >> (16 * h)) & 0xffu;
    return core::nested_absmax_from_code(lds_f32(code_at + 4u * code), slot.s[0], offset);
  } else {
    if (!nested) return slot.s[h];
    const uint32_t code = (slot.q >> (16 * h)) & 0xffu;
    return core::nested_absmax_from_code(lds_f32(code_at + 4u * code), slot.s[h], offset);
  }
}

// BR (kGemvMmaBlockReduce, experimental): the block's W warps own W consecutive K-tiles of the same
// rows (one part of the row, mma_block_part; W from mma_block_warps), so they sum their tiles in
// shared memory instead of writing S = K / 256 partial slices for the finalize: each visit's row
// sums go to red[visit][warp][16], and after the sweep the block adds its active warps' sums in warp
// order.  With one part per row (K = 4096: W = 16) that is the whole row, written to y with bias
// and LoRA (store_output): no finalize launch.  Otherwise it writes slice `part` of the row's parts
// for a short finalize (K = 14336: 4 slices instead of 56).  Nsight Compute put the plain finalize
// at 6.5 us of a 24 us M = 1 call (S = 56).
//
// CX (kGemvMmaCompact, experimental; with BR): the same sums in MmaCompactLayout's 78 KB
// and at most 64 registers, two blocks an SM (32 warps against 16): the table at the dynamic base,
// and the block's x tiles staged in shared memory, each mma's B fragment read there (8 bytes; ptxas
// pairs them into LDS.128) instead of held in 32 registers.  The same warps, visits and sums: its output equals BR's bit for
// bit (GPU test).
template <typename TX, int D, bool BR = false, bool CX = false>
__global__ void __launch_bounds__(kMmaThreads, CX ? 2 : 1)
    gemv_4bit_mma_kernel(const TX* __restrict__ x, int N, int64_t K, const uint8_t* __restrict__ packed, Absmax am,
                         int log2_bs, int quant_type, int warps_used, float* __restrict__ partial, GemvEpilogue ep) {
  static_assert(!std::is_same<TX, float>::value, "mma fragments are fp16 or bf16");
  static_assert(!CX || BR, "the compact form is the block-reduced kernel's");
  pdl_launch_dependents();  // a finalize launched with kGemvPdl may be scheduled now (no-op otherwise)
  extern __shared__ __align__(16) unsigned char mma_smem[];
  constexpr uint32_t kTableOff = CX ? dynamic_smem_low() : 0u;
  const uint32_t smem0 = (uint32_t)__cvta_generic_to_shared(mma_smem);
  if constexpr (CX) {
    if (smem0 != kTableOff) __trap();  // the table's LDS offset assumes this base
  }
  const bool nested = am.q != nullptr;
  const int lane = threadIdx.x & 31;
  const int grp = lane >> 2, tid = lane & 3;
  const MmaBlockPart bp = BR ? mma_block_part(K) : MmaBlockPart{};
  const MmaWarp wa = BR ? mma_block_warp(N, bp) : mma_warp(N, K, warps_used);
  const int kt = wa.kt, R = wa.R, row_blocks = wa.row_blocks;
  const int W = blockDim.x >> 5;  // warps a block (BR: the K-tiles of its part)

  // This lane's weight bytes: rows grp (+ 8) of the next row block to fetch, bytes 16 tid + 64 j of the tile.
  // The absmax this lane reads: row grp + 8 (tid >> 1), quarters 2 (tid & 1) and + 1; both quarters
  // share one nested block (their blocks are 2b, 2b + 1 or one).
  const int scale_row_off = 8 * (tid >> 1);  // from row grp
  MmaCursor wc(packed, wa, K, grp, 16 * tid, scale_row_off, 128 * (tid & 1));
  auto fetch = [&](MmaBytes16& b) {
    if (wc.row < N) {
      b.w[0][0] = __ldcs(reinterpret_cast<const uint4*>(wc.p));
      b.w[0][1] = __ldcs(reinterpret_cast<const uint4*>(wc.p + 64));
    }
    if (wc.row + 8 < N) {
      // CX: 32-bit (its launcher takes K < 2^30), whose zero extension costs no register held.
      const int64_t rows8 = CX ? (int64_t)(4u * (uint32_t)K) : MmaCursor::rows8(K);
      b.w[1][0] = __ldcs(reinterpret_cast<const uint4*>(wc.p + rows8));
      b.w[1][1] = __ldcs(reinterpret_cast<const uint4*>(wc.p + rows8 + 64));
    }
    if (wc.row + scale_row_off < N)
      mma_fetch_scales<true>(b, am, wc.scale_e >> log2_bs, (wc.scale_e + 64u) >> log2_bs);
    wc.next();
  };
  MmaBytes16 ring[D];
  mma_prefetch(wa, ring, fetch);

  const MmaTable tab = CX ? mma_build_compact_table<TX>(mma_smem, smem0, quant_type, am)
                          : mma_build_table<TX>(mma_smem, quant_type, am);
  if constexpr (CX) {
    // The block's x tiles (part bp.part's W tiles, those in the row) and the zeros.
    using L = MmaCompactLayout;
    for (int p = threadIdx.x; p < bp.active_warps * (kMmaTile / 4); p += blockDim.x) {
      const int w = p / (kMmaTile / 4), e = 4 * (p % (kMmaTile / 4));
      *reinterpret_cast<uint2*>(mma_smem + L::x_at(w, e)) =
          __ldg(reinterpret_cast<const uint2*>(x + (int64_t)(bp.part * W + w) * kMmaTile + e));
    }
    for (int i = threadIdx.x; i < (int)(L::kZeroBytes / 4); i += blockDim.x)
      reinterpret_cast<uint32_t*>(mma_smem + L::kZero)[i] = 0u;
  }
  __syncthreads();
  // Whole warps exit together (after the only __syncthreads; BR: idle warps stay for the block's
  // last one, with no visits).
  if (!BR && !wa.active) return;
  const float offset = nested ? __ldg(am.offset) : 0.0f;

  // B fragments of mma (j, i): x elements 128 j + 32 tid + 4 i .. + 3 of the tile, in column
  // grp, kept only where grp is this lane's quarter of load j.  CX: read per mma from the staged
  // tile at xs_at[j] + 8 i (the zeros where not this lane's quarter).
  uint32_t xb[CX ? 1 : 2][8][2];
  uint32_t xs_at[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const bool mine = grp == 2 * j + (tid >> 1) && wa.active;
    if constexpr (CX) {
      xs_at[j] = smem0 + (mine ? MmaCompactLayout::x_at(threadIdx.x >> 5, 128 * j + 32 * tid)
                               : MmaCompactLayout::kZero + MmaCompactLayout::kJStride * j);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        uint2 v = make_uint2(0u, 0u);
        if (mine) v = __ldg(reinterpret_cast<const uint2*>(x + (int64_t)kt * kMmaTile + 128 * j + 32 * tid + 4 * i));
        xb[j][i][0] = v.x;
        xb[j][i][1] = v.y;
      }
    }
  }

  // This lane's output: lane tid 0 row grp, lane tid 1 row grp + 8 (tid 2 and 3 write nothing).
  const int out_row_off = grp + 8 * (tid & 1);
  float* out = partial + (int64_t)kt * N;
  // BR: this warp's row sums, visit v at red[(v * W + warp) * 16 + row in the block] (16 lanes, 16 banks);
  // red_at: this lane's for the next visit, a shared-window address moved on by W * 16 floats a visit
  // (one register: a visit counter beside it spilled in the compact form).
  constexpr uint32_t kRedOff = CX ? MmaCompactLayout::kRed : (uint32_t)kMmaSmemBytes;
  float* red = reinterpret_cast<float*>(mma_smem + kRedOff);
  uint32_t red_at = smem0 + kRedOff + 4u * (uint32_t)((threadIdx.x >> 5) * 16 + out_row_off);

  auto visit = [&](int rb, const MmaBytes16& cur, MmaBytes16& nxt) {
    // Rows past N decode the slot's zeroed or stale scale inputs: they reach only their own rows.
    const float sa = mma_scale<true>(cur, 0, nested, tab.code_at, offset);
    const float sb = mma_scale<true>(cur, 1, nested, tab.code_at, offset);
    if (rb + (D - 1) * R < row_blocks) fetch(nxt);
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int w = i >> 1;
        const uint4& c0 = cur.w[0][j];
        const uint4& c1 = cur.w[1][j];
        uint32_t a[4];
        mma_a_from_table<kTableOff>(a, w == 0 ? c0.x : w == 1 ? c0.y : w == 2 ? c0.z : c0.w,
                                    w == 0 ? c1.x : w == 1 ? c1.y : w == 2 ? c1.z : c1.w, (uint32_t)(2 * (i & 1)),
                                    tab.lane_entry);
        if constexpr (CX) {
          const uint2 v = lds_u64(xs_at[j] + 8u * (uint32_t)i);
          const uint32_t b[2] = {v.x, v.y};
          mma16816<TX>(c, a, b);
        } else {
          mma16816<TX>(c, a, xb[j][i]);
        }
      }
    }
    // Lanes tid 0 / 1: (sa, sb) are row grp's scales, the partner's (tid + 2) row grp + 8's.
    const float oa = __shfl_xor_sync(0xffffffffu, sa, 2), ob = __shfl_xor_sync(0xffffffffu, sb, 2);
    float v0 = fmaf(c[0], sa, c[1] * sb), v1 = fmaf(c[2], oa, c[3] * ob);
    v0 += __shfl_xor_sync(0xffffffffu, v0, 1);
    v1 += __shfl_xor_sync(0xffffffffu, v1, 1);
    if constexpr (BR) {
      if (tid < 2) sts_f32(red_at, (tid & 1) ? v1 : v0);
      red_at += 64u * (uint32_t)W;
    } else {
      const int row = rb * 16 + out_row_off;
      if (tid < 2 && row < N) out[row] = (tid & 1) ? v1 : v0;
    }
  };

  mma_sweep(wa, ring, visit);
  if constexpr (BR) {
    // Each row's sums over the block's active warps in warp order, from 0 as the finalize's sum starts.
    __syncthreads();
    const int visits = (row_blocks - bp.first_row_block + R - 1) / R;
    for (int t = threadIdx.x; t < visits * 16; t += blockDim.x) {
      const int v = t >> 4, row = (bp.first_row_block + v * R) * 16 + (t & 15);
      if (row >= N) continue;
      float sum = 0.0f;
      for (int k = 0; k < bp.active_warps; ++k) sum += red[(v * W + k) * 16 + (t & 15)];
      if (bp.row_parts == 1)
        store_output<TX>(sum, 0, row, N, ep.bias, ep.lora_t, ep.lora_b, ep.r, static_cast<TX*>(ep.y));
      else
        partial[(int64_t)bp.part * N + row] = sum;
    }
  }
}

// A lane's accumulators in the tensor-core batch kernels: acc[t][2 h + u] is batch row 8 t + 2 tid + u
// of W row `row` + 8 h (mma C fragments, W rows as M, batch rows as N); f(m, n, value) for those
// inside M x N.  m0: the batch row of the lane's first n-tile (the compact kernel's second half).
template <int NT, typename F>
__device__ __forceinline__ void for_each_batch_output(const float (&acc)[NT][4], int tid, int row, int M, int N,
                                                      F&& f, int m0 = 0) {
#pragma unroll
  for (int t = 0; t < NT; ++t) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int m = m0 + 8 * t + 2 * tid + u, n = row + 8 * h;
        if (m < M && n < N) f(m, n, acc[t][2 * h + u]);
      }
    }
  }
}

// One 256-wide tile of the batch scheme (the batch kernel's visit, a table-GEMM tile) into acc: per
// 64-wide quarter q, the A fragments of rows grp, grp + 8 from the table (cur: 8 bytes per quarter
// and row, bytes 2 i and 2 i + 1 for mma i), NT mma each with B fragment b_frag(t, q, i, b) (batch
// row 8 t + grp's x elements 64 q + 16 tid + 4 i .. + 3), then the quarter's scales: lane tid holds
// quarter tid's absmax of both rows (s0, s8), shuffled to the group.
template <typename TX, uint32_t kTableOff = 0, int NT, typename BFrag>
__device__ __forceinline__ void mma_batch_tile(float (&acc)[NT][4], const MmaBytes8& cur, uint32_t lane_entry,
                                               float s0, float s8, int lane, BFrag&& b_frag) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    float c[NT][4];
#pragma unroll
    for (int t = 0; t < NT; ++t) c[t][0] = c[t][1] = c[t][2] = c[t][3] = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      uint32_t a[4];
      mma_a_from_table<kTableOff>(a, i < 2 ? cur.w[0][q].x : cur.w[0][q].y,
                                  i < 2 ? cur.w[1][q].x : cur.w[1][q].y, (uint32_t)(2 * (i & 1)), lane_entry);
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        uint32_t b[2];
        b_frag(t, q, i, b);
        mma16816<TX>(c[t], a, b);
      }
    }
    const float q0 = __shfl_sync(0xffffffffu, s0, (lane & ~3) | q);
    const float q8 = __shfl_sync(0xffffffffu, s8, (lane & ~3) | q);
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      acc[t][0] = fmaf(c[t][0], q0, acc[t][0]);
      acc[t][1] = fmaf(c[t][1], q0, acc[t][1]);
      acc[t][2] = fmaf(c[t][2], q8, acc[t][2]);
      acc[t][3] = fmaf(c[t][3], q8, acc[t][3]);
    }
  }
}

// M = 2..16 on the same scheme (kGemvMma with M > 1): the batch rows are B's columns (NT n-tiles
// of 8: NT = 2 for M > 8, on 256-thread blocks for the registers of its second x), so each
// quarter keeps its own accumulators.  A visit loads, per lane (grp, tid), 8 bytes of rows grp and
// grp + 8 per quarter q at byte 32 q + 8 tid of the row tile (pairs 8 tid .. 8 tid + 7 of the
// quarter): all four lanes of an mma's k slots then lie in one quarter.  mma (q, i) takes bytes
// 2 i (slot tid) and 2 i + 1 (slot tid + 4); B column m of n-tile t holds batch row 8 t + m's x
// (lane grp = m, zero past M); one A fragment serves the NT mmas.  Lane tid reads quarter tid's
// absmax of rows grp and grp + 8, and one shuffle per row and quarter hands it to the group; the
// scaled quarters add up in fp32 accumulators, written as partial[kt][m][row] for the batch rows
// 8 t + 2 tid and 8 t + 2 tid + 1 this lane holds.
template <typename TX, int D, int NT>
__global__ void __launch_bounds__(NT == 1 ? kMmaThreads : kMmaThreads / 2, 1)
    gemv_4bit_mma_batch_kernel(const TX* __restrict__ x, int M, int N, int64_t K, const uint8_t* __restrict__ packed,
                               Absmax am, int log2_bs, int quant_type, int warps_used, float* __restrict__ partial) {
  static_assert(!std::is_same<TX, float>::value, "mma fragments are fp16 or bf16");
  pdl_launch_dependents();  // a finalize launched with kGemvPdl may be scheduled now (no-op otherwise)
  extern __shared__ __align__(16) unsigned char mma_smem[];
  const bool nested = am.q != nullptr;
  const int lane = threadIdx.x & 31;
  const int grp = lane >> 2, tid = lane & 3;
  const MmaWarp wa = mma_warp(N, K, warps_used);
  const int kt = wa.kt, R = wa.R, row_blocks = wa.row_blocks;

  // Rows grp (+ 8), bytes 32 q + 8 tid of the tile; quarter tid's absmax of row grp (and row grp + 8).
  MmaCursor wc(packed, wa, K, grp, 8 * tid, 0, 64 * tid);
  const uint32_t scale_e_8rows = 8u * (uint32_t)K;
  auto fetch = [&](MmaBytes8& b) {
    if (wc.row < N) {
#pragma unroll
      for (int q = 0; q < 4; ++q) b.w[0][q] = __ldcs(reinterpret_cast<const uint2*>(wc.p + 32 * q));
    }
    if (wc.row + 8 < N) {
#pragma unroll
      for (int q = 0; q < 4; ++q) b.w[1][q] = __ldcs(reinterpret_cast<const uint2*>(wc.p + MmaCursor::rows8(K) + 32 * q));
    }
    // Quarter tid's absmax of rows grp and grp + 8 (row grp + 8 < N implies row grp < N).
    if (wc.row + 8 < N)
      mma_fetch_scales<false>(b, am, wc.scale_e >> log2_bs, (wc.scale_e + scale_e_8rows) >> log2_bs);
    else if (wc.row < N)
      mma_fetch_scales<false>(b, am, wc.scale_e >> log2_bs, wc.scale_e >> log2_bs);
    wc.next();
  };
  MmaBytes8 ring[D];
  mma_prefetch(wa, ring, fetch);

  const MmaTable tab = mma_build_table<TX>(mma_smem, quant_type, am);
  __syncthreads();
  if (!wa.active) return;  // whole warps exit together (after the only __syncthreads)
  const float offset = nested ? __ldg(am.offset) : 0.0f;

  // B fragments of mma (t, q, i): batch row 8 t + grp's x elements 64 q + 16 tid + 4 i .. + 3 of the tile.
  uint32_t xb[NT][4][4][2];
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int m = 8 * t + grp;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        uint2 v = make_uint2(0u, 0u);
        if (m < M)
          v = __ldg(reinterpret_cast<const uint2*>(x + (int64_t)m * K + (int64_t)kt * kMmaTile + 64 * q + 16 * tid +
                                                   4 * i));
        xb[t][q][i][0] = v.x;
        xb[t][q][i][1] = v.y;
      }
    }
  }

  float* out = partial + (int64_t)kt * M * N;

  auto visit = [&](int rb, const MmaBytes8& cur, MmaBytes8& nxt) {
    // Rows past N decode the slot's zeroed or stale scale inputs: they reach only their own rows.
    const float s0 = mma_scale<false>(cur, 0, nested, tab.code_at, offset);
    const float s8 = mma_scale<false>(cur, 1, nested, tab.code_at, offset);
    if (rb + (D - 1) * R < row_blocks) fetch(nxt);
    const int row0 = rb * 16 + grp;
    // n-tile t: rows grp, grp + 8 x batch rows 8 t + 2 tid, 8 t + 2 tid + 1
    float acc[NT][4];
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;
    mma_batch_tile<TX>(acc, cur, tab.lane_entry, s0, s8, lane,
                       [&](int t, int q, int i, uint32_t (&b)[2]) { b[0] = xb[t][q][i][0], b[1] = xb[t][q][i][1]; });
    for_each_batch_output(acc, tid, row0, M, N, [&](int m, int row, float v) { out[(int64_t)m * N + row] = v; });
  };

  mma_sweep(wa, ring, visit);
}

// M = 17..64 on the batch kernel's decode (kGemvMmaGemm, experimental; fp16/bf16 x, K % 256 == 0,
// blocksize >= 64, N * K < 2^32 - 256): one A fragment of W from the per-lane table feeds NT mma,
// one per 8 batch rows, but x comes from shared memory (the batch kernel holds it in 32 registers per
// n-tile, too many past M = 16).  So all 8 warps of a block work on the same 256-wide K-tile at a
// time: the block owns 128 rows (a 16-row block per warp) and one K-split of `tiles_per_split`
// tiles, which it walks in order, staging each tile's x [8 NT][kXStride] once with cp.async into one
// of two buffers while the other is read (rows padded to 520 bytes: a half-warp's 8-byte B loads,
// rows grp 0..3 x lanes tid 0..3, then hit 16 distinct bank pairs), the next tile's W in registers
// meanwhile.  Its 194 KB of shared memory leave it to sm_90 (A100: 163 KB).  A visit is the batch kernel's: lane
// (grp, tid) holds 8 bytes per quarter of rows grp and grp + 8 and quarter tid's absmax of both.
// Output: y (one split: bias and LoRA added by store_output) or partial[split][m][n] for the finalize.
//
// kCompact (kGemvMmaGemmCompact; the default at M <= 32 on sm_90: 40 us there on the H100, M = 32;
// the 16-warp M > 32 form was slower than the 8-warp kernel and is off): the same arithmetic with twice
// the warps per SM, each at NT = 4 in at most 128 registers.  The 8-warp kernel is latency-bound: at
// M = 32 on 14336x4096 it took 50 us on the H100, where streaming W at 3 TB/s takes 10 and its mma at
// the bf16 peak 4.  Its 194 KB are mostly waste: the table must sit on a 64 KB boundary of the shared
// window (the PRMT writes the byte into address bits 8-15), the dynamic window starts at 0x400 on
// sm_90+, so 63 KB go to padding, and half of every 256-byte table row is unused.  Here the table
// starts at the window's dynamic base and the LDS adds that base as its immediate offset (kTableOff:
// still PRMT + LDS); x buffer 0 lives in the table rows' unused upper halves and buffer 1 after the
// table (CompactLayout).  M <= 32: 81 KB, two 8-warp blocks per SM on sm_90 (one on sm_80, whose
// code spills at 128 registers).  NT = 8 did not fit 128 registers (ptxas spilled 16-80 bytes in
// every arrangement tried: a one-slot W ring refilled per quarter, the code table and offset re-read
// per tile), so M = 33..64 runs kHalves = 2: 16 warps of NT = 4 in one 512-thread block of 98 KB,
// warps w and w + 8 on the same 16 W rows for batch rows 0..31 and 32..63 (each decodes its own A
// fragments; W is read twice, the second time mostly from cache).
constexpr int kXStride = kMmaTile + 4;  // elements per staged x row
constexpr int kGemmThreads = 256;  // 8 warps, 128 rows (with x staged through registers, NT = 8 spilled at 16 and 12)
constexpr int kGemmRows = 16 * (kGemmThreads / 32);  // the W rows a block owns, 16 a warp
// Row blocks of the table GEMM for W [N, *]: its grid's x, and the clusters the cluster sums need.
__host__ __device__ constexpr int64_t table_gemm_row_blocks(int N) { return (N + kGemmRows - 1) / kGemmRows; }
constexpr int kXBufferBytes = kMmaGemmMaxM * kXStride * 2;
constexpr int kMmaGemmSmemBytes = kMmaSmemBytes + 2 * kXBufferBytes;

// The compact kernel's shared memory from the dynamic base D for Rows (32 or 64) batch rows: table
// entry v of lane L at D + 256 v + 4 L; x buffer 0 in the table rows' upper halves: quarter-row
// j = 4 m + q (batch row m, elements 64 q .. 64 q + 63: 128 bytes) at D + 256 j + 128, its 8-byte
// piece p at piece p ^ (m & 3), so that a half-warp's B loads (rows grp 0..3 x tid 0..3, one i) hit
// 16 distinct bank pairs; x buffer 1 after the table in the 8-warp kernel's padded rows (row m at
// D + 65536 + 2 kXStride m); then the nested absmax code.
template <int Rows>
struct CompactLayout {
  static_assert(Rows == 32 || Rows == 64, "256 table rows hold 64 batch rows of quarter-rows");
  static constexpr int kRows = Rows;
  static constexpr uint32_t kBuf0 = 128, kStride0 = 256, kBuf1 = kMmaTableBytes, kRow1 = 2 * (kMmaTile + 4);
  static constexpr uint32_t kCode = kBuf1 + kRows * kRow1;
  static constexpr int kBytes = (int)kCode + 256 * (int)sizeof(float);  // 32 rows: 83200, 64: 99840
};

// Two compact 8-warp blocks an SM where 128 registers do without a spill (sm_90; sm_80 code spills
// there, and an A100's 164 KB hold one 82 KB block, not two).
__host__ __device__ constexpr int compact_min_blocks() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  return 1;
#else
  return 2;
#endif
}

// Where the table GEMM stages x: 8-byte piece i of a tile (batch row i / 64, elements 4 (i % 64) ..
// + 3 of the 256-wide tile) in buffer `buf`, in bytes from the dynamic base (compact: CompactLayout
// for Rows batch rows) or from the 8-warp kernel's x buffers.  The plain definition; the kernel
// walks it strength-reduced (XCopySteps), checked against this for every thread at compile time.
template <bool kCompact, int Rows>
__host__ __device__ constexpr uint32_t x_piece_offset(int buf, int i) {
  const int m = i >> 6, c = (i & 63) * 4;
  if constexpr (kCompact) {
    using L = CompactLayout<Rows>;
    const uint32_t j = 4u * (uint32_t)m + (uint32_t)((i >> 4) & 3), piece = (uint32_t)((i & 15) ^ (m & 3));
    return buf == 0 ? L::kBuf0 + L::kStride0 * j + 8u * piece : L::kBuf1 + L::kRow1 * (uint32_t)m + 2u * (uint32_t)c;
  }
  return (uint32_t)(buf * kXBufferBytes + 2 * (m * kXStride + c));
}

// Thread t of Threads copies pieces t + Threads u (u < kCopies) of each tile: batch rows
// t / 64 + kRowStep u, all at elements 4 (t % 64) .. + 3, so a copy's source moves on by kRowStep rows
// of x and its shared address by a constant (the LDGSTS immediate): no per-copy index arithmetic.
template <bool kCompact, int Rows, int Threads>
struct XCopySteps {
  static_assert(Threads % 64 == 0 && Rows * 64 % Threads == 0, "whole batch rows per copy round");
  static constexpr int kCopies = Rows * 64 / Threads, kRowStep = Threads / 64;
  __host__ __device__ static constexpr uint32_t step(int buf) {
    return x_piece_offset<kCompact, Rows>(buf, Threads) - x_piece_offset<kCompact, Rows>(buf, 0);
  }
  // Every thread's every copy lands where the plain definition puts it.
  __host__ __device__ static constexpr bool matches_definition() {
    for (int buf = 0; buf < 2; ++buf)
      for (int t = 0; t < Threads; ++t)
        for (int u = 0; u < kCopies; ++u) {
          const int i = t + Threads * u;
          if (x_piece_offset<kCompact, Rows>(buf, i) != x_piece_offset<kCompact, Rows>(buf, t) + (uint32_t)u * step(buf) ||
              (i >> 6) != (t >> 6) + kRowStep * u || (i & 63) != (t & 63))
            return false;
        }
    return true;
  }
};

// threadIdx.x through a volatile read: the compiler cannot hoist what is computed from it out of a
// loop and keep it in registers (or spill it) but recomputes it where it is used.
__device__ __forceinline__ uint32_t thread_index_x() {
  uint32_t t;
  asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(t));
  return t;
}

// 8 bytes global -> shared without registers (sm_80+), or (full false: a row past M) 8 zero bytes
// without a global read; and the waits for this thread's copies.
__device__ __forceinline__ void cp_async8_zfill(uint32_t dst, const void* src, bool full) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" : : "r"(dst), "l"(src), "r"(full ? 8 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// The table GEMM's split-K sums without partials in global memory or a finalize launch
// (kGemvMmaGemmCluster, sm_90+): the S = gridDim.y splits of a block's 128 rows run as one cluster.
// Each block puts its sums in its own shared memory (the table and x buffers are done with: 64 batch
// rows x 132 floats, padded so that a warp's stores hit 32 banks), and after a cluster barrier block c
// sums outputs c T + t, c T + t + S T, ... (T threads; consecutive n, coalesced stores to y) over the
// S blocks in split order, as the finalize does (0 + s_0 + s_1 + ...: the same bits), then bias and
// LoRA (store_output).  A second barrier keeps every block's shared memory until all have read it.
constexpr uint32_t kClusterSumStride = 132;
template <typename TX, int NT>
__device__ __forceinline__ void cluster_sum_outputs(const float (&acc)[NT][4], int tid, int row, int M, int N,
                                                    int row0, const GemvEpilogue& ep, float* sums, uint32_t sums_addr,
                                                    int threads, int m0) {
  static_assert(kMmaGemmMaxM * kClusterSumStride * 4 <= CompactLayout<32>::kBytes, "the sums fit every form's smem");
  __syncthreads();  // every warp is past its last tile: the table and the x buffers are free
  for_each_batch_output(acc, tid, row, M, N, [&](int m, int n, float v) {
    sums[(uint32_t)m * kClusterSumStride + (uint32_t)(n - row0)] = v;
  }, m0);
  cluster_sync();  // every split's sums are in its shared memory
  const int S = (int)gridDim.y;
  const int outputs = M * kGemmRows;
  for (int i = (int)cluster_rank() * threads + (int)threadIdx.x; i < outputs; i += S * threads) {
    const int m = i / kGemmRows, n = row0 + i % kGemmRows;
    if (n >= N) continue;
    const uint32_t addr = sums_addr + 4u * ((uint32_t)m * kClusterSumStride + (uint32_t)(n - row0));
    float part[kMaxClusterSplits];  // all S loads in flight, then the sum in split order
#pragma unroll
    for (int s = 0; s < kMaxClusterSplits; ++s) part[s] = s < S ? cluster_ld_f32(addr, (uint32_t)s) : 0.0f;
    float sum = 0.0f;
#pragma unroll
    for (int s = 0; s < kMaxClusterSplits; ++s)
      if (s < S) sum += part[s];
    store_output<TX>(sum, m, n, N, ep.bias, ep.lora_t, ep.lora_b, ep.r, static_cast<TX*>(ep.y));
  }
  cluster_sync();  // no block leaves while another still reads its shared memory
}

template <typename TX, int NT, bool kCompact = false, int kHalves = 1>
__global__ void __launch_bounds__(kGemmThreads * kHalves, kCompact && kHalves == 1 ? compact_min_blocks() : 1)
    gemm_4bit_table_kernel(const TX* __restrict__ x, int M, int N, int64_t K, const uint8_t* __restrict__ packed,
                           Absmax am, int log2_bs, int quant_type, int tiles_per_split, float* __restrict__ partial,
                           GemvEpilogue ep) {
  static_assert(!std::is_same<TX, float>::value, "mma fragments are fp16 or bf16");
  static_assert(8 * NT <= kMmaGemmMaxM, "x is staged for 64 batch rows");
  static_assert(!kCompact || NT == 4, "the compact kernel's warps hold 4 n-tiles (128 registers)");
  static_assert(kHalves == 1 || (kCompact && kHalves == 2), "batch halves: the compact kernel's 16 warps");
  using Layout = CompactLayout<8 * NT * kHalves>;
  constexpr int kThreads = kGemmThreads * kHalves;
  constexpr uint32_t kTableOff = kCompact ? dynamic_smem_low() : 0u;
  pdl_launch_dependents();  // a finalize launched with kGemvPdl may be scheduled now (no-op otherwise)
  extern __shared__ __align__(16) unsigned char mma_smem[];
  const uint32_t smem0 = (uint32_t)__cvta_generic_to_shared(mma_smem);
  if constexpr (kCompact) {
    if ((smem0 & 0xffffu) != kTableOff) __trap();  // the table's LDS offset assumes this base
  }
  TX* xs = reinterpret_cast<TX*>(mma_smem + kMmaSmemBytes);
  const bool nested = am.q != nullptr;
  const int lane = threadIdx.x & 31, grp = lane >> 2, tid = lane & 3;
  const int m0 = kHalves == 1 ? 0 : 8 * NT * (int)(threadIdx.x / kGemmThreads);  // this warp's first batch row
  // This lane's B reads start at batch row grp, element 16 tid of a buffer (a shared-window address).
  const uint32_t xs_lane = (uint32_t)__cvta_generic_to_shared(xs) + 2u * (uint32_t)(grp * kXStride + 16 * tid);
  // Compact: quarter-row 4 (m0 + grp) of each buffer, this lane's piece 4 tid + i at 4 tid + (i ^ (grp & 3)).
  const uint32_t xs0_lane = smem0 + Layout::kBuf0 + 4u * Layout::kStride0 * (m0 + grp) + 32u * tid;
  const uint32_t xs1_lane = smem0 + Layout::kBuf1 + Layout::kRow1 * (m0 + grp) + 32u * tid;
  const int kt0 = (int)blockIdx.y * tiles_per_split;
  const int kt1 = min((int)(K / kMmaTile), kt0 + tiles_per_split);
  // The first of thread t's two W rows (the other + 8): row grp of its warp's 16, warps w and w + 8 of
  // the 16-warp form on the same rows.
  const auto w_row_of = [](uint32_t t) {
    return (blockIdx.x * (kGemmThreads / 32) + (t >> 5) % (kGemmThreads / 32)) * 16u + ((t & 31u) >> 2);
  };
  const int row = (int)w_row_of(threadIdx.x);  // and row + 8

  // Tile kt's bytes of rows row, row + 8 (32 q + 8 tid of each row's 128) and quarter tid's absmax of
  // both, into a slot; rows past N keep the slot's zeros.
  const uint32_t scale_e0 = (uint32_t)row * (uint32_t)K + 64u * (uint32_t)tid, scale_e8 = 8u * (uint32_t)K;
  auto fetch = [&](MmaBytes8& b, int kt) {
    // Byte offsets into W in 32 bits (N * K < 2^32 - 256, as the absmax indices), from a re-read
    // thread index: a W pointer held through the loop was spilled at the 128-register cap.
    const uint32_t t = thread_index_x(), row_bytes = (uint32_t)K >> 1;  // K < 2^32
    const uint32_t off = w_row_of(t) * row_bytes + 8u * (t & 3u) + (uint32_t)kt * (kMmaTile / 2);
    if (row < N) {
      const uint8_t* p = packed + off;
#pragma unroll
      for (int q = 0; q < 4; ++q) b.w[0][q] = __ldcs(reinterpret_cast<const uint2*>(p + 32 * q));
    }
    if (row + 8 < N) {
      const uint8_t* p = packed + (off + 8u * row_bytes);
#pragma unroll
      for (int q = 0; q < 4; ++q) b.w[1][q] = __ldcs(reinterpret_cast<const uint2*>(p + 32 * q));
    }
    const uint32_t e = scale_e0 + (uint32_t)kt * kMmaTile;
    if (row + 8 < N)
      mma_fetch_scales<false>(b, am, e >> log2_bs, (e + scale_e8) >> log2_bs);
    else if (row < N)
      mma_fetch_scales<false>(b, am, e >> log2_bs, e >> log2_bs);
  };
  // Tile kt's x into buffer `buf`: the 8 NT (compact: Layout::kRows) batch rows the warps read, 256
  // elements each, in 8-byte pieces i = thread + kThreads u (see x_piece_offset); rows past M are
  // zero-filled without a global read.
  constexpr int kStagedRows = kCompact ? Layout::kRows : 8 * NT;
  using Copies = XCopySteps<kCompact, kStagedRows, kThreads>;
  static_assert(Copies::matches_definition(), "the strength-reduced x copies must follow x_piece_offset");
  // Element offsets into x in 32 bits (M * K < 2^32, checked by launch_gemv): a 64-bit source
  // pointer live through the loop cost the compact kernel a spill.
  const uint32_t copy_base = kCompact ? smem0 : (uint32_t)__cvta_generic_to_shared(xs);
  auto copy_x = [&](int kt, int buf) {
    // The thread index re-read here, so that nothing of this stays live through the loop (the
    // compact kernel sits at its 128-register cap).
    const int t = (int)thread_index_x(), copy_row = t >> 6;  // batch row of this thread's copy u = 0
    const uint32_t dst = copy_base + x_piece_offset<kCompact, kStagedRows>(buf, t);
    uint32_t e = (uint32_t)copy_row * (uint32_t)K + (uint32_t)(t & 63) * 4u + (uint32_t)kt * kMmaTile;
#pragma unroll
    for (int u = 0; u < Copies::kCopies; ++u) {
      const bool in_x = copy_row + Copies::kRowStep * u < M;
      cp_async8_zfill(dst + (uint32_t)u * Copies::step(buf), x + (in_x ? e : 0u), in_x);
      e += (uint32_t)Copies::kRowStep * (uint32_t)K;
    }
    cp_async_commit();
  };
  MmaBytes8 ring[2] = {};
  fetch(ring[0], kt0);
  copy_x(kt0, 0);
  MmaTable tab;  // synced by the first tile's barrier
  if constexpr (kCompact) {
    mma_fill_table<TX>(mma_smem, reinterpret_cast<float*>(mma_smem + Layout::kCode), quant_type, am);
    // The high half of the base (the cluster's CTA bits) and the lane; bits 8-15 take the byte.
    tab = MmaTable{(smem0 & 0xffff0000u) | ((uint32_t)lane * 4u), smem0 + Layout::kCode};
  } else {
    tab = mma_build_table<TX>(mma_smem, quant_type, am);
  }
  // kHalves = 2 re-reads the offset a tile (an L1 hit) rather than hold it: sm_80 code spilled a register.
  const float offset = nested && kHalves == 1 ? __ldg(am.offset) : 0.0f;

  // n-tile t: rows row, row + 8 x batch rows 8 t + 2 tid, 8 t + 2 tid + 1
  float acc[NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;
  // Tile kt from x buffer `buf` (tiles alternate between the two from kt0).
  auto tile = [&](int kt, int buf, const MmaBytes8& cur, MmaBytes8& nxt) {
    cp_async_wait_all();  // this thread's copies of tile kt have landed
    __syncthreads();      // everyone's have, and the other buffer's last tile is read (first: the table is built)
    if (kt + 1 < kt1) {   // in flight while this tile is multiplied
      copy_x(kt + 1, buf ^ 1);
      fetch(nxt, kt + 1);
    }
    const uint32_t xs_buf = xs_lane + (uint32_t)(buf * kXBufferBytes);
    const float off = kHalves == 1 ? offset : nested ? __ldg(am.offset) : 0.0f;
    const float s0 = mma_scale<false>(cur, 0, nested, tab.code_at, off);
    const float s8 = mma_scale<false>(cur, 1, nested, tab.code_at, off);
    // x elements 64 q + 16 tid + 4 i .. + 3 of batch row 8 t + grp
    auto b_frag = [&](int t, int q, int i, uint32_t (&b)[2]) {
      uint2 v;
      if constexpr (kCompact) {  // buffer 0: quarter-row 4 (8 t + grp) + q, piece 4 tid + (i ^ (grp & 3))
        v = buf == 0 ? lds_u64(xs0_lane + 8u * (uint32_t)(i ^ (grp & 3)) + Layout::kStride0 * (32u * t + q))
                     : lds_u64(xs1_lane + Layout::kRow1 * 8u * t + 128u * q + 8u * i);
      } else {
        v = lds_u64(xs_buf + 2u * (uint32_t)((8 * t) * kXStride + 64 * q + 4 * i));
      }
      b[0] = v.x, b[1] = v.y;
    };
    mma_batch_tile<TX, kTableOff>(acc, cur, tab.lane_entry, s0, s8, lane, b_frag);
  };
  for (int kt = kt0; kt < kt1; kt += 2) {  // two ring slots and x buffers, named statically
    tile(kt, 0, ring[0], ring[1]);
    if (kt + 1 < kt1) tile(kt + 1, 1, ring[1], ring[0]);
  }

  if (ep.cluster_reduce) {  // the launch made the S splits of these 128 rows one cluster (S = gridDim.y)
    // The row re-read from the thread index: held through the loop for this branch, it was spilled.
    const uint32_t t = thread_index_x();
    cluster_sum_outputs<TX>(acc, (int)(t & 3u), (int)w_row_of(t), M, N, (int)blockIdx.x * kGemmRows, ep,
                            reinterpret_cast<float*>(mma_smem), smem0, kThreads,
                            kHalves == 1 ? 0 : 8 * NT * (int)(t / kGemmThreads));
    return;
  }
  for_each_batch_output(acc, tid, row, M, N, [&](int m, int n, float v) {
    if (gridDim.y == 1) {
      float sum = 0.0f;
      sum += v;  // as the finalize's sum starts
      store_output<TX>(sum, m, n, N, ep.bias, ep.lora_t, ep.lora_b, ep.r, static_cast<TX*>(ep.y));
    } else {
      partial[((int64_t)blockIdx.y * M + m) * N + n] = v;
    }
  }, kHalves == 1 ? 0 : 8 * NT * (int)(threadIdx.x / kGemmThreads));  // m0 again: not live through the loop
}

// y[m, n] = T(sum_s partial[s, m, n] + bias[n] + sum_j lora_t[m, j] * lora_b[n, j]).
template <typename TX>
__global__ void __launch_bounds__(256)
    splitk_finalize_kernel(const float* __restrict__ partial, int S, int M, int N, const float* __restrict__ bias,
                           const float* __restrict__ lora_t, const float* __restrict__ lora_b, int r,
                           TX* __restrict__ y) {
  pdl_wait();  // launched with kGemvPdl: the GEMV's partials are complete and visible from here on
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (int64_t)M * N) return;
  const int m = (int)(idx / N), n = (int)(idx % N);
  float v = 0.0f;
  // The tiles in order (the bits do not depend on the split), eight loads in flight at a time.  With
  // the tensor-core GEMV's S = K / 256 (56 at K = 14336) this still took 6.5 us under Nsight Compute
  // on the H100 (16 blocks for 4096 outputs); the block-reduced M = 1 kernel leaves it 4 slices.
  const float* p = partial + (int64_t)m * N + n;
  const int64_t stride = (int64_t)M * N;
  int s = 0;
  for (; s + 8 <= S; s += 8) {
    float t[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) t[u] = p[(s + u) * stride];
#pragma unroll
    for (int u = 0; u < 8; ++u) v += t[u];
  }
  for (; s < S; ++s) v += p[s * stride];
  store_output<TX>(v, m, n, N, bias, lora_t, lora_b, r, y);
}

// Launches a finalize kernel: an ordinary launch, or (pdl) one with programmatic stream
// serialization, so that its blocks may be scheduled while the GEMV before it still runs (the kernel
// waits for the GEMV's partials in pdl_wait).
template <typename TX>
int launch_finalize_kernel(void (*kernel)(const float*, int, int, int, const float*, const float*, const float*, int,
                                          TX*),
                           unsigned blocks, unsigned threads, bool pdl, const float* partial, int S, int M, int N,
                           const float* bias, const float* lora_t, const float* lora_b, int r, void* y,
                           cudaStream_t stream) {
  if (!pdl) {
    kernel<<<blocks, threads, 0, stream>>>(partial, S, M, N, bias, lora_t, lora_b, r, static_cast<TX*>(y));
    return (int)cudaGetLastError();
  }
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = 1;
  return (int)cudaLaunchKernelEx(&config, kernel, partial, S, M, N, bias, lora_t, lora_b, r, static_cast<TX*>(y));
}

template <typename TX>
int launch_finalize(const float* partial, int S, int M, int N, const float* bias, const float* lora_t,
                    const float* lora_b, int r, void* y, cudaStream_t stream, bool pdl = false) {
  const int64_t outs = (int64_t)M * N;
  if ((outs + 255) / 256 > 0x7fffffff) return kUnsupported;
  return launch_finalize_kernel<TX>(splitk_finalize_kernel<TX>, (unsigned)((outs + 255) / 256), 256, pdl, partial, S,
                                    M, N, bias, lora_t, lora_b, r, y, stream);
}

template <typename TX, int MT, int RW, int D>
int launch_gemv_kernel(const void* x, int M, int N, int64_t K, const uint8_t* packed, Absmax am, int log2_bs,
                       int quant_type, int S, float* partial, cudaStream_t stream) {
  const int64_t rows_per_cta = (int64_t)(kGemvThreads / 32) * RW;
  const int64_t blocks = ((int64_t)N + rows_per_cta - 1) / rows_per_cta;
  if (blocks > 0x7fffffff || S > 65535) return kUnsupported;
  const dim3 grid((unsigned)blocks, (unsigned)S);
  gemv_4bit_kernel<TX, MT, RW, D><<<grid, kGemvThreads, 0, stream>>>(static_cast<const TX*>(x), M, N, K, packed, am,
                                                                     log2_bs, quant_type, S, partial);
  return (int)cudaGetLastError();
}

// Deeper rings are built for M = 1 only (3 or 4 chunks per row with up to 4 rows per warp, 8 with
// one row per warp): with 8 activation rows or 8 weight rows their registers would spill.
template <typename TX, int RW>
int launch_gemv_rows(const void* x, int M, int N, int64_t K, const uint8_t* packed, Absmax am, int log2_bs,
                     int quant_type, int depth, int S, float* partial, cudaStream_t stream) {
  if (depth == 2) {
    return M == 1 ? launch_gemv_kernel<TX, 1, RW, 2>(x, M, N, K, packed, am, log2_bs, quant_type, S, partial, stream)
                  : launch_gemv_kernel<TX, kMaxM, RW, 2>(x, M, N, K, packed, am, log2_bs, quant_type, S, partial,
                                                         stream);
  }
  if constexpr (RW <= 4) {
    if (M == 1 && depth == 3)
      return launch_gemv_kernel<TX, 1, RW, 3>(x, M, N, K, packed, am, log2_bs, quant_type, S, partial, stream);
    if (M == 1 && depth == 4)
      return launch_gemv_kernel<TX, 1, RW, 4>(x, M, N, K, packed, am, log2_bs, quant_type, S, partial, stream);
  }
  if constexpr (RW == 1) {  // one row per warp: registers for 7 chunks in flight
    if (M == 1 && depth == 8)
      return launch_gemv_kernel<TX, 1, RW, 8>(x, M, N, K, packed, am, log2_bs, quant_type, S, partial, stream);
  }
  return kBadArgument;
}

// Per-device caches below hold devices 0..kMaxDevices - 1 (others ask the runtime every time).
constexpr int kMaxDevices = 64;

// Device `dev`'s SM count and the shared memory one block may opt in to, read once per device.
struct DeviceLimits {
  int sms, smem_optin, cluster_launch, smem_per_sm, smem_reserved;  // reserved: the system's per block
};
inline int device_limits(int dev, DeviceLimits* out) {
  static DeviceLimits cached[kMaxDevices] = {};
  const bool cacheable = dev >= 0 && dev < kMaxDevices;
  if (cacheable && cached[dev].sms > 0) {
    *out = cached[dev];
    return 0;
  }
  DeviceLimits l{};
  cudaError_t e = cudaDeviceGetAttribute(&l.sms, cudaDevAttrMultiProcessorCount, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&l.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&l.cluster_launch, cudaDevAttrClusterLaunch, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&l.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&l.smem_reserved, cudaDevAttrReservedSharedMemoryPerBlock, dev);
  if (e != cudaSuccess) return (int)e;
  if (cacheable) cached[dev] = l;
  *out = l;
  return 0;
}

// Lets `Kernel` launch on device `dev` with `bytes` of dynamic shared memory (opted in above the 48 KB
// default), asking the runtime once per device and kernel for the largest size asked so far.
// max_carveout: with it, the largest shared-memory carveout (the compact table GEMM's two blocks per SM
// need 2 x 82 KB, more than a carveout sized for one block leaves).
template <auto Kernel>
int grant_smem(int dev, int bytes, bool max_carveout = false) {
  static int granted[kMaxDevices] = {0};
  const bool cacheable = dev >= 0 && dev < kMaxDevices;
  if ((bytes <= 48 * 1024 && !max_carveout) || (cacheable && granted[dev] >= bytes)) return 0;
  cudaError_t e = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e == cudaSuccess && max_carveout)
    e = cudaFuncSetAttribute(Kernel, cudaFuncAttributePreferredSharedMemoryCarveout, (int)cudaSharedmemCarveoutMaxShared);
  if (e != cudaSuccess) return (int)e;
  if (cacheable) granted[dev] = bytes;
  return 0;
}

// A launch of `grid` blocks of `threads` (`smem` bytes of dynamic shared memory) on `stream` in
// clusters of S blocks along y; *attr holds the cluster attribute and must outlive the config.
inline cudaLaunchConfig_t cluster_config(dim3 grid, int threads, int smem, int S, cudaStream_t stream,
                                         cudaLaunchAttribute* attr) {
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = 1;
  attr->val.clusterDim.y = (unsigned)S;
  attr->val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3((unsigned)threads);
  config.dynamicSmemBytes = (size_t)smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = 1;
  return config;
}

// How many clusters of S blocks of `Kernel` (Threads per block, `smem` bytes of dynamic shared memory,
// granted) the device runs at once, asked once per device, kernel and S (cudaOccupancyMaxActiveClusters:
// clusters are placed within a GPC, so a GPC's spare SMs stay idle and this can be well under
// SMs x blocks per SM / S).
template <auto Kernel, int Threads>
int cluster_capacity(int dev, int S, int smem, int* clusters) {
  static int cached[kMaxDevices][kMaxClusterSplits + 1] = {};  // value + 1; 0: not asked yet
  const bool cacheable = dev >= 0 && dev < kMaxDevices && S >= 1 && S <= kMaxClusterSplits;
  if (cacheable && cached[dev][S] > 0) {
    *clusters = cached[dev][S] - 1;
    return 0;
  }
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t config = cluster_config(dim3(1, (unsigned)S), Threads, smem, S, nullptr, &attr);
  int n = 0;
  const cudaError_t e = cudaOccupancyMaxActiveClusters(&n, Kernel, &config);
  if (e != cudaSuccess) return (int)e;
  if (cacheable) cached[dev][S] = n + 1;
  *clusters = n;
  return 0;
}

// A persistent grid for `Kernel` (Threads per block, SmemBytes of dynamic shared memory): as many
// blocks as fit on the device at once, read once per device and kernel (the occupancy query costs a
// few microseconds).
template <auto Kernel, int Threads = kGemvThreads, int SmemBytes = 0>
int persistent_blocks(int* blocks) {
  static int cached[kMaxDevices] = {0};
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return (int)e;
  if (dev >= 0 && dev < kMaxDevices && cached[dev] > 0) {
    *blocks = cached[dev];
    return 0;
  }
  int rc = grant_smem<Kernel>(dev, SmemBytes);
  DeviceLimits limits;
  if (rc == 0) rc = device_limits(dev, &limits);
  if (rc != 0) return rc;
  int per_sm = 0;
  e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel, Threads, SmemBytes);
  if (e != cudaSuccess) return (int)e;
  *blocks = limits.sms * (per_sm > 0 ? per_sm : 1);
  if (dev >= 0 && dev < kMaxDevices) cached[dev] = *blocks;
  return 0;
}

// Warps of a persistent grid of `blocks` blocks of `warps_per_block` over `tiles` tiles,
// `tiles_per_row` per row (block): whole rows of tiles per pass, no more warps than tiles; 0 when
// not even one row of tiles fits.
inline int64_t persistent_warps(int blocks, int warps_per_block, int64_t tiles, int tiles_per_row) {
  int64_t warps = (int64_t)blocks * warps_per_block;
  warps = warps < tiles ? warps : tiles;
  return warps - warps % tiles_per_row;
}

template <typename TX, int D>
int launch_gemv_stream_instance(const void* x, int N, int64_t K, const uint8_t* packed, Absmax am, int log2_bs,
                                int quant_type, float* partial, cudaStream_t stream) {
  int blocks = 0;
  const int rc = persistent_blocks<gemv_4bit_stream_kernel<TX, D>>(&blocks);
  if (rc != 0) return rc;
  const int tiles_per_row = (int)(K / kStreamTile);
  const int64_t warps = persistent_warps(blocks, kGemvThreads / 32, (int64_t)N * tiles_per_row, tiles_per_row);
  if (warps < tiles_per_row) return kUnsupported;  // K too long for this device's resident warps
  const int64_t grid = (warps + kGemvThreads / 32 - 1) / (kGemvThreads / 32);
  gemv_4bit_stream_kernel<TX, D><<<(unsigned)grid, kGemvThreads, 0, stream>>>(
      static_cast<const TX*>(x), N, K, packed, am, log2_bs, quant_type, (int)warps, partial);
  return (int)cudaGetLastError();
}

// The stream variants (M = 1, K % 1024 == 0, S == K / 1024): ring depth 4 or 8.
template <typename TX>
int launch_gemv_stream(const void* x, int N, int64_t K, const uint8_t* packed, Absmax am, int log2_bs, int quant_type,
                       int depth, float* partial, cudaStream_t stream) {
  if (depth == 4) return launch_gemv_stream_instance<TX, 4>(x, N, K, packed, am, log2_bs, quant_type, partial, stream);
  if (depth == 8) return launch_gemv_stream_instance<TX, 8>(x, N, K, packed, am, log2_bs, quant_type, partial, stream);
  return kBadArgument;
}

// The persistent grid of a tensor-core GEMV of Threads-thread blocks (one per SM: the table), and
// its active warps: whole rows of K-tiles, no more warps than tiles.
template <auto Kernel, int Threads>
int mma_grid(int N, int64_t K, int64_t* grid, int* warps) {
  int blocks = 0;
  const int rc = persistent_blocks<Kernel, Threads, kMmaSmemBytes>(&blocks);
  if (rc != 0) return rc;
  const int tiles_per_row = (int)(K / kMmaTile);
  const int64_t w = persistent_warps(blocks, Threads / 32, (int64_t)((N + 15) / 16) * tiles_per_row, tiles_per_row);
  if (w < tiles_per_row) return kUnsupported;  // K too long for this device's resident warps
  *grid = (w + Threads / 32 - 1) / (Threads / 32);
  *warps = (int)w;
  return 0;
}

// kGemvMmaBlockReduce: the warps per block W for K / 256 = T tiles a row: the row in as few blocks
// of at most 16 warps as it takes, ceil(T / 16), split as evenly as they allow (K = 4096: 16, one
// block; 14336: 14, four; 11008: 15, three, the last with 13); 0 under 8 tiles (K < 2048), where
// blocks that few warps would leave the SMs idle and the plain kernel runs instead.
inline int mma_block_warps(int64_t tiles_per_row) {
  if (tiles_per_row < 8) return 0;
  const int64_t parts = (tiles_per_row + kMmaThreads / 32 - 1) / (kMmaThreads / 32);
  return (int)((tiles_per_row + parts - 1) / parts);
}

// The block-reduced M = 1 kernel (BR above) on a persistent grid of W-warp blocks, one per SM (CX: two
// where two blocks' shared memory fits the SM, else one), in whole rows of parts (mma_block_part), its
// shared memory the table's plus the row sums of the most visits a warp makes.  Sets *slices to the
// partial slices it left for the finalize (0: it wrote y), or to -1 without launching where it does not
// apply (no W, fewer blocks than a row has parts, or the row sums past the device's shared memory).
template <typename TX, int D, bool CX = false>
int launch_gemv_mma_block_reduce(const TX* x, int N, int64_t K, const uint8_t* packed, Absmax am, int log2_bs,
                                 int quant_type, float* partial, const GemvEpilogue& ep, int* slices,
                                 cudaStream_t stream) {
  constexpr auto kernel = gemv_4bit_mma_kernel<TX, D, true, CX>;
  *slices = -1;
  int dev = 0;
  const cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return (int)e;
  DeviceLimits limits;
  int rc = device_limits(dev, &limits);
  if (rc != 0) return rc;
  const int64_t tiles_per_row = K / kMmaTile;
  const int W = mma_block_warps(tiles_per_row);
  if (W == 0 || (CX && K >= (int64_t(1) << 30))) return 0;  // CX: 32-bit row offsets
  const int64_t row_parts = (tiles_per_row + W - 1) / W, row_blocks = (N + 15) / 16;
  const int64_t base = CX ? MmaCompactLayout::kRed : kMmaSmemBytes;
  for (int per_sm = CX ? 2 : 1; per_sm >= 1; --per_sm) {
    int64_t R = (int64_t)limits.sms * per_sm / row_parts;  // row blocks in flight
    R = R < row_blocks ? R : row_blocks;
    if (R < 1) continue;
    const int64_t visits = (row_blocks + R - 1) / R;
    const int64_t smem = base + visits * W * 16 * (int64_t)sizeof(float);
    if (smem > limits.smem_optin || per_sm * (smem + limits.smem_reserved) > limits.smem_per_sm) continue;
    rc = grant_smem<kernel>(dev, (int)smem, CX);  // CX: the carveout two blocks need
    if (rc != 0) return rc;
    kernel<<<(unsigned)(R * row_parts), W * 32, (size_t)smem, stream>>>(x, N, K, packed, am, log2_bs, quant_type, 0,
                                                                         partial, ep);
    *slices = row_parts == 1 ? 0 : (int)row_parts;
    return (int)cudaGetLastError();
  }
  return 0;
}

// The tensor-core variants (M <= 16, fp16/bf16 x, K % 256 == 0, blocksize >= 64, S == K / 256), D
// visits in its load ring: M = 1, the batch kernel with one n-tile (M <= 8),
// or two (M <= 16, on half-size blocks: their second x takes 32 more registers).  M = 1 with
// block_reduce tries the block-reduced kernel first; *slices: the partial slices left for the
// finalize (0: the block-reduced kernel wrote y).
template <typename TX, int D, bool CX = false>
int launch_gemv_mma_instance(const void* x, int M, int N, int64_t K, const uint8_t* packed, Absmax am, int log2_bs,
                             int quant_type, bool block_reduce, float* partial, const GemvEpilogue& ep, int* slices,
                             cudaStream_t stream) {
  const TX* xt = static_cast<const TX*>(x);
  int64_t grid = 0;
  int warps = 0, rc = 0;
  *slices = (int)(K / kMmaTile);
  if (M == 1 && block_reduce) {
    int left = -1;
    rc = launch_gemv_mma_block_reduce<TX, D, CX>(xt, N, K, packed, am, log2_bs, quant_type, partial, ep, &left,
                                                 stream);
    if (rc != 0 || left >= 0) {
      *slices = left;
      return rc;
    }
  }
  if (M == 1) {
    rc = mma_grid<gemv_4bit_mma_kernel<TX, D, false>, kMmaThreads>(N, K, &grid, &warps);
    if (rc != 0) return rc;
    gemv_4bit_mma_kernel<TX, D, false><<<(unsigned)grid, kMmaThreads, kMmaSmemBytes, stream>>>(
        xt, N, K, packed, am, log2_bs, quant_type, warps, partial, ep);
  } else if (M <= 8) {
    rc = mma_grid<gemv_4bit_mma_batch_kernel<TX, D, 1>, kMmaThreads>(N, K, &grid, &warps);
    if (rc != 0) return rc;
    gemv_4bit_mma_batch_kernel<TX, D, 1><<<(unsigned)grid, kMmaThreads, kMmaSmemBytes, stream>>>(
        xt, M, N, K, packed, am, log2_bs, quant_type, warps, partial);
  } else {
    rc = mma_grid<gemv_4bit_mma_batch_kernel<TX, D, 2>, kMmaThreads / 2>(N, K, &grid, &warps);
    if (rc != 0) return rc;
    gemv_4bit_mma_batch_kernel<TX, D, 2><<<(unsigned)grid, kMmaThreads / 2, kMmaSmemBytes, stream>>>(
        xt, M, N, K, packed, am, log2_bs, quant_type, warps, partial);
  }
  return (int)cudaGetLastError();
}

template <typename TX>
int launch_gemv_mma(const void* x, int M, int N, int64_t K, const uint8_t* packed, Absmax am, int log2_bs,
                    int quant_type, int depth, bool block_reduce, bool compact, float* partial,
                    const GemvEpilogue& ep, int* slices, cudaStream_t stream) {
  if constexpr (std::is_same<TX, float>::value) {
    return kBadArgument;  // no fp32 mma fragments
  } else {
    if (compact)  // built for the block-reduced M = 1 kernel at depth 2 (where it does not apply, the
                  // plain kernel runs as without it)
      return M == 1 && depth == 2 && block_reduce
                 ? launch_gemv_mma_instance<TX, 2, true>(x, M, N, K, packed, am, log2_bs, quant_type, block_reduce,
                                                         partial, ep, slices, stream)
                 : kBadArgument;
    if (depth == 2)
      return launch_gemv_mma_instance<TX, 2>(x, M, N, K, packed, am, log2_bs, quant_type, block_reduce, partial, ep,
                                             slices, stream);
    if (depth == 3)
      return launch_gemv_mma_instance<TX, 3>(x, M, N, K, packed, am, log2_bs, quant_type, block_reduce, partial, ep,
                                             slices, stream);
    return kBadArgument;
  }
}

// The small-M table GEMM (kGemvMmaGemm): blocks of 128 rows x S K-splits of ceil(T / S) tiles (the
// caller's S must give every split a tile: S == ceil(T / ceil(T / S))), n-tiles for M <= 32 or <= 64;
// kCompact (kGemvMmaGemmCompact): 4 n-tiles a warp, kHalves warps per 16 W rows.
//
// With ep.cluster_reduce (2 <= S <= 8, sm_90+): the S splits of each 128 rows as one cluster, which
// sum in it and write y, where all the row blocks' clusters run at once (cluster_capacity); else the
// ordinary launch, whose partials the caller's finalize adds (*clustered says which ran).  A second
// wave of clusters would cost a whole one.
template <int NT, bool kCompact, int kHalves>
constexpr int table_gemm_smem() {
  return kCompact ? CompactLayout<8 * NT * kHalves>::kBytes : kMmaGemmSmemBytes;
}
template <typename TX, int NT, bool kCompact, int kHalves = 1>
int table_gemm_clusters_fit(int dev, int64_t row_blocks, int S, bool* fits) {
  constexpr auto kernel = gemm_4bit_table_kernel<TX, NT, kCompact, kHalves>;
  *fits = false;
  DeviceLimits limits;
  int rc = device_limits(dev, &limits);
  if (rc != 0 || !limits.cluster_launch || S < 2 || S > kMaxClusterSplits) return rc;
  rc = grant_smem<kernel>(dev, table_gemm_smem<NT, kCompact, kHalves>(), kCompact);
  if (rc != 0) return rc;
  int clusters = 0;
  rc = cluster_capacity<kernel, kGemmThreads * kHalves>(dev, S, table_gemm_smem<NT, kCompact, kHalves>(), &clusters);
  *fits = rc == 0 && row_blocks <= clusters;
  return rc;
}
template <typename TX, int NT, bool kCompact, int kHalves = 1>
int launch_gemm_table_instance(const TX* x, int M, int N, int64_t K, const uint8_t* packed, Absmax am, int log2_bs,
                               int quant_type, int S, float* partial, const GemvEpilogue& ep, bool* clustered,
                               cudaStream_t stream) {
  constexpr auto kernel = gemm_4bit_table_kernel<TX, NT, kCompact, kHalves>;
  constexpr int smem = table_gemm_smem<NT, kCompact, kHalves>();
  *clustered = false;
  int dev = 0;
  const cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return (int)e;
  int rc = grant_smem<kernel>(dev, smem, kCompact);
  if (rc != 0) return rc;
  const int64_t tiles = K / kMmaTile, per_split = (tiles + S - 1) / S;  // S checked by launch_gemv
  const int64_t blocks = table_gemm_row_blocks(N);
  if (S > 65535 || blocks > 0x7fffffff) return kUnsupported;
  bool fits = false;
  if (ep.cluster_reduce) {
    rc = table_gemm_clusters_fit<TX, NT, kCompact, kHalves>(dev, blocks, S, &fits);
    if (rc != 0) return rc;
  }
  if (!fits) {
    GemvEpilogue plain = ep;
    plain.cluster_reduce = false;
    kernel<<<dim3((unsigned)blocks, (unsigned)S), kGemmThreads * kHalves, smem, stream>>>(
        x, M, N, K, packed, am, log2_bs, quant_type, (int)per_split, partial, plain);
    return (int)cudaGetLastError();
  }
  *clustered = true;
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t config =
      cluster_config(dim3((unsigned)blocks, (unsigned)S), kGemmThreads * kHalves, smem, S, stream, &attr);
  return (int)cudaLaunchKernelEx(&config, kernel, x, M, N, K, packed, am, log2_bs, quant_type, (int)per_split,
                                 partial, ep);
}

// The table GEMM's form for M batch rows: f(NT, kCompact, kHalves) as integral constants.  Compact: two
// 8-warp blocks an SM for M <= 32, 16 warps (two per 16 W rows) for M <= 64; else 4 or 8 n-tiles.
template <typename F>
auto with_table_form(int M, bool compact, F&& f) {
  using std::integral_constant;
  using One = integral_constant<int, 1>;
  if (compact)
    return M <= 32 ? f(integral_constant<int, 4>{}, std::true_type{}, One{})
                   : f(integral_constant<int, 4>{}, std::true_type{}, integral_constant<int, 2>{});
  return M <= 32 ? f(integral_constant<int, 4>{}, std::false_type{}, One{})
                 : f(integral_constant<int, 8>{}, std::false_type{}, One{});
}

template <typename TX>
int launch_gemm_table(const void* x, int M, int N, int64_t K, const uint8_t* packed, Absmax am, int log2_bs,
                      int quant_type, bool compact, int S, float* partial, const GemvEpilogue& ep, bool* clustered,
                      cudaStream_t stream) {
  if constexpr (std::is_same<TX, float>::value) {
    return kBadArgument;  // no fp32 mma fragments
  } else {
    return with_table_form(M, compact, [&](auto nt, auto kcompact, auto halves) {
      return launch_gemm_table_instance<TX, decltype(nt)::value, decltype(kcompact)::value, decltype(halves)::value>(
          static_cast<const TX*>(x), M, N, K, packed, am, log2_bs, quant_type, S, partial, ep, clustered, stream);
    });
  }
}

template <typename TX>
int launch_gemv(const void* x, int M, int N, int64_t K, const uint8_t* packed, Absmax am, int log2_bs, int quant_type,
                int rows_per_warp, int depth, int options, int S, float* partial, const float* bias,
                const float* lora_t, const float* lora_b, int r, void* y, cudaStream_t stream) {
  const bool pdl = (options & kGemvPdl) != 0;  // beside any kernel: how its finalize is launched
  if ((options & kGemvMmaGemm) != 0) {
    const int64_t tiles = K / kMmaTile, per_split = (tiles + S - 1) / S;
    if (K % kMmaTile != 0 || log2_bs < 6 || S > tiles || (tiles + per_split - 1) / per_split != S ||
        (options & ~(kGemvPdl | kGemvMmaGemmCompact | kGemvMmaGemmCluster)) != kGemvMmaGemm ||
        ((options & kGemvMmaGemmCluster) != 0 && (S < 2 || S > kMaxClusterSplits)) ||
        (uint64_t)N * (uint64_t)K >= (uint64_t(1) << 32) - kMmaTile ||  // 32-bit absmax indices
        (uint64_t)M * (uint64_t)K >= (uint64_t(1) << 32))                // 32-bit x offsets
      return kBadArgument;
    const bool cluster = (options & kGemvMmaGemmCluster) != 0;
    bool clustered = false;
    const int rc = launch_gemm_table<TX>(x, M, N, K, packed, am, log2_bs, quant_type,
                                         (options & kGemvMmaGemmCompact) != 0, S, partial,
                                         GemvEpilogue{y, bias, lora_t, lora_b, r, cluster}, &clustered, stream);
    if (rc != 0 || S == 1 || clustered) return rc;  // one split, or the splits' cluster: the kernel wrote y
    return launch_finalize<TX>(partial, S, M, N, bias, lora_t, lora_b, r, y, stream, pdl);
  }
  if ((options & kGemvMma) != 0) {
    const bool block_reduce = (options & kGemvMmaBlockReduce) != 0;
    if (K % kMmaTile != 0 || S != K / kMmaTile || log2_bs < 6 || (block_reduce && M != 1) ||
        (options & ~(kGemvMmaBlockReduce | kGemvMmaCompact | kGemvPdl)) != kGemvMma ||
        (uint64_t)N * (uint64_t)K >= (uint64_t(1) << 32) - kMmaTile)  // 32-bit absmax indices
      return kBadArgument;
    int slices = S;
    const int rc = launch_gemv_mma<TX>(x, M, N, K, packed, am, log2_bs, quant_type, depth, block_reduce,
                                       (options & kGemvMmaCompact) != 0, partial,
                                       GemvEpilogue{y, bias, lora_t, lora_b, r}, &slices, stream);
    if (rc != 0 || slices == 0) return rc;  // slices == 0: the block-reduced kernel wrote y
    return launch_finalize<TX>(partial, slices, M, N, bias, lora_t, lora_b, r, y, stream, pdl);
  }
  if ((options & kGemvStream) != 0) {
    if (M != 1 || K % kStreamTile != 0 || S != K / kStreamTile) return kBadArgument;
    const int rc = launch_gemv_stream<TX>(x, N, K, packed, am, log2_bs, quant_type, depth, partial, stream);
    if (rc != 0) return rc;
    return launch_finalize<TX>(partial, S, M, N, bias, lora_t, lora_b, r, y, stream, pdl);
  }
  int rc;
  switch (rows_per_warp) {
#define NF4KIT_GEMV_ROWS_CASE(RW)                                                                          \
  case RW:                                                                                                 \
    rc = launch_gemv_rows<TX, RW>(x, M, N, K, packed, am, log2_bs, quant_type, depth, S, partial, stream); \
    break;
    NF4KIT_GEMV_ROWS_CASE(1)
    NF4KIT_GEMV_ROWS_CASE(2)
    NF4KIT_GEMV_ROWS_CASE(4)
    NF4KIT_GEMV_ROWS_CASE(8)
#undef NF4KIT_GEMV_ROWS_CASE
    default: return kBadArgument;
  }
  if (rc != 0) return rc;
  return launch_finalize<TX>(partial, S, M, N, bias, lora_t, lora_b, r, y, stream, pdl);
}

}  // namespace

template <typename TX>
int GemvLaunch<TX>::gemv(const void* x, int M, int N, int64_t K, const uint8_t* packed, const detail::Absmax& am,
                         int log2_bs, int quant_type, int rows_per_warp, int depth, int options, int S, float* partial,
                         const float* bias, const float* lora_t, const float* lora_b, int r, void* y,
                         cudaStream_t stream) {
  return launch_gemv<TX>(x, M, N, K, packed, am, log2_bs, quant_type, rows_per_warp, depth, options, S, partial, bias,
                         lora_t, lora_b, r, y, stream);
}

template <typename TX>
int GemvLaunch<TX>::table_clusters_fit(int M, int N, bool compact, int S, int* fits) {
  *fits = 0;
  if constexpr (std::is_same<TX, float>::value) {
    return kBadArgument;  // no fp32 mma fragments
  } else {
    int dev = 0;
    const cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess) return (int)e;
    bool f = false;
    const int rc = with_table_form(M, compact, [&](auto nt, auto kcompact, auto halves) {
      return table_gemm_clusters_fit<TX, decltype(nt)::value, decltype(kcompact)::value, decltype(halves)::value>(
          dev, table_gemm_row_blocks(N), S, &f);
    });
    *fits = f ? 1 : 0;
    return rc;
  }
}

template <typename TX>
int GemvLaunch<TX>::finalize(const float* partial, int S, int M, int N, const float* bias, const float* lora_t,
                             const float* lora_b, int r, void* y, cudaStream_t stream) {
  return launch_finalize<TX>(partial, S, M, N, bias, lora_t, lora_b, r, y, stream);
}

}  // namespace cuda
}  // namespace nf4kit

// Fused dequant-GEMM + LoRA on tensor cores (mma.sync m16n8k16, fp16/bf16 in, fp32 accumulate).
//
// forward  (kTrans = false): Y[M, N] = A[M, K] . deq(W)^T + A2[M, R] . B2[N, R]^T + bias
// backward (kTrans = true) : Y[M, K] = A[M, N] . deq(W)   + A2[M, R] . B2[R, K]
//
// W [N, K] is the packed 4-bit weight, read in place (the backward reads it "transposed"
// through ldmatrix.trans, no repacking).  The LoRA up-projection enters as a second pass of
// the same K loop over R (A2 = s.(X.A^T) or s.(dY.B), padded by the caller to R % 64 == 0),
// accumulating into the same registers: the output tile is written once.
//
// CTA tile 64 x 64 x 64, 4 warps (2 x 2, each 32 x 32), register-prefetch of the next tile
// while the current one is multiplied.  Split-K (gridDim.z > 1, for small M where the output
// tiles alone cannot fill the GPU): CTA z reduces its own range of phase-1 k-tiles and writes
// fp32 partials [z, M, Nout]; splitk_finalize() (gemv_cuda.cu) sums them in a fixed order and
// applies bias and LoRA (no phase 2 then).  Shared rows are padded to 72 elements (144 bytes)
// so that ldmatrix's eight row addresses fall in distinct bank groups.
#include "cuda/common.cuh"
#include "cuda/cuda_kernels.h"

namespace nf4kit {
namespace cuda {
namespace {
using namespace detail;

constexpr int BM = 64, BN = 64, BK = 64;
constexpr int SROW = BK + 8;  // shared row stride in 16-bit elements
constexpr int kThreads = 128;

struct GemmParams {
  const void* A;  // [M, Kred] row-major (X, or dY)
  int64_t Kred;   // phase-1 reduction length (K forward, N backward), a multiple of 8
  int M;
  const uint8_t* packed;  // W [N, K]
  Absmax am;
  int log2_bs;
  int quant_type;
  int64_t N, K;
  const void* A2;  // [M, R]
  const void* B2;  // forward [N, R], backward [R, K]
  int R;           // multiple of BK (0: no LoRA pass)
  int64_t Nout;    // output columns (N forward, K backward)
  const float* bias;
  void* Y;  // [M, Nout]
  int ktiles_per_split;  // phase-1 k-tiles per CTA along z (all of them when unsplit)
  float* partial;        // split-K: fp32 [gridDim.z, M, Nout] (bias, phase 2 unused); else null
};

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

template <typename T, bool kTrans>
__global__ void __launch_bounds__(kThreads) gemm_4bit_kernel(const GemmParams p) {
  __shared__ __align__(16) uint16_t As[BM * SROW];
  __shared__ __align__(16) uint16_t Bs[64 * SROW];  // 64 rows of W (or B2) x 64 columns
  __shared__ float table[16];
  init_table(table, p.quant_type);  // first read after the loop's first __syncthreads()

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 1, wn = warp & 1;
  const int m0 = blockIdx.y * BM;
  const int64_t j0 = (int64_t)blockIdx.x * BN;  // first output column of the tile
  const int nk1 = (int)((p.Kred + BK - 1) / BK);
  // This CTA's tiles: phase-1 tiles [kt0, kt1), then (unsplit only) the R / BK LoRA tiles.
  const int kt0 = min(nk1, (int)blockIdx.z * p.ktiles_per_split);
  const int kt1 = min(nk1, kt0 + p.ktiles_per_split);
  const int n1 = kt1 - kt0;
  const int nkt = n1 + (p.partial != nullptr ? 0 : p.R / BK);
  auto tile_of = [&](int i) { return i < n1 ? kt0 + i : nk1 + (i - n1); };
  const int brow = tid >> 1, bcol = (tid & 1) * 32;  // this thread's 32-wide piece of the B tile

  uint4 areg[4], breg[4];
  float bscale = 0.0f;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);

  // Global -> registers for k-tile kt (phase 1: W, phase 2: the LoRA operands).
  auto load = [&](int kt) {
    const bool ph2 = kt >= nk1;
    const uint16_t* a = static_cast<const uint16_t*>(ph2 ? p.A2 : p.A);
    const int64_t lda = ph2 ? (int64_t)p.R : p.Kred;
    const int64_t r0 = (int64_t)(ph2 ? kt - nk1 : kt) * BK;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int q = tid + kThreads * i, row = q >> 3, col = (q & 7) * 8;
      const int gm = m0 + row;
      const int64_t gk = r0 + col;
      areg[i] = (gm < p.M && gk < lda) ? __ldg(reinterpret_cast<const uint4*>(a + (int64_t)gm * lda + gk)) : zero;
    }
    if (!ph2) {
      const int64_t wr = kTrans ? r0 + brow : j0 + brow;  // W row (n)
      const int64_t wc = kTrans ? j0 + bcol : r0 + bcol;  // W column (k), multiple of 32
      breg[0] = zero;
      bscale = 0.0f;
      if (wr < p.N && wc < p.K) {
        const int64_t e0 = wr * p.K + wc;  // 32 elements: one block (blocksize >= 32), 16 aligned bytes
        breg[0] = __ldg(reinterpret_cast<const uint4*>(p.packed + (e0 >> 1)));
        bscale = p.am(e0 >> p.log2_bs);
      }
    } else {
      const uint16_t* b2 = static_cast<const uint16_t*>(p.B2);
      const bool ok = kTrans ? (j0 + bcol < p.K) : (j0 + brow < p.N);
      const uint16_t* src = kTrans ? b2 + (r0 + brow) * p.K + j0 + bcol : b2 + (j0 + brow) * (int64_t)p.R + r0 + bcol;
#pragma unroll
      for (int i = 0; i < 4; ++i) breg[i] = ok ? __ldg(reinterpret_cast<const uint4*>(src) + i) : zero;
    }
  };

  // Registers -> shared, dequantizing W: T(fp32(table[c]) * absmax), exactly reference.py's W.
  auto store = [&](int kt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int q = tid + kThreads * i, row = q >> 3, col = (q & 7) * 8;
      *reinterpret_cast<uint4*>(&As[row * SROW + col]) = areg[i];
    }
    uint16_t* dst = &Bs[brow * SROW + bcol];
    if (kt < nk1) {
      float v[32];
      lookup32(breg[0], table, v);
#pragma unroll
      for (int j = 0; j < 32; ++j) v[j] = __fmul_rn(v[j], bscale);
      store32<T>(reinterpret_cast<T*>(dst), v);
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) reinterpret_cast<uint4*>(dst)[i] = breg[i];
    }
  };

  float acc[2][4][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mi][ni][c] = 0.0f;

  if (nkt > 0) load(tile_of(0));
  for (int it = 0; it < nkt; ++it) {
    __syncthreads();  // everyone is done reading the previous tile
    store(tile_of(it));
    __syncthreads();
    if (it + 1 < nkt) load(tile_of(it + 1));  // in flight while this tile is multiplied
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t af[2][4], bfr[4][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
        ldmatrix_x4(af[mi], &As[(wm * 32 + mi * 16 + (lane & 15)) * SROW + kk + (lane >> 4) * 8]);
#pragma unroll
      for (int pp = 0; pp < 2; ++pp) {
        uint32_t r[4];
        if (!kTrans) {  // Bs[n][k]: fragments straight
          ldmatrix_x4(r, &Bs[(wn * 32 + pp * 16 + (lane & 7) + (lane >> 4) * 8) * SROW + kk + ((lane >> 3) & 1) * 8]);
        } else {  // Bs[k_red][n_out]: transposed on load
          ldmatrix_x4_trans(r, &Bs[(kk + (lane & 7) + ((lane >> 3) & 1) * 8) * SROW + wn * 32 + pp * 16 + (lane >> 4) * 8]);
        }
        bfr[2 * pp][0] = r[0];
        bfr[2 * pp][1] = r[1];
        bfr[2 * pp + 1][0] = r[2];
        bfr[2 * pp + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma16816<T>(acc[mi][ni], af[mi], bfr[ni]);
    }
  }

  // Epilogue: + bias, one rounding into T, bounds-checked stores.
  T* Y = static_cast<T*>(p.Y);
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m0 + wm * 32 + mi * 16 + g + h * 8;
        if (m >= p.M) continue;
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int64_t n = j0 + wn * 32 + ni * 8 + 2 * t + c;
          if (n >= p.Nout) continue;
          float v = acc[mi][ni][2 * h + c];
          if (p.partial != nullptr) {
            p.partial[((int64_t)blockIdx.z * p.M + m) * p.Nout + n] = v;
            continue;
          }
          if (p.bias != nullptr) v += __ldg(p.bias + n);
          Y[(int64_t)m * p.Nout + n] = from_f32<T>(v);
        }
      }
    }
  }
}

template <typename T>
int launch(bool transposed, const GemmParams& p, int splits, cudaStream_t s) {
  const int64_t gx = (p.Nout + BN - 1) / BN, gy = ((int64_t)p.M + BM - 1) / BM;
  if (gx > 0x7fffffff || gy > 65535 || splits > 65535) return kUnsupported;
  const dim3 grid((unsigned)gx, (unsigned)gy, (unsigned)splits);
  if (transposed)
    gemm_4bit_kernel<T, true><<<grid, kThreads, 0, s>>>(p);
  else
    gemm_4bit_kernel<T, false><<<grid, kThreads, 0, s>>>(p);
  return (int)cudaGetLastError();
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

int gemm_4bit(int dtype, int transposed, const void* A, int M, int N, int64_t K, const uint8_t* packed,
              const float* absmax, const uint8_t* absmax_q, const float* nested_absmax, const float* nested_code,
              const float* offset, int blocksize, int quant_type, const void* A2, const void* B2, int R,
              const float* bias, void* Y, int splits, float* partial, const float* lora_t, const float* lora_b,
              int r, void* stream) {
  if (M < 1 || N < 1 || K < 32 || (K % 32) != 0 || (transposed && (N % 8) != 0)) return kUnsupported;
  if (splits < 1 || (splits > 1 && (partial == nullptr || R != 0))) return kBadArgument;
  if (splits == 1 && lora_t != nullptr) return kBadArgument;  // unsplit: LoRA enters through A2/B2
  if (R < 0 || (R % BK) != 0 || (R > 0 && (!A2 || !B2)) || (transposed && bias)) return kBadArgument;
  if (!detail::valid_4bit_blocksize(blocksize) || (quant_type != core::kNF4 && quant_type != core::kFP4))
    return kBadArgument;
  if (absmax_q ? (!nested_absmax || !nested_code || !offset) : !absmax) return kBadArgument;
  if (!aligned16(A) || !aligned16(packed) || (R > 0 && (!aligned16(A2) || !aligned16(B2)))) return kUnsupported;
  GemmParams p;
  p.A = A;
  p.Kred = transposed ? (int64_t)N : K;
  p.M = M;
  p.packed = packed;
  p.am = Absmax{absmax, absmax_q, nested_absmax, nested_code, offset};
  p.log2_bs = detail::log2_exact(blocksize);
  p.quant_type = quant_type;
  p.N = N;
  p.K = K;
  p.A2 = A2;
  p.B2 = B2;
  p.R = R;
  p.Nout = transposed ? K : (int64_t)N;
  const bool split_mode = splits > 1;  // partials + splitk_finalize (bias and LoRA there)
  p.bias = split_mode ? nullptr : bias;
  p.Y = Y;
  const int nk1 = (int)((p.Kred + BK - 1) / BK);
  if (splits > nk1) splits = nk1;  // every split gets at least one k-tile
  p.ktiles_per_split = (nk1 + splits - 1) / splits;
  p.partial = split_mode ? partial : nullptr;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  int rc;
  switch (dtype) {
    case core::kFloat16: rc = launch<__half>(transposed != 0, p, splits, s); break;
    case core::kBFloat16: rc = launch<__nv_bfloat16>(transposed != 0, p, splits, s); break;
    default: return kUnsupported;
  }
  if (rc != 0 || !split_mode) return rc;
  return splitk_finalize(partial, splits, M, (int)p.Nout, bias, lora_t, lora_b, r, Y, dtype, stream);
}

}  // namespace cuda
}  // namespace nf4kit

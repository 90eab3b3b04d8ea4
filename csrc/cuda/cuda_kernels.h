// CUDA kernel entry points (host functions in csrc/cuda/*.cu).  Each takes raw device
// pointers, sizes and a cudaStream_t (as void*), launches on that stream without
// synchronising or allocating (CUDA-graph safe) and returns 0, a negative nf4kit::Status
// for arguments it does not support, or the cudaError_t of the launch.
//
// Python (nf4kit/backends/cuda.py) validates shapes, dtypes and alignment first; these
// functions only re-check what would make a kernel read or write out of bounds.
#pragma once
#include <stdint.h>

namespace nf4kit {
namespace cuda {

const char* error_string(int status);

// A [n] (in_dtype: core::DType) -> packed [(n+1)/2] uint8, absmax [ceil(n/blocksize)] fp32.
// blocksize: a power of two in 32..4096.
int quantize_4bit(const void* in, int in_dtype, int64_t n, int blocksize, int quant_type, uint8_t* packed,
                  float* absmax, void* stream);

// packed [(n+1)/2] -> out [n] (out_dtype).  Plain state: absmax fp32 [nb] (absmax_q null).
// Nested state: absmax_q uint8 [nb], nested_absmax fp32 [ceil(nb/256)], nested_code fp32
// [256], offset fp32 [1] (a device pointer: no host sync); absmax null.
int dequantize_4bit(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q, const float* nested_absmax,
                    const float* nested_code, const float* offset, int64_t n, int blocksize, int quant_type,
                    void* out, int out_dtype, void* stream);

// 8-bit dynamic map: A [n] -> q [n] uint8 (nearest of the sorted code[256]), absmax fp32 [nb].
int quantize_blockwise(const void* in, int in_dtype, int64_t n, int blocksize, const float* code, uint8_t* q,
                       float* absmax, void* stream);
int dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, int64_t n, int blocksize,
                         void* out, int out_dtype, void* stream);

// Decode GEMV (M <= 8; M <= 16 with kGemvMma, M <= 64 with kGemvMmaGemm): partial[s][m][n] = sum over K-split s of
// x[m, k] * deq(W)[n, k], then splitk_finalize.  W [N, K] packed row-major, K % 32 == 0;
// x [M, K] (x_dtype), 16-byte aligned.  rows_per_warp: 1, 2, 4 or 8 rows share each x chunk.  depth: chunks per row in each
// lane's load ring (depth - 1 in flight): 2; for M = 1 also 3 or 4 with rows_per_warp <= 4,
// and 8 with rows_per_warp == 1.
// options (0: the row kernel above): kGemvStream (M = 1, K % 1024 == 0, S == K / 1024; depth 4 or 8)
// reads W in memory order with a persistent grid, one 1024-wide K-tile per warp (rows_per_warp is
// ignored).  kGemvMma (M <= 16, fp16/bf16 x, K % 256 == 0, S == K / 256) runs the tensor-core stream
// kernels; with it, kGemvMmaBlockReduce (M = 1) sums each block's K-tiles in shared memory (y written
// by the GEMV itself where a block spans the row), and with that kGemvMmaCompact runs it two blocks an
// SM.  kGemvMmaGemm (M <= 64) runs the table GEMM.  kGemvPdl goes beside any of them.  Any other bit
// is refused (kBadArgument), among them 1, 2, 16 and 32: the pair table, the direct epilogue, the wide
// finalize and the two accumulator chains, measured on the H100 without a gain and retired.
// S splits, 1 <= S <= K / 32.
// partial: fp32 [S*M*N] scratch from the caller.
// bias fp32 [N] or null; lora_t fp32 [M, r] (already scaled), lora_b fp32 [N, r], or null.
// y [M, N] in x_dtype.
constexpr int kGemvStream = 4;
constexpr int kGemvMma = 8;  // the stream scheme on mma.sync (M <= 16, fp16/bf16 x, K % 256 == 0, blocksize >= 64,
                             // S == K / 256, N * K < 2^32 - 256, depth 2 or 3, no other option bit but
                             // kGemvMmaBlockReduce, kGemvPdl and kGemvMmaCompact)
constexpr int kGemvMmaBlockReduce = 64;  // with kGemvMma at M = 1 (the Python default there): each block sums its
                                         // warps' K-tiles in shared memory (y written directly where one block
                                         // spans the row)
constexpr int kGemvMmaGemm = 128;  // M <= 64 (the Python default at M = 17..64 where it fits; fp16/bf16 x,
                                   // K % 256 == 0, blocksize >= 64, N * K < 2^32 - 256) on the table decode with
                                   // x staged in shared memory, S K-splits (S == ceil(T / ceil(T / S)), T = K / 256)
constexpr int kGemvPdl = 256;  // beside any kernel (sm_90+ only; the caller checks the device; the Python default
                               // there): the finalize is launched with programmatic stream serialization, so its
                               // blocks are scheduled while the GEMV runs and wait (griddepcontrol) for its partials
constexpr int kGemvMmaGemmCompact = 512;  // with kGemvMmaGemm: the same sums in 81 / 98 KB of shared memory and
                                          // 128 registers: two 8-warp blocks an SM (M <= 32, sm_90+; the Python
                                          // default there) or one of 16 warps (M <= 64)
constexpr int kGemvMmaGemmCluster = 1024;  // with kGemvMmaGemm, 2 <= S <= 8: the S splits of each 128 rows run as
                                          // one thread-block cluster and sum through distributed shared memory, no
                                          // partial and no finalize (the same bits), where all the clusters run at
                                          // once on this device (sm_90+); else partials and the finalize as without
constexpr int kGemvMmaCompact = 2048;  // experimental, with kGemvMma | kGemvMmaBlockReduce at M = 1, depth 2:
                                       // the same sums in 78 KB of shared memory and 64 registers, two
                                       // blocks an SM (x staged in shared memory); the same bits
// Whether kGemvMmaGemmCluster takes effect for x [M, *] (fp16/bf16), W [N, *] at S splits in the given
// form on the current device: *fits = 1 where all ceil(N / 128) clusters of S blocks run at once (the
// kernel then sums in them), 0 where gemv_4bit falls back to the partials and the finalize.
int gemm_table_clusters_fit(int x_dtype, int M, int N, int compact, int S, int* fits);
int gemv_4bit(const void* x, int x_dtype, int M, int N, int64_t K, const uint8_t* packed, const float* absmax,
              const uint8_t* absmax_q, const float* nested_absmax, const float* nested_code, const float* offset,
              int blocksize, int quant_type, int rows_per_warp, int depth, int options, int S, float* partial,
              const float* bias, const float* lora_t, const float* lora_b, int r, void* y, void* stream);

// y[m, n] = T(sum_{s<S} partial[s, m, n] (in order) + bias[n] + sum_j lora_t[m, j] * lora_b[n, j])
// for y [M, N] of y_dtype; bias / lora_t + lora_b may be null.
int splitk_finalize(const float* partial, int S, int M, int N, const float* bias, const float* lora_t,
                    const float* lora_b, int r, void* y, int y_dtype, void* stream);

// Fused dequant-GEMM on tensor cores (mma.sync m16n8k16, fp32 accumulate), dtype fp16/bf16.
// forward (transposed == 0): Y[M, N] = A[M, K] . deq(W)^T + A2[M, R] . B2[N, R]^T + bias
// backward (transposed == 1): Y[M, K] = A[M, N] . deq(W) + A2[M, R] . B2[R, K]
// W [N, K] packed, K % 32 == 0; backward needs N % 8 == 0; R % 64 == 0 (A2/B2 null when R == 0);
// every pointer 16-byte aligned.  bias fp32 [N] or null (forward only).
// splits > 1 (small M): split-K over the phase-1 reduction into partial fp32 [splits*M*Nout],
// then splitk_finalize with bias and the LoRA term lora_t fp32 [M, r] (scaled) . lora_b fp32
// [Nout, r]^T; R must be 0 then.  splits == 1: partial / lora_t / lora_b null.
int gemm_4bit(int dtype, int transposed, const void* A, int M, int N, int64_t K, const uint8_t* packed,
              const float* absmax, const uint8_t* absmax_q, const float* nested_absmax, const float* nested_code,
              const float* offset, int blocksize, int quant_type, const void* A2, const void* B2, int R,
              const float* bias, void* Y, int splits, float* partial, const float* lora_t, const float* lora_b,
              int r, void* stream);

}  // namespace cuda
}  // namespace nf4kit

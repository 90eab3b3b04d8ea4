// The GEMV kernels and their launchers for bf16 activations (gemv_kernels.cuh).
#include "cuda/gemv_kernels.cuh"

namespace nf4kit {
namespace cuda {
template struct GemvLaunch<__nv_bfloat16>;
}  // namespace cuda
}  // namespace nf4kit

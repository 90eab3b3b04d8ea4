// The GEMV kernels and their launchers for fp16 activations (gemv_kernels.cuh).
#include "cuda/gemv_kernels.cuh"

namespace nf4kit {
namespace cuda {
template struct GemvLaunch<__half>;
}  // namespace cuda
}  // namespace nf4kit

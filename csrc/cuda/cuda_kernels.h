// CUDA kernel entry points (host functions in csrc/cuda/*.cu).  Each takes raw device
// pointers, sizes and a cudaStream_t (as void*), launches on that stream and returns
// 0 or the cudaError_t of the launch.
#pragma once
#include <stdint.h>

namespace nf4kit {
namespace cuda {

const char* error_string(int status);

int quantize_4bit(const void* in, int in_dtype, int64_t n, int blocksize, int quant_type, uint8_t* packed,
                  float* absmax, void* stream);

int dequantize_4bit(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q, const float* nested_absmax,
                    const float* nested_code, const float* offset, int64_t n, int blocksize, int quant_type,
                    void* out, int out_dtype, void* stream);

}  // namespace cuda
}  // namespace nf4kit

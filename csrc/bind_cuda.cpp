// pybind11 bindings of the CUDA kernels (csrc/cuda).  Pointers and the stream arrive as
// integers (tensor.data_ptr(), torch.cuda.current_stream().cuda_stream); 0 means null.
// Launches are asynchronous; the GIL is released around them all the same.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cuda/cuda_kernels.h"

namespace py = pybind11;

namespace nf4kit {
namespace {
template <typename T>
T* as_ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }
using P = std::uintptr_t;
}  // namespace

const char* cuda_error_string(int status) { return cuda::error_string(status); }

void bind_cuda(py::module_& m) {
  py::module_ c = m.def_submodule("cuda", "CUDA kernels (raw pointers, sizes, stream; status code out)");
  c.def("quantize_4bit", [](P in, int in_dtype, int64_t n, int blocksize, int quant_type, P packed, P absmax,
                            P stream) {
    py::gil_scoped_release nogil;
    return cuda::quantize_4bit(as_ptr<const void>(in), in_dtype, n, blocksize, quant_type, as_ptr<uint8_t>(packed),
                               as_ptr<float>(absmax), as_ptr<void>(stream));
  });
  c.def("dequantize_4bit", [](P packed, P absmax, P absmax_q, P nested_absmax, P nested_code, P offset, int64_t n,
                              int blocksize, int quant_type, P out, int out_dtype, P stream) {
    py::gil_scoped_release nogil;
    return cuda::dequantize_4bit(as_ptr<const uint8_t>(packed), as_ptr<const float>(absmax),
                                 as_ptr<const uint8_t>(absmax_q), as_ptr<const float>(nested_absmax),
                                 as_ptr<const float>(nested_code), as_ptr<const float>(offset), n, blocksize,
                                 quant_type, as_ptr<void>(out), out_dtype, as_ptr<void>(stream));
  });
  c.def("quantize_blockwise", [](P in, int in_dtype, int64_t n, int blocksize, P code, P q, P absmax, P stream) {
    py::gil_scoped_release nogil;
    return cuda::quantize_blockwise(as_ptr<const void>(in), in_dtype, n, blocksize, as_ptr<const float>(code),
                                    as_ptr<uint8_t>(q), as_ptr<float>(absmax), as_ptr<void>(stream));
  });
  c.def("dequantize_blockwise", [](P q, P absmax, P code, int64_t n, int blocksize, P out, int out_dtype, P stream) {
    py::gil_scoped_release nogil;
    return cuda::dequantize_blockwise(as_ptr<const uint8_t>(q), as_ptr<const float>(absmax),
                                      as_ptr<const float>(code), n, blocksize, as_ptr<void>(out), out_dtype,
                                      as_ptr<void>(stream));
  });
  c.def("gemv_4bit", [](P x, int x_dtype, int M, int N, int64_t K, P packed, P absmax, P absmax_q, P nested_absmax,
                        P nested_code, P offset, int blocksize, int quant_type, int rows_per_warp, int depth,
                        int options, int S, P partial, P bias, P lora_t, P lora_b, int r, P y, P stream) {
    py::gil_scoped_release nogil;
    return cuda::gemv_4bit(as_ptr<const void>(x), x_dtype, M, N, K, as_ptr<const uint8_t>(packed),
                           as_ptr<const float>(absmax), as_ptr<const uint8_t>(absmax_q),
                           as_ptr<const float>(nested_absmax), as_ptr<const float>(nested_code),
                           as_ptr<const float>(offset), blocksize, quant_type, rows_per_warp, depth, options, S,
                           as_ptr<float>(partial), as_ptr<const float>(bias), as_ptr<const float>(lora_t), as_ptr<const float>(lora_b), r,
                           as_ptr<void>(y), as_ptr<void>(stream));
  });
  c.def("gemm_table_clusters_fit", [](int x_dtype, int M, int N, int compact, int S) {
    int fits = 0;
    const int status = cuda::gemm_table_clusters_fit(x_dtype, M, N, compact, S, &fits);
    return py::make_tuple(status, fits);
  });
  c.def("gemm_4bit", [](int dtype, int transposed, P A, int M, int N, int64_t K, P packed, P absmax, P absmax_q,
                        P nested_absmax, P nested_code, P offset, int blocksize, int quant_type, P A2, P B2, int R,
                        P bias, P Y, int splits, P partial, P lora_t, P lora_b, int r, P stream) {
    py::gil_scoped_release nogil;
    return cuda::gemm_4bit(dtype, transposed, as_ptr<const void>(A), M, N, K, as_ptr<const uint8_t>(packed),
                           as_ptr<const float>(absmax), as_ptr<const uint8_t>(absmax_q),
                           as_ptr<const float>(nested_absmax), as_ptr<const float>(nested_code),
                           as_ptr<const float>(offset), blocksize, quant_type, as_ptr<const void>(A2),
                           as_ptr<const void>(B2), R, as_ptr<const float>(bias), as_ptr<void>(Y), splits,
                           as_ptr<float>(partial), as_ptr<const float>(lora_t), as_ptr<const float>(lora_b), r,
                           as_ptr<void>(stream));
  });
}
}  // namespace nf4kit

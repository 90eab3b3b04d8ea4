// pybind11 bindings of the CUDA kernels (csrc/cuda).  Pointers and the stream arrive as integers.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cuda/cuda_kernels.h"

namespace py = pybind11;

namespace nf4kit {
namespace {
template <typename T>
T* as_ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }
}  // namespace

const char* cuda_error_string(int status) { return cuda::error_string(status); }

void bind_cuda(py::module_& m) {
  py::module_ c = m.def_submodule("cuda", "CUDA kernels");
  c.def("quantize_4bit", [](std::uintptr_t in, int in_dtype, int64_t n, int blocksize, int quant_type,
                            std::uintptr_t packed, std::uintptr_t absmax, std::uintptr_t stream) {
    return cuda::quantize_4bit(as_ptr<const void>(in), in_dtype, n, blocksize, quant_type, as_ptr<uint8_t>(packed),
                               as_ptr<float>(absmax), as_ptr<void>(stream));
  });
}
}  // namespace nf4kit

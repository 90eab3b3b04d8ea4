// nf4kit._C: pybind11 module.  Raw pointers, sizes and a stream handle in, a status
// code out; no libtorch link, so one build serves every torch version.
#include <pybind11/pybind11.h>

#include "core/status.h"

namespace py = pybind11;

namespace nf4kit {
void bind_cpu(py::module_& m);   // csrc/bind_cpu.cpp
#ifdef NF4KIT_WITH_CUDA
void bind_cuda(py::module_& m);  // csrc/bind_cuda.cpp
const char* cuda_error_string(int status);
#endif
}  // namespace nf4kit

PYBIND11_MODULE(_C, m) {
  m.doc() = "nf4kit compiled kernels (CPU, and CUDA when built with nvcc)";
  m.def("error_string", [](int status) -> std::string {
    switch (status) {
      case nf4kit::kOk: return "ok";
      case nf4kit::kBadArgument: return "bad argument";
      case nf4kit::kUnsupported: return "unsupported argument combination";
      case nf4kit::kNoMemory: return "out of memory";
      default: break;
    }
#ifdef NF4KIT_WITH_CUDA
    if (status > 0) return nf4kit::cuda_error_string(status);
#endif
    return "unknown status " + std::to_string(status);
  });
  m.attr("has_cpu") = true;
  nf4kit::bind_cpu(m);
#ifdef NF4KIT_WITH_CUDA
  m.attr("has_cuda") = true;
  m.attr("cuda_archs") = NF4KIT_CUDA_ARCHS;
  m.attr("cuda_compiler_version") = NF4KIT_CUDA_VERSION;
  nf4kit::bind_cuda(m);
#else
  m.attr("has_cuda") = false;
  m.attr("cuda_archs") = "";
  m.attr("cuda_compiler_version") = "";
#endif
}

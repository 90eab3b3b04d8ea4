// pybind11 bindings of the CPU kernels (csrc/cpu).  Pointers arrive as integers.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cpu/cpu_kernels.h"

namespace py = pybind11;

namespace nf4kit {
namespace {
template <typename T>
T* as_ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }
}  // namespace

void bind_cpu(py::module_& m) {
  py::module_ c = m.def_submodule("cpu", "C++ CPU kernels");
  c.def("quantize_4bit", [](std::uintptr_t in, int in_dtype, int64_t n, int blocksize, int quant_type,
                            std::uintptr_t packed, std::uintptr_t absmax) {
    py::gil_scoped_release nogil;
    return cpu::quantize_4bit(as_ptr<const void>(in), in_dtype, n, blocksize, quant_type,
                              as_ptr<uint8_t>(packed), as_ptr<float>(absmax));
  });
  c.def("dequantize_4bit", [](std::uintptr_t packed, std::uintptr_t absmax, std::uintptr_t absmax_q,
                              std::uintptr_t nested_absmax, std::uintptr_t nested_code, std::uintptr_t offset,
                              int64_t n, int blocksize, int quant_type, std::uintptr_t out, int out_dtype) {
    py::gil_scoped_release nogil;
    return cpu::dequantize_4bit(as_ptr<const uint8_t>(packed), as_ptr<const float>(absmax),
                                as_ptr<const uint8_t>(absmax_q), as_ptr<const float>(nested_absmax),
                                as_ptr<const float>(nested_code), as_ptr<const float>(offset), n, blocksize,
                                quant_type, as_ptr<void>(out), out_dtype);
  });
  c.def("quantize_blockwise", [](std::uintptr_t in, int in_dtype, int64_t n, int blocksize, std::uintptr_t code,
                                 std::uintptr_t q, std::uintptr_t absmax) {
    py::gil_scoped_release nogil;
    return cpu::quantize_blockwise(as_ptr<const void>(in), in_dtype, n, blocksize, as_ptr<const float>(code),
                                   as_ptr<uint8_t>(q), as_ptr<float>(absmax));
  });
  c.def("dequantize_blockwise", [](std::uintptr_t q, std::uintptr_t absmax, std::uintptr_t code, int64_t n,
                                   int blocksize, std::uintptr_t out, int out_dtype) {
    py::gil_scoped_release nogil;
    return cpu::dequantize_blockwise(as_ptr<const uint8_t>(q), as_ptr<const float>(absmax),
                                     as_ptr<const float>(code), n, blocksize, as_ptr<void>(out), out_dtype);
  });
}
}  // namespace nf4kit

// pybind11 bindings of the CPU kernels (csrc/cpu).  Pointers arrive as integers; 0 means
// "absent".  Every function returns a status code (core/status.h).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cpu/cpu_kernels.h"

namespace py = pybind11;

namespace nf4kit {
namespace {
template <typename T>
T* as_ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

// The 4-bit state arguments in the order the Python side passes them.
cpu::Q4Args q4(std::uintptr_t packed, std::uintptr_t absmax, std::uintptr_t absmax_q, std::uintptr_t nested_absmax,
               std::uintptr_t nested_code, std::uintptr_t offset, int64_t n, int blocksize, int quant_type) {
  return cpu::Q4Args{as_ptr<const uint8_t>(packed), as_ptr<const float>(absmax), as_ptr<const uint8_t>(absmax_q),
                     as_ptr<const float>(nested_absmax), as_ptr<const float>(nested_code),
                     as_ptr<const float>(offset), n, blocksize, quant_type};
}
}  // namespace

void bind_cpu(py::module_& m) {
  py::module_ c = m.def_submodule("cpu", "C++ CPU kernels");
  c.def("set_isa_cap", [](int level) { return cpu::set_isa_cap(level); },
        "cap the ISA level (0 generic, 1 avx2, 2 avx512) for benchmarks/tests; returns the level in force");
  c.def("isa", []() { return std::string(cpu::isa()); }, "implementation serving calls: 'avx512', 'avx2' or 'generic'");
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
  c.def("dequantize_4bit_tile",
        [](std::uintptr_t packed, std::uintptr_t absmax, std::uintptr_t absmax_q, std::uintptr_t nested_absmax,
           std::uintptr_t nested_code, std::uintptr_t offset, int blocksize, int quant_type, int64_t N, int64_t K,
           int64_t n0, int64_t n1, int64_t k0, int64_t k1, std::uintptr_t out, int out_dtype) {
          py::gil_scoped_release nogil;
          const cpu::Q4Args q = q4(packed, absmax, absmax_q, nested_absmax, nested_code, offset, N * K, blocksize,
                                   quant_type);
          return cpu::dequantize_4bit_tile(q, N, K, n0, n1, k0, k1, as_ptr<void>(out), out_dtype);
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
  c.def("quantize_absmax_int8", [](std::uintptr_t in, int in_dtype, int64_t n, int64_t blocksize, std::uintptr_t q,
                                   std::uintptr_t absmax) {
    py::gil_scoped_release nogil;
    return cpu::quantize_absmax_int8(as_ptr<const void>(in), in_dtype, n, blocksize, as_ptr<int8_t>(q),
                                     as_ptr<float>(absmax));
  });
  c.def("dequantize_absmax_int8", [](std::uintptr_t q, std::uintptr_t absmax, int64_t n, int64_t blocksize,
                                     std::uintptr_t out, int out_dtype) {
    py::gil_scoped_release nogil;
    return cpu::dequantize_absmax_int8(as_ptr<const int8_t>(q), as_ptr<const float>(absmax), n, blocksize,
                                       as_ptr<void>(out), out_dtype);
  });
  c.def("gemv_4bit", [](std::uintptr_t x, int64_t M, std::uintptr_t packed, std::uintptr_t absmax,
                        std::uintptr_t absmax_q, std::uintptr_t nested_absmax, std::uintptr_t nested_code,
                        std::uintptr_t offset, int blocksize, int quant_type, int64_t N, int64_t K,
                        std::uintptr_t bias, std::uintptr_t y) {
    py::gil_scoped_release nogil;
    const cpu::Q4Args q = q4(packed, absmax, absmax_q, nested_absmax, nested_code, offset, N * K, blocksize,
                             quant_type);
    return cpu::gemv_4bit(as_ptr<const float>(x), M, q, N, K, as_ptr<const float>(bias), as_ptr<float>(y));
  });
  c.def("gemv_t_4bit", [](std::uintptr_t dy, int64_t M, std::uintptr_t packed, std::uintptr_t absmax,
                          std::uintptr_t absmax_q, std::uintptr_t nested_absmax, std::uintptr_t nested_code,
                          std::uintptr_t offset, int blocksize, int quant_type, int64_t N, int64_t K,
                          std::uintptr_t dx) {
    py::gil_scoped_release nogil;
    const cpu::Q4Args q = q4(packed, absmax, absmax_q, nested_absmax, nested_code, offset, N * K, blocksize,
                             quant_type);
    return cpu::gemv_t_4bit(as_ptr<const float>(dy), M, q, N, K, as_ptr<float>(dx));
  });
}
}  // namespace nf4kit

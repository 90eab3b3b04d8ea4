// Status codes returned by every entry point of nf4kit._C (0 = success).
// Negative: argument problems found in C++ (Python validates first, so these mean a
// bug in the caller).  Positive: a cudaError_t from a CUDA launch.
#pragma once

namespace nf4kit {
enum Status : int {
  kOk = 0,
  kBadArgument = -1,
  kUnsupported = -2,
  kNoMemory = -3,
};
}  // namespace nf4kit

// TEST-ONLY stand-in for c10/cuda/CUDAGuard.h in the host emulation build (tests/cuda_emulation):
// host memory has no current device to switch.
#pragma once

#include <c10/core/Device.h>

namespace c10::cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device /*device*/) {}
};

}  // namespace c10::cuda

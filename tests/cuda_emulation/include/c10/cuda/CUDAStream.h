// TEST-ONLY stand-in for c10/cuda/CUDAStream.h in the host emulation build (tests/cuda_emulation):
// host launches run in order on the calling thread, so there is one (null) stream.
#pragma once

#include <c10/core/Device.h>
#include <cuda_runtime_api.h>

namespace c10::cuda {

struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex /*device_index*/ = -1) { return {}; }

}  // namespace c10::cuda

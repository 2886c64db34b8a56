// TEST-ONLY stand-in for c10/cuda/CUDAException.h in the host emulation build (tests/cuda_emulation).
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#define C10_CUDA_CHECK(EXPR)                                                          \
  do {                                                                                \
    const cudaError_t msda_emulated_error = (EXPR);                                   \
    TORCH_CHECK(msda_emulated_error == cudaSuccess, "CUDA error ", msda_emulated_error); \
  } while (0)

// TEST-ONLY stand-in for the CUDA runtime API names that models/ops/csrc uses, first on the include
// path of the host emulation build (tests/cuda_emulation); launches there are synchronous host calls.
#pragma once

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
using cudaStream_t = void*;

inline cudaError_t cudaGetLastError() { return cudaSuccess; }

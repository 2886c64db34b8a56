// Kernel launchers of the CUDA implementation (defined in ms_deform_attn_cuda_kernels.cu).
//
// The kernels live in a translation unit that includes no ATen headers, so nvcc compiles them
// quickly; the ATen-facing host code (checks, allocation, dispatch, registration) is plain C++ in
// ms_deform_attn_cuda.cpp.
#pragma once

#include <cstdint>

#include <ATen/OpMathType.h>
#include <cuda_runtime_api.h>

namespace sparse_detr {

// Sizes of one launch: value [B, S, H, D], locations [B, Q, H, L, P, 2]; groups = B * Q * H.
struct MsdaLaunchSizes {
  int64_t groups;
  int64_t tokens;
  int64_t queries;
  int heads;
  int channels;
  int levels;
  int points;
};

// All pointers are to contiguous device memory; locations and weights are in the accumulation type
// (at::opmath_type<scalar_t>). Returns the launch error, if any (cudaSuccess otherwise).
template <typename scalar_t>
cudaError_t launch_ms_deform_attn_forward(const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                                          const at::opmath_type<scalar_t>* locations,
                                          const at::opmath_type<scalar_t>* weights, scalar_t* output,
                                          const MsdaLaunchSizes& sizes, cudaStream_t stream);

// grad_value, grad_locations and grad_weights must be zero-filled (accumulation type).
template <typename scalar_t>
cudaError_t launch_ms_deform_attn_backward(const scalar_t* grad_output, const scalar_t* value, const int64_t* shapes,
                                           const int64_t* starts, const at::opmath_type<scalar_t>* locations,
                                           const at::opmath_type<scalar_t>* weights,
                                           at::opmath_type<scalar_t>* grad_value,
                                           at::opmath_type<scalar_t>* grad_locations,
                                           at::opmath_type<scalar_t>* grad_weights, const MsdaLaunchSizes& sizes,
                                           cudaStream_t stream);

// Largest number of blocks one launch may use.
constexpr int64_t kMsdaMaxBlocks = 2147483647;
constexpr int kMsdaBlockThreads = 256;

}  // namespace sparse_detr

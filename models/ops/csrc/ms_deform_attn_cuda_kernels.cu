// CUDA kernels of sparse_detr::ms_deform_attn (forward and backward) and their launchers.
//
// Layout: a "group" of G consecutive lanes of a warp (G in {4, 8, 16, 32}) handles one
// (batch, query, head) triple; lane j owns channels j, j + G, ..., so a group reads each corner's
// channels as one coalesced run. Heads with D >= 32 channels use full warps (the fast path for the
// usual D = 32: one 128-byte load per corner in fp32), smaller D packs 32 / G triples per warp, D > 32
// gives each lane up to CPL = 8 channels, and D > 256 loops over channel chunks. Any D works.
//
// Backward: grad_value is scattered with atomicAdd into an accumulation-type buffer (float32 for
// half / bfloat16 / float32 values, float64 for float64) that the host rounds to the value dtype;
// the per-sample gradients (locations, weights) are reduced across the group with warp shuffles and
// written by the group's first lane, which owns them (no atomics needed there).
//
// Locations and weights are read in the accumulation type; the host code converts them.
// This file deliberately includes no ATen headers (fast nvcc builds).
#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "ms_deform_attn_common.h"
#include "ms_deform_attn_cuda.h"

// A launch. The tests also compile this file as plain C++ (tests/cuda_emulation runs every block's
// threads as host threads, to check the indexing and warp logic without a GPU); their emulation header
// defines MSDA_LAUNCH first, since <<<...>>> is not C++.
#ifndef MSDA_LAUNCH
#define MSDA_LAUNCH(kernel, blocks, stream, ...) kernel<<<blocks, kBlockThreads, 0, stream>>>(__VA_ARGS__)
#endif

namespace sparse_detr {
namespace {

constexpr int kBlockThreads = kMsdaBlockThreads;  // a multiple of 32, hence of every G

template <typename scalar_t, int G, int CPL>
__global__ void __launch_bounds__(kBlockThreads) ms_deform_attn_forward_kernel(
    const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
    const at::opmath_type<scalar_t>* __restrict__ locations, const at::opmath_type<scalar_t>* __restrict__ weights,
    scalar_t* __restrict__ output, int64_t groups, int64_t tokens, int64_t queries, int heads, int channels,
    int levels, int points) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * kBlockThreads + threadIdx.x;
  const int64_t g = thread / G;
  const int lane = static_cast<int>(thread % G);
  if (g >= groups) return;  // no warp-level communication in the forward pass

  const int64_t h = g % heads;
  const int64_t b = g / (queries * heads);
  const int64_t pixel_stride = static_cast<int64_t>(heads) * channels;
  const scalar_t* value_bh = value + b * tokens * pixel_stride + h * channels;
  const int samples = levels * points;
  const acc_t* loc = locations + g * samples * 2;
  const acc_t* attn = weights + g * samples;
  scalar_t* out = output + g * channels;

  for (int c0 = 0; c0 < channels; c0 += G * CPL) {
    acc_t acc[CPL];
#pragma unroll
    for (int k = 0; k < CPL; ++k) acc[k] = acc_t(0);
    for (int l = 0; l < levels; ++l) {
      const int64_t height = shapes[2 * l];
      const int64_t width = shapes[2 * l + 1];
      const scalar_t* level = value_bh + starts[l] * pixel_stride;
      for (int p = 0; p < points; ++p) {
        const int i = l * points + p;
        Bilinear<acc_t> bl;
        if (!bilinear_corners(loc[2 * i], loc[2 * i + 1], height, width, bl)) continue;
        const acc_t a = attn[i];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          if (!bl.valid[c]) continue;
          const acc_t w = a * bl.weight[c];
          const scalar_t* v = level + bl.offset[c] * pixel_stride;
#pragma unroll
          for (int k = 0; k < CPL; ++k) {
            const int d = c0 + lane + k * G;
            if (d < channels) acc[k] += w * static_cast<acc_t>(v[d]);
          }
        }
      }
    }
#pragma unroll
    for (int k = 0; k < CPL; ++k) {
      const int d = c0 + lane + k * G;
      if (d < channels) out[d] = static_cast<scalar_t>(acc[k]);
    }
  }
}

template <typename scalar_t, int G, int CPL>
__global__ void __launch_bounds__(kBlockThreads) ms_deform_attn_backward_kernel(
    const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
    const int64_t* __restrict__ starts, const at::opmath_type<scalar_t>* __restrict__ locations,
    const at::opmath_type<scalar_t>* __restrict__ weights, at::opmath_type<scalar_t>* __restrict__ grad_value,
    at::opmath_type<scalar_t>* __restrict__ grad_locations, at::opmath_type<scalar_t>* __restrict__ grad_weights,
    int64_t groups, int64_t tokens, int64_t queries, int heads, int channels, int levels, int points) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * kBlockThreads + threadIdx.x;
  const int lane = static_cast<int>(thread % G);
  // Every thread of the block stays in the loops below so that the warp shuffles always see all 32
  // lanes; threads past the last triple read the last triple and write nothing.
  const bool active = thread / G < groups;
  const int64_t g = active ? thread / G : groups - 1;

  const int64_t h = g % heads;
  const int64_t b = g / (queries * heads);
  const int64_t pixel_stride = static_cast<int64_t>(heads) * channels;
  const int64_t bh_offset = b * tokens * pixel_stride + h * channels;
  const scalar_t* value_bh = value + bh_offset;
  acc_t* grad_value_bh = grad_value + bh_offset;
  const int samples = levels * points;
  const acc_t* loc = locations + g * samples * 2;
  const acc_t* attn = weights + g * samples;
  acc_t* grad_loc = grad_locations + g * samples * 2;
  acc_t* grad_attn = grad_weights + g * samples;
  const scalar_t* gout = grad_output + g * channels;

  for (int c0 = 0; c0 < channels; c0 += G * CPL) {
    acc_t go[CPL];
#pragma unroll
    for (int k = 0; k < CPL; ++k) {
      const int d = c0 + lane + k * G;
      go[k] = (active && d < channels) ? static_cast<acc_t>(gout[d]) : acc_t(0);
    }
    for (int l = 0; l < levels; ++l) {
      const int64_t height = shapes[2 * l];
      const int64_t width = shapes[2 * l + 1];
      const int64_t level_offset = starts[l] * pixel_stride;
      for (int p = 0; p < points; ++p) {
        const int i = l * points + p;
        Bilinear<acc_t> bl;
        const bool inside = bilinear_corners(loc[2 * i], loc[2 * i + 1], height, width, bl) && active;
        const acc_t a = attn[i];
        acc_t ga = acc_t(0), gx = acc_t(0), gy = acc_t(0);
        if (inside) {
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            if (!bl.valid[c]) continue;
            const int64_t offset = level_offset + bl.offset[c] * pixel_stride;
            const scalar_t* v = value_bh + offset;
            acc_t* gv = grad_value_bh + offset;
            const acc_t w = a * bl.weight[c];
            acc_t dot = acc_t(0);
#pragma unroll
            for (int k = 0; k < CPL; ++k) {
              const int d = c0 + lane + k * G;
              if (d < channels) {
                dot += go[k] * static_cast<acc_t>(v[d]);
                atomicAdd(gv + d, w * go[k]);
              }
            }
            ga += bl.weight[c] * dot;
            gx += bl.dwdx[c] * dot;
            gy += bl.dwdy[c] * dot;
          }
        }
        // Sum the lanes' partial dot products over the group (all 32 lanes execute this).
#pragma unroll
        for (int offset = G / 2; offset > 0; offset >>= 1) {
          ga += __shfl_xor_sync(0xffffffffu, ga, offset, G);
          gx += __shfl_xor_sync(0xffffffffu, gx, offset, G);
          gy += __shfl_xor_sync(0xffffffffu, gy, offset, G);
        }
        if (inside && lane == 0) {
          // The group owns these entries; chunks of channels (D > G * CPL) add up here.
          grad_attn[i] += ga;
          grad_loc[2 * i] += a * gx * static_cast<acc_t>(width);
          grad_loc[2 * i + 1] += a * gy * static_cast<acc_t>(height);
        }
      }
    }
  }
}

// Calls fn(std::integral_constant<int, G>, std::integral_constant<int, CPL>) for the layout of D channels.
template <typename Fn>
void with_layout(int64_t channels, Fn&& fn) {
  using std::integral_constant;
  if (channels <= 4) {
    fn(integral_constant<int, 4>{}, integral_constant<int, 1>{});
  } else if (channels <= 8) {
    fn(integral_constant<int, 8>{}, integral_constant<int, 1>{});
  } else if (channels <= 16) {
    fn(integral_constant<int, 16>{}, integral_constant<int, 1>{});
  } else if (channels <= 32) {
    fn(integral_constant<int, 32>{}, integral_constant<int, 1>{});
  } else if (channels <= 64) {
    fn(integral_constant<int, 32>{}, integral_constant<int, 2>{});
  } else if (channels <= 128) {
    fn(integral_constant<int, 32>{}, integral_constant<int, 4>{});
  } else {
    fn(integral_constant<int, 32>{}, integral_constant<int, 8>{});
  }
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_ms_deform_attn_forward(const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                                          const at::opmath_type<scalar_t>* locations,
                                          const at::opmath_type<scalar_t>* weights, scalar_t* output,
                                          const MsdaLaunchSizes& s, cudaStream_t stream) {
  with_layout(s.channels, [&](auto lanes, auto per_lane) {
    constexpr int G = decltype(lanes)::value;
    constexpr int CPL = decltype(per_lane)::value;
    const auto blocks = static_cast<unsigned int>((s.groups * G + kBlockThreads - 1) / kBlockThreads);
    const auto kernel = &ms_deform_attn_forward_kernel<scalar_t, G, CPL>;
    MSDA_LAUNCH(kernel, blocks, stream, value, shapes, starts, locations, weights, output, s.groups, s.tokens,
                s.queries, s.heads, s.channels, s.levels, s.points);
  });
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_ms_deform_attn_backward(const scalar_t* grad_output, const scalar_t* value, const int64_t* shapes,
                                           const int64_t* starts, const at::opmath_type<scalar_t>* locations,
                                           const at::opmath_type<scalar_t>* weights,
                                           at::opmath_type<scalar_t>* grad_value,
                                           at::opmath_type<scalar_t>* grad_locations,
                                           at::opmath_type<scalar_t>* grad_weights, const MsdaLaunchSizes& s,
                                           cudaStream_t stream) {
  with_layout(s.channels, [&](auto lanes, auto per_lane) {
    constexpr int G = decltype(lanes)::value;
    constexpr int CPL = decltype(per_lane)::value;
    const auto blocks = static_cast<unsigned int>((s.groups * G + kBlockThreads - 1) / kBlockThreads);
    const auto kernel = &ms_deform_attn_backward_kernel<scalar_t, G, CPL>;
    MSDA_LAUNCH(kernel, blocks, stream, grad_output, value, shapes, starts, locations, weights, grad_value,
                grad_locations, grad_weights, s.groups, s.tokens, s.queries, s.heads, s.channels, s.levels, s.points);
  });
  return cudaGetLastError();
}

#define MSDA_INSTANTIATE(scalar_t)                                                                                \
  template cudaError_t launch_ms_deform_attn_forward<scalar_t>(                                                   \
      const scalar_t*, const int64_t*, const int64_t*, const at::opmath_type<scalar_t>*,                          \
      const at::opmath_type<scalar_t>*, scalar_t*, const MsdaLaunchSizes&, cudaStream_t);                         \
  template cudaError_t launch_ms_deform_attn_backward<scalar_t>(                                                  \
      const scalar_t*, const scalar_t*, const int64_t*, const int64_t*, const at::opmath_type<scalar_t>*,         \
      const at::opmath_type<scalar_t>*, at::opmath_type<scalar_t>*, at::opmath_type<scalar_t>*,                   \
      at::opmath_type<scalar_t>*, const MsdaLaunchSizes&, cudaStream_t);

MSDA_INSTANTIATE(double)
MSDA_INSTANTIATE(float)
MSDA_INSTANTIATE(c10::Half)
MSDA_INSTANTIATE(c10::BFloat16)

#undef MSDA_INSTANTIATE

}  // namespace sparse_detr

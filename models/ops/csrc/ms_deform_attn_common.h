// Shared pieces of the multi-scale deformable attention kernels (CPU and CUDA).
//
// The per-sample bilinear maths lives here as host/device functions so that the CPU kernel (which
// the tests check against grid_sample and gradcheck) and the CUDA kernel run the very same code.
//
// Sampling follows grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False):
// a normalised location (x, y) in [0, 1] maps to pixel coordinates (x * W - 0.5, y * H - 0.5),
// pixel centres sit at integers, and every corner outside the map reads as zero. Gradients w.r.t.
// the location are the derivative of that piecewise-bilinear function (corners outside the map
// contribute zero), which is what grid_sample's backward computes.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MSDA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MSDA_HOST_DEVICE inline
#endif

namespace sparse_detr {

MSDA_HOST_DEVICE float msda_floor(float v) { return floorf(v); }
MSDA_HOST_DEVICE double msda_floor(double v) { return floor(v); }

// The four corners of one bilinear sample, in the order (x0, y0), (x0 + 1, y0), (x0, y0 + 1),
// (x0 + 1, y0 + 1). `offset` is the pixel index y * W + x inside the level and is meaningful only
// where `valid` is set. `dwdx` / `dwdy` are the derivatives of `weight` w.r.t. the pixel
// coordinates (multiply by W / H for the derivative w.r.t. the normalised location).
template <typename T>
struct Bilinear {
  int64_t offset[4];
  T weight[4];
  T dwdx[4];
  T dwdy[4];
  bool valid[4];
};

// Fills `b` for the normalised location (loc_x, loc_y) on a height x width map. Returns false when
// no corner can be inside the map or have a non-zero derivative (the sample contributes nothing,
// and has zero gradient); NaN locations also return false. `b` is fully written either way.
template <typename T>
MSDA_HOST_DEVICE bool bilinear_corners(T loc_x, T loc_y, int64_t height, int64_t width, Bilinear<T>& b) {
  const T px = loc_x * static_cast<T>(width) - static_cast<T>(0.5);
  const T py = loc_y * static_cast<T>(height) - static_cast<T>(0.5);
  // px == -1 is kept: the corner at x = 0 then has weight 0 but a non-zero derivative, exactly as
  // in grid_sample (floor(-1) = -1). NaN fails every comparison and lands outside.
  const bool inside = px >= static_cast<T>(-1) && py >= static_cast<T>(-1) &&
                      px < static_cast<T>(width) && py < static_cast<T>(height);
  if (!inside) {
    for (int c = 0; c < 4; ++c) {
      b.offset[c] = 0;
      b.weight[c] = b.dwdx[c] = b.dwdy[c] = static_cast<T>(0);
      b.valid[c] = false;
    }
    return false;
  }
  // px in [-1, W) so x0 in [-1, W - 1]; same for y.
  const T x0f = msda_floor(px);
  const T y0f = msda_floor(py);
  const int64_t x0 = static_cast<int64_t>(x0f);
  const int64_t y0 = static_cast<int64_t>(y0f);
  const T fx = px - x0f;
  const T fy = py - y0f;
  const T gx = static_cast<T>(1) - fx;
  const T gy = static_cast<T>(1) - fy;

  b.weight[0] = gx * gy;
  b.weight[1] = fx * gy;
  b.weight[2] = gx * fy;
  b.weight[3] = fx * fy;
  b.dwdx[0] = -gy;
  b.dwdx[1] = gy;
  b.dwdx[2] = -fy;
  b.dwdx[3] = fy;
  b.dwdy[0] = -gx;
  b.dwdy[1] = -fx;
  b.dwdy[2] = gx;
  b.dwdy[3] = fx;

  const bool left_in = x0 >= 0;
  const bool right_in = x0 + 1 < width;
  const bool top_in = y0 >= 0;
  const bool bottom_in = y0 + 1 < height;
  b.valid[0] = left_in && top_in;
  b.valid[1] = right_in && top_in;
  b.valid[2] = left_in && bottom_in;
  b.valid[3] = right_in && bottom_in;
  const int64_t base = y0 * width + x0;
  b.offset[0] = base;
  b.offset[1] = base + 1;
  b.offset[2] = base + width;
  b.offset[3] = base + width + 1;
  return true;
}

}  // namespace sparse_detr

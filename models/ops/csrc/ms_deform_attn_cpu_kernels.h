// CPU kernel bodies of sparse_detr::ms_deform_attn. No include guard on purpose:
// ms_deform_attn_cpu.cpp includes this file twice, inside namespaces compiled for different
// instruction sets (baseline x86-64 / aarch64, and AVX2+FMA picked at run time), so it must only
// be included from there, inside a namespace.
//
// kD is the number of channels per head when known at compile time (D = 32 is the usual
// 256 / 8 heads), 0 for any D: with kD fixed the per-query accumulator lives in registers.

// Prefetch the cache lines of one pixel's channels (at most 4 lines: the rest streams in anyway).
template <typename scalar_t>
inline void prefetch_channels(const scalar_t* v, int64_t channels) {
#if defined(__GNUC__) || defined(__clang__)
  const char* bytes = reinterpret_cast<const char*>(v);
  const int64_t size = std::min<int64_t>(channels * static_cast<int64_t>(sizeof(scalar_t)), 256);
  for (int64_t offset = 0; offset < size; offset += 64) __builtin_prefetch(bytes + offset);
#endif
}

// acc[d] += w * v[d]
template <int kD, typename scalar_t, typename acc_t>
inline void axpy(acc_t* __restrict__ acc, const scalar_t* __restrict__ v, acc_t w, int64_t n) {
  if constexpr (kD > 0) n = kD;
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) acc[d] += w * static_cast<acc_t>(v[d]);
}

// acc[d] += sum_c w_c * v_c[d] over four corners that are all inside the map.
template <int kD, typename scalar_t, typename acc_t>
inline void axpy4(acc_t* __restrict__ acc, const scalar_t* __restrict__ v0, const scalar_t* __restrict__ v1,
                  const scalar_t* __restrict__ v2, const scalar_t* __restrict__ v3, acc_t w0, acc_t w1, acc_t w2,
                  acc_t w3, int64_t n) {
  if constexpr (kD > 0) n = kD;
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) {
    acc[d] += w0 * static_cast<acc_t>(v0[d]) + w1 * static_cast<acc_t>(v1[d]) + w2 * static_cast<acc_t>(v2[d]) +
              w3 * static_cast<acc_t>(v3[d]);
  }
}

// Returns sum_d g[d] * v[d] and does gv[d] += w * g[d].
template <int kD, typename scalar_t, typename acc_t>
inline acc_t dot_and_scatter(const acc_t* __restrict__ g, const scalar_t* __restrict__ v, acc_t* __restrict__ gv,
                             acc_t w, int64_t n) {
  if constexpr (kD > 0) n = kD;
  acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t d = 0; d < n; ++d) {
    dot += g[d] * static_cast<acc_t>(v[d]);
    gv[d] += w * g[d];
  }
  return dot;
}

template <typename scalar_t, int kD>
void forward_impl(const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                  const at::opmath_type<scalar_t>* locations, const at::opmath_type<scalar_t>* weights,
                  scalar_t* output, const MsdaSizes& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t heads = s.heads, queries = s.queries;
  const int64_t channels = kD > 0 ? kD : s.channels;
  const int64_t samples = s.levels * s.points;
  const int64_t pixel_stride = heads * channels;
  const int64_t batch_stride = s.tokens * pixel_stride;
  const int64_t groups = s.batch * queries * heads;
  // One (batch, query, head) triple costs about samples * 4 * channels multiply-adds.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, samples * 4 * channels));

  // Work items run in (batch, head, query) order: a thread then works on one head's slice of value
  // (S * D elements) at a time, which keeps more of the gathered corners in cache than the
  // (batch, query, head) order of the output.
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc_dynamic(kD > 0 ? 0 : channels);
    acc_t acc_fixed[kD > 0 ? kD : 1];
    acc_t* acc = kD > 0 ? acc_fixed : acc_dynamic.data();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t q = item % queries;
      const int64_t h = (item / queries) % heads;
      const int64_t b = item / (queries * heads);
      const int64_t g = (b * queries + q) * heads + h;
      for (int64_t d = 0; d < channels; ++d) acc[d] = acc_t(0);
      const scalar_t* value_bh = value + b * batch_stride + h * channels;
      const acc_t* loc = locations + g * samples * 2;
      const acc_t* attn = weights + g * samples;
      for (int64_t l = 0; l < s.levels; ++l) {
        const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
        const scalar_t* level = value_bh + starts[l] * pixel_stride;
        for (int64_t p = 0; p < s.points; ++p) {
          const int64_t i = l * s.points + p;
          Bilinear<acc_t> bl;
          if (!bilinear_corners(loc[2 * i], loc[2 * i + 1], height, width, bl)) continue;
          const acc_t a = attn[i];
          if (bl.valid[0] && bl.valid[1] && bl.valid[2] && bl.valid[3]) {
            axpy4<kD>(acc, level + bl.offset[0] * pixel_stride, level + bl.offset[1] * pixel_stride,
                      level + bl.offset[2] * pixel_stride, level + bl.offset[3] * pixel_stride, a * bl.weight[0],
                      a * bl.weight[1], a * bl.weight[2], a * bl.weight[3], channels);
          } else {
            for (int c = 0; c < 4; ++c) {
              if (bl.valid[c]) axpy<kD>(acc, level + bl.offset[c] * pixel_stride, a * bl.weight[c], channels);
            }
          }
        }
      }
      scalar_t* out = output + g * channels;
      for (int64_t d = 0; d < channels; ++d) out[d] = static_cast<scalar_t>(acc[d]);
    }
  });
}

// grad_value_chunks: `chunks` zero-filled [B, S, H, D] buffers in the accumulation type. Queries are
// split into `chunks` ranges; work item (b, h, chunk) owns the (b, h) slice of buffer `chunk`, so no
// two threads ever write the same grad_value element. The caller sums the buffers.
template <typename scalar_t, int kD>
void backward_impl(const scalar_t* grad_output, const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                   const at::opmath_type<scalar_t>* locations, const at::opmath_type<scalar_t>* weights,
                   at::opmath_type<scalar_t>* grad_value_chunks, int64_t chunks,
                   at::opmath_type<scalar_t>* grad_locations, at::opmath_type<scalar_t>* grad_weights,
                   const MsdaSizes& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t heads = s.heads, queries = s.queries;
  const int64_t channels = kD > 0 ? kD : s.channels;
  const int64_t samples = s.levels * s.points;
  const int64_t pixel_stride = heads * channels;
  const int64_t batch_stride = s.tokens * pixel_stride;
  const int64_t buffer_size = s.batch * batch_stride;

  at::parallel_for(0, s.batch * heads * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> go_dynamic(kD > 0 ? 0 : channels);
    acc_t go_fixed[kD > 0 ? kD : 1];
    acc_t* go = kD > 0 ? go_fixed : go_dynamic.data();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t chunk = item % chunks;
      const int64_t bh = item / chunks;
      const int64_t h = bh % heads;
      const int64_t b = bh / heads;
      const int64_t q_begin = queries * chunk / chunks;
      const int64_t q_end = queries * (chunk + 1) / chunks;
      const scalar_t* value_bh = value + b * batch_stride + h * channels;
      acc_t* grad_value_bh = grad_value_chunks + chunk * buffer_size + b * batch_stride + h * channels;
      for (int64_t q = q_begin; q < q_end; ++q) {
        const int64_t g = (b * queries + q) * heads + h;
        const scalar_t* gout = grad_output + g * channels;
        for (int64_t d = 0; d < channels; ++d) go[d] = static_cast<acc_t>(gout[d]);
        const acc_t* loc = locations + g * samples * 2;
        const acc_t* attn = weights + g * samples;
        acc_t* grad_loc = grad_locations + g * samples * 2;
        acc_t* grad_attn = grad_weights + g * samples;
        for (int64_t l = 0; l < s.levels; ++l) {
          const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
          const int64_t level_offset = starts[l] * pixel_stride;
          for (int64_t p = 0; p < s.points; ++p) {
            const int64_t i = l * s.points + p;
            Bilinear<acc_t> bl;
            if (!bilinear_corners(loc[2 * i], loc[2 * i + 1], height, width, bl)) continue;
            const acc_t a = attn[i];
            acc_t ga = 0, gx = 0, gy = 0;
            for (int c = 0; c < 4; ++c) {
              if (!bl.valid[c]) continue;
              const int64_t offset = level_offset + bl.offset[c] * pixel_stride;
              // dot = <grad_out, v_c>, the derivative of the loss w.r.t. this corner's weight * a.
              const acc_t dot = dot_and_scatter<kD>(go, value_bh + offset, grad_value_bh + offset,
                                                    a * bl.weight[c], channels);
              ga += bl.weight[c] * dot;
              gx += bl.dwdx[c] * dot;
              gy += bl.dwdy[c] * dot;
            }
            grad_attn[i] = ga;
            grad_loc[2 * i] = a * gx * static_cast<acc_t>(width);
            grad_loc[2 * i + 1] = a * gy * static_cast<acc_t>(height);
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void forward_kernel(const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                    const at::opmath_type<scalar_t>* locations, const at::opmath_type<scalar_t>* weights,
                    scalar_t* output, const MsdaSizes& s) {
  if (s.channels == 32) {
    forward_impl<scalar_t, 32>(value, shapes, starts, locations, weights, output, s);
  } else {
    forward_impl<scalar_t, 0>(value, shapes, starts, locations, weights, output, s);
  }
}

template <typename scalar_t>
void backward_kernel(const scalar_t* grad_output, const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                     const at::opmath_type<scalar_t>* locations, const at::opmath_type<scalar_t>* weights,
                     at::opmath_type<scalar_t>* grad_value_chunks, int64_t chunks,
                     at::opmath_type<scalar_t>* grad_locations, at::opmath_type<scalar_t>* grad_weights,
                     const MsdaSizes& s) {
  if (s.channels == 32) {
    backward_impl<scalar_t, 32>(grad_output, value, shapes, starts, locations, weights, grad_value_chunks, chunks,
                                grad_locations, grad_weights, s);
  } else {
    backward_impl<scalar_t, 0>(grad_output, value, shapes, starts, locations, weights, grad_value_chunks, chunks,
                               grad_locations, grad_weights, s);
  }
}

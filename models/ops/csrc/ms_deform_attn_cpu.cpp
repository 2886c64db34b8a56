// CPU kernels of sparse_detr::ms_deform_attn (forward and backward), registered for the CPU
// dispatch key. Parallelised with at::parallel_for (OpenMP in the standard PyTorch builds).
//
// dtypes: float64, float32, bfloat16 and float16 values; locations and weights are used in the
// accumulation type (float64 for float64 values, float32 otherwise), sums are accumulated in it
// too, and only the output (and grad_value) are rounded to the value dtype.
#include <algorithm>
#include <utility>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "ms_deform_attn_common.h"
#include "ms_deform_attn_host.h"

namespace sparse_detr {
namespace {

// Baseline build (whatever the compiler targets by default: SSE2 on x86-64, NEON on aarch64).
namespace isa_default {
#include "ms_deform_attn_cpu_kernels.h"
}  // namespace isa_default

// The same kernels with AVX2 + FMA on x86-64, chosen at run time when the CPU has them. (PyTorch's
// own CPU kernels do the same kind of dispatch; a plain -mavx2 build would crash on older CPUs.)
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MSDA_HAVE_AVX2_KERNELS 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
#include "ms_deform_attn_cpu_kernels.h"
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

bool use_avx2() {
#ifdef MSDA_HAVE_AVX2_KERNELS
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
#else
  return false;
#endif
}

template <typename scalar_t, typename... Args>
void forward_kernel(Args&&... args) {
#ifdef MSDA_HAVE_AVX2_KERNELS
  if (use_avx2()) return isa_avx2::forward_kernel<scalar_t>(std::forward<Args>(args)...);
#endif
  isa_default::forward_kernel<scalar_t>(std::forward<Args>(args)...);
}

template <typename scalar_t, typename... Args>
void backward_kernel(Args&&... args) {
#ifdef MSDA_HAVE_AVX2_KERNELS
  if (use_avx2()) return isa_avx2::backward_kernel<scalar_t>(std::forward<Args>(args)...);
#endif
  isa_default::backward_kernel<scalar_t>(std::forward<Args>(args)...);
}

struct Prepared {
  at::Tensor value, shapes, starts, locations, weights;
};

Prepared prepare(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                 const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const MsdaSizes& s) {
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_attn CPU kernel got a tensor on ", value.device());
  const auto acc_type = msda_acc_type(value.scalar_type());
  Prepared p;
  p.value = value.contiguous();
  p.shapes = spatial_shapes.to(at::kCPU, at::kLong).contiguous();
  p.starts = level_start_index.to(at::kCPU, at::kLong).contiguous();
  p.locations = sampling_locations.to(acc_type).contiguous();
  p.weights = attention_weights.to(acc_type).contiguous();
  // Every level must lie inside value: a wrong shape would otherwise read out of bounds.
  const int64_t* shapes = p.shapes.const_data_ptr<int64_t>();
  const int64_t* starts = p.starts.const_data_ptr<int64_t>();
  for (int64_t l = 0; l < s.levels; ++l) {
    TORCH_CHECK(shapes[2 * l] >= 0 && shapes[2 * l + 1] >= 0 && starts[l] >= 0 &&
                    starts[l] + shapes[2 * l] * shapes[2 * l + 1] <= s.tokens,
                "ms_deform_attn: level ", l, " (", shapes[2 * l], " x ", shapes[2 * l + 1], " starting at ", starts[l],
                ") does not fit in value with ", s.tokens, " tokens");
  }
  return p;
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const MsdaSizes s =
      msda_check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const Prepared p = prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, s);
  at::Tensor output = at::empty({s.batch, s.queries, s.heads * s.channels}, p.value.options());
  if (output.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t>(p.value.const_data_ptr<scalar_t>(), p.shapes.const_data_ptr<int64_t>(),
                             p.starts.const_data_ptr<int64_t>(), p.locations.const_data_ptr<acc_t>(),
                             p.weights.const_data_ptr<acc_t>(), output.mutable_data_ptr<scalar_t>(), s);
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const MsdaSizes s =
      msda_check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  msda_check_grad_output(grad_output, s, value);
  const Prepared p = prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, s);
  const auto acc_options = p.locations.options();
  at::Tensor grad_locations = at::zeros(p.locations.sizes(), acc_options);
  at::Tensor grad_weights = at::zeros(p.weights.sizes(), acc_options);

  // Split the queries of each (batch, head) pair into enough chunks to keep every thread busy;
  // each extra chunk costs one more grad_value-sized buffer.
  const int64_t pairs = std::max<int64_t>(1, s.batch * s.heads);
  const int64_t threads = at::get_num_threads();
  int64_t chunks = 1;
  if (pairs < 4 * threads) chunks = std::min<int64_t>({(4 * threads + pairs - 1) / pairs, int64_t(8)});
  chunks = std::max<int64_t>(1, std::min<int64_t>(chunks, s.queries));
  at::Tensor grad_value_chunks =
      at::zeros({chunks, s.batch, s.tokens, s.heads, s.channels}, acc_options);

  if (grad_output.numel() > 0 && p.value.numel() > 0) {
    const at::Tensor grad_out = grad_output.to(p.value.scalar_type()).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, p.value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          backward_kernel<scalar_t>(grad_out.const_data_ptr<scalar_t>(), p.value.const_data_ptr<scalar_t>(),
                                    p.shapes.const_data_ptr<int64_t>(), p.starts.const_data_ptr<int64_t>(),
                                    p.locations.const_data_ptr<acc_t>(), p.weights.const_data_ptr<acc_t>(),
                                    grad_value_chunks.mutable_data_ptr<acc_t>(), chunks,
                                    grad_locations.mutable_data_ptr<acc_t>(), grad_weights.mutable_data_ptr<acc_t>(),
                                    s);
        });
  }
  at::Tensor grad_value = chunks == 1 ? grad_value_chunks.select(0, 0) : grad_value_chunks.sum(0);
  return std::make_tuple(grad_value.to(value.scalar_type()), grad_locations.to(sampling_locations.scalar_type()),
                         grad_weights.to(attention_weights.scalar_type()));
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_detr, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace sparse_detr

// TEST-ONLY: the CUDA kernels of ms_deform_attn_cuda_kernels.cu compiled as C++ with
// cuda_host_emulation.h and exposed on CPU tensors as sparse_detr_cuda_emulation::forward /
// ::backward (same arguments and results as sparse_detr::ms_deform_attn{,_backward}). The host code
// mirrors ms_deform_attn_cuda.cpp. Built and used by tests/test_ms_deform_attn_kernels.py only.
#include <tuple>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../ms_deform_attn_host.h"

#ifndef MSDA_CUDA_HOST_EMULATION
#define MSDA_CUDA_HOST_EMULATION 1
#endif
#include "../ms_deform_attn_cuda_kernels.cu"

namespace sparse_detr {
namespace {

struct Prepared {
  at::Tensor value, shapes, starts, locations, weights;
  MsdaLaunchSizes launch;
};

Prepared prepare(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                 const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const MsdaSizes& s) {
  const auto acc_type = msda_acc_type(value.scalar_type());
  Prepared p;
  p.value = value.contiguous();
  p.shapes = spatial_shapes.to(at::kLong).contiguous();
  p.starts = level_start_index.to(at::kLong).contiguous();
  p.locations = sampling_locations.to(acc_type).contiguous();
  p.weights = attention_weights.to(acc_type).contiguous();
  p.launch = {s.batch * s.queries * s.heads, s.tokens, s.queries, static_cast<int>(s.heads),
              static_cast<int>(s.channels), static_cast<int>(s.levels), static_cast<int>(s.points)};
  return p;
}

at::Tensor emulated_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights) {
  const MsdaSizes s =
      msda_check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const Prepared p = prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, s);
  at::Tensor output = at::empty({s.batch, s.queries, s.heads * s.channels}, p.value.options());
  if (output.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.value.scalar_type(), "emulated_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_ms_deform_attn_forward<scalar_t>(p.value.const_data_ptr<scalar_t>(), p.shapes.const_data_ptr<int64_t>(),
                                            p.starts.const_data_ptr<int64_t>(), p.locations.const_data_ptr<acc_t>(),
                                            p.weights.const_data_ptr<acc_t>(), output.mutable_data_ptr<scalar_t>(),
                                            p.launch, nullptr);
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emulated_backward(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const MsdaSizes s =
      msda_check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  msda_check_grad_output(grad_output, s, value);
  const Prepared p = prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, s);
  const auto acc_options = p.locations.options();
  at::Tensor grad_value = at::zeros(p.value.sizes(), acc_options);
  at::Tensor grad_locations = at::zeros(p.locations.sizes(), acc_options);
  at::Tensor grad_weights = at::zeros(p.weights.sizes(), acc_options);
  if (p.launch.groups > 0 && s.channels > 0 && p.value.numel() > 0) {
    const at::Tensor grad_out = grad_output.to(p.value.scalar_type()).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.value.scalar_type(), "emulated_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      launch_ms_deform_attn_backward<scalar_t>(
          grad_out.const_data_ptr<scalar_t>(), p.value.const_data_ptr<scalar_t>(), p.shapes.const_data_ptr<int64_t>(),
          p.starts.const_data_ptr<int64_t>(), p.locations.const_data_ptr<acc_t>(), p.weights.const_data_ptr<acc_t>(),
          grad_value.mutable_data_ptr<acc_t>(), grad_locations.mutable_data_ptr<acc_t>(),
          grad_weights.mutable_data_ptr<acc_t>(), p.launch, nullptr);
    });
  }
  return std::make_tuple(grad_value.to(value.scalar_type()), grad_locations.to(sampling_locations.scalar_type()),
                         grad_weights.to(attention_weights.scalar_type()));
}

}  // namespace
}  // namespace sparse_detr

TORCH_LIBRARY(sparse_detr_cuda_emulation, m) {
  m.def("forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, "
        "Tensor attention_weights) -> Tensor");
  m.def("backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
        "Tensor sampling_locations, Tensor attention_weights) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparse_detr_cuda_emulation, CPU, m) {
  m.impl("forward", &sparse_detr::emulated_forward);
  m.impl("backward", &sparse_detr::emulated_backward);
}

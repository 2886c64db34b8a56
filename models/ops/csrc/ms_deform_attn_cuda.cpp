// Host side of the CUDA implementation of sparse_detr::ms_deform_attn: argument checks,
// allocation, dtype dispatch and registration for the CUDA dispatch key. The kernels are in
// ms_deform_attn_cuda_kernels.cu.
//
// The tests compile this very file on machines without a GPU too (tests/cuda_emulation: stand-ins for
// the CUDA runtime and c10/cuda headers come first on the include path, the kernels run as host
// threads); they set the two names below to run it on CPU tensors under a library of their own.
#include <cstdint>
#include <limits>
#include <tuple>

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ms_deform_attn_cuda.h"
#include "ms_deform_attn_host.h"

// The tensors' device: a c10::DeviceType that is also the c10::DispatchKey registered for.
#ifndef MSDA_CUDA_DEVICE
#define MSDA_CUDA_DEVICE CUDA
#endif
// The operator library (namespace) the kernels are registered into.
#ifndef MSDA_CUDA_LIBRARY
#define MSDA_CUDA_LIBRARY sparse_detr
#endif

namespace sparse_detr {
namespace {

struct Prepared {
  at::Tensor value, shapes, starts, locations, weights;
  MsdaLaunchSizes launch;
};

Prepared prepare(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                 const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const MsdaSizes& s) {
  TORCH_CHECK(value.device().type() == c10::DeviceType::MSDA_CUDA_DEVICE, "ms_deform_attn CUDA kernel got a tensor on ",
              value.device());
  constexpr int64_t int_max = std::numeric_limits<int>::max();
  TORCH_CHECK(s.heads * s.channels <= int_max && s.levels * s.points <= int_max,
              "ms_deform_attn: heads * channels or levels * points too large");
  const int64_t groups = s.batch * s.queries * s.heads;
  TORCH_CHECK((groups * 32 + kMsdaBlockThreads - 1) / kMsdaBlockThreads <= kMsdaMaxBlocks,
              "ms_deform_attn: too many (batch, query, head) triples for one launch");
  const auto acc_type = msda_acc_type(value.scalar_type());
  Prepared p;
  p.value = value.contiguous();
  // The level table is read by the kernels, so it must live on the value's device. Unlike the CPU
  // kernel, this one does not check that every level fits inside value (that would synchronise).
  p.shapes = spatial_shapes.to(value.device(), at::kLong).contiguous();
  p.starts = level_start_index.to(value.device(), at::kLong).contiguous();
  p.locations = sampling_locations.to(acc_type).contiguous();
  p.weights = attention_weights.to(acc_type).contiguous();
  p.launch.groups = groups;
  p.launch.tokens = s.tokens;
  p.launch.queries = s.queries;
  p.launch.heads = static_cast<int>(s.heads);
  p.launch.channels = static_cast<int>(s.channels);
  p.launch.levels = static_cast<int>(s.levels);
  p.launch.points = static_cast<int>(s.points);
  return p;
}

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  const MsdaSizes s =
      msda_check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard device_guard(value.device());
  const Prepared p = prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, s);
  at::Tensor output = at::empty({s.batch, s.queries, s.heads * s.channels}, p.value.options());
  if (output.numel() == 0) return output;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    C10_CUDA_CHECK(launch_ms_deform_attn_forward<scalar_t>(
        p.value.const_data_ptr<scalar_t>(), p.shapes.const_data_ptr<int64_t>(), p.starts.const_data_ptr<int64_t>(),
        p.locations.const_data_ptr<acc_t>(), p.weights.const_data_ptr<acc_t>(), output.mutable_data_ptr<scalar_t>(),
        p.launch, stream));
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const MsdaSizes s =
      msda_check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  msda_check_grad_output(grad_output, s, value);
  // grad_value is accumulated with atomicAdd: the summation order varies from run to run.
  at::globalContext().alertNotDeterministic("ms_deform_attn_backward_cuda");
  const c10::cuda::CUDAGuard device_guard(value.device());
  const Prepared p = prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, s);
  const auto acc_options = p.locations.options();
  at::Tensor grad_value = at::zeros(p.value.sizes(), acc_options);
  at::Tensor grad_locations = at::zeros(p.locations.sizes(), acc_options);
  at::Tensor grad_weights = at::zeros(p.weights.sizes(), acc_options);
  if (p.launch.groups > 0 && s.channels > 0 && p.value.numel() > 0) {
    const at::Tensor grad_out = grad_output.to(p.value.scalar_type()).contiguous();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, p.value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          C10_CUDA_CHECK(launch_ms_deform_attn_backward<scalar_t>(
              grad_out.const_data_ptr<scalar_t>(), p.value.const_data_ptr<scalar_t>(),
              p.shapes.const_data_ptr<int64_t>(), p.starts.const_data_ptr<int64_t>(),
              p.locations.const_data_ptr<acc_t>(), p.weights.const_data_ptr<acc_t>(),
              grad_value.mutable_data_ptr<acc_t>(), grad_locations.mutable_data_ptr<acc_t>(),
              grad_weights.mutable_data_ptr<acc_t>(), p.launch, stream));
        });
  }
  return std::make_tuple(grad_value.to(value.scalar_type()), grad_locations.to(sampling_locations.scalar_type()),
                         grad_weights.to(attention_weights.scalar_type()));
}

}  // namespace

TORCH_LIBRARY_IMPL(MSDA_CUDA_LIBRARY, MSDA_CUDA_DEVICE, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace sparse_detr

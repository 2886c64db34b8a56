// Host-side argument checks shared by the CPU and CUDA entry points of sparse_detr::ms_deform_attn.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

namespace sparse_detr {

// Problem sizes: value [B, S, H, D], locations [B, Q, H, L, P, 2], weights [B, Q, H, L, P].
struct MsdaSizes {
  int64_t batch, tokens, heads, channels, queries, levels, points;
};

// Locations and weights are consumed in the accumulation type: float64 for float64 values, float32
// otherwise (half / bfloat16 / float32 values). Callers may pass them in any floating dtype.
inline at::ScalarType msda_acc_type(at::ScalarType value_type) {
  return value_type == at::kDouble ? at::kDouble : at::kFloat;
}

inline MsdaSizes msda_check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                   const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                   const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be [B, S, H, D], got ", value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be [B, Q, H, L, P, 2], got ", sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5,
              "ms_deform_attn: attention_weights must be [B, Q, H, L, P], got ", attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be [L, 2], got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == spatial_shapes.size(0),
              "ms_deform_attn: level_start_index must be [L], got ", level_start_index.sizes());
  TORCH_CHECK(at::isFloatingType(value.scalar_type()) && at::isFloatingType(sampling_locations.scalar_type()) &&
                  at::isFloatingType(attention_weights.scalar_type()),
              "ms_deform_attn: value, sampling_locations and attention_weights must be floating point");
  TORCH_CHECK(!at::isFloatingType(spatial_shapes.scalar_type()) &&
                  !at::isFloatingType(level_start_index.scalar_type()),
              "ms_deform_attn: spatial_shapes and level_start_index must be integer tensors");
  TORCH_CHECK(sampling_locations.device() == value.device() && attention_weights.device() == value.device(),
              "ms_deform_attn: value, sampling_locations and attention_weights must be on the same device");
  MsdaSizes s;
  s.batch = value.size(0);
  s.tokens = value.size(1);
  s.heads = value.size(2);
  s.channels = value.size(3);
  s.queries = sampling_locations.size(1);
  s.levels = sampling_locations.size(3);
  s.points = sampling_locations.size(4);
  TORCH_CHECK(sampling_locations.size(0) == s.batch && sampling_locations.size(2) == s.heads,
              "ms_deform_attn: sampling_locations ", sampling_locations.sizes(), " does not match value ",
              value.sizes());
  TORCH_CHECK(spatial_shapes.size(0) == s.levels, "ms_deform_attn: ", spatial_shapes.size(0),
              " spatial shapes but sampling_locations has ", s.levels, " levels");
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "ms_deform_attn: attention_weights ", attention_weights.sizes(), " does not match sampling_locations ",
              sampling_locations.sizes());
  return s;
}

inline void msda_check_grad_output(const at::Tensor& grad_output, const MsdaSizes& s, const at::Tensor& value) {
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == s.batch && grad_output.size(1) == s.queries &&
                  grad_output.size(2) == s.heads * s.channels,
              "ms_deform_attn_backward: grad_output must be [B, Q, H * D], got ", grad_output.sizes());
  TORCH_CHECK(grad_output.device() == value.device(), "ms_deform_attn_backward: grad_output on the wrong device");
}

}  // namespace sparse_detr

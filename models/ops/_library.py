"""``torch.library`` registration of the compiled multi-scale deformable attention operator.

Defined here (at import, which compiles nothing):

* ``sparse_detr::ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
  attention_weights) -> output`` with a fake (meta) implementation, so torch.compile can trace it,
  and an autograd formula;
* ``sparse_detr::ms_deform_attn_backward(grad_output, value, spatial_shapes, level_start_index,
  sampling_locations, attention_weights) -> (grad_value, grad_locations, grad_weights)`` with a fake
  implementation (AOTAutograd traces the backward graph through it). No double backward.

The CPU and CUDA kernels themselves are registered by the C++ extensions when
``_extension.load`` builds/loads them (``TORCH_LIBRARY_IMPL(sparse_detr, CPU/CUDA, m)``); call the
op through ``ms_deform_attn`` (which loads them first), not directly. If the registration fails (e.g. a
torch too old for ``register_fake``), :func:`registration_error` says why and no kernel is built.

dtypes and autocast: the op runs in the dtype of ``value`` (float64, float32, float16, bfloat16)
and returns that dtype. ``sampling_locations`` and ``attention_weights`` may come in any floating
dtype: the kernels convert them to the accumulation type (float32; float64 for float64 values),
accumulate in it, and return their gradients in the dtype they came in. The op has no autocast
rule, so under autocast nothing is cast: with an autocast Linear producing a bfloat16/float16
``value``, the op samples in that dtype while locations (which need the precision: a bfloat16
location on a 152-pixel-wide map is off by up to half a pixel) and weights stay float32.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_LIB = None  # keeps the registrations alive
_ERROR: Optional[str] = None  # why the registration failed, if it did

_FORWARD_SCHEMA = ("ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
                   "Tensor sampling_locations, Tensor attention_weights) -> Tensor")
_BACKWARD_SCHEMA = ("ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
                    "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
                    "-> (Tensor, Tensor, Tensor)")


def _fake_forward(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                  attention_weights: Tensor) -> Tensor:
    torch._check(value.dim() == 4 and sampling_locations.dim() == 6 and attention_weights.dim() == 5,
                 lambda: "ms_deform_attn: expected value [B,S,H,D], locations [B,Q,H,L,P,2], weights [B,Q,H,L,P]")
    batch, _, heads, channels = value.shape
    return value.new_empty((batch, sampling_locations.shape[1], heads * channels))


def _fake_backward(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                   sampling_locations: Tensor, attention_weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # The kernels return contiguous tensors in the dtypes of the corresponding inputs.
    return (value.new_empty(value.shape), sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output: Tensor):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = torch.ops.sparse_detr.ms_deform_attn_backward(
        grad_output.contiguous(), value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return grad_value, None, None, grad_locations, grad_weights


def _already_defined() -> bool:
    try:
        torch.ops.sparse_detr.ms_deform_attn.default  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def _register() -> None:
    global _LIB
    if _already_defined():  # e.g. this module imported twice under different names
        return
    lib = torch.library.Library("sparse_detr", "FRAGMENT")
    lib.define(_FORWARD_SCHEMA)
    lib.define(_BACKWARD_SCHEMA)
    torch.library.register_fake("sparse_detr::ms_deform_attn", _fake_forward, lib=lib)
    torch.library.register_fake("sparse_detr::ms_deform_attn_backward", _fake_backward, lib=lib)
    torch.library.register_autograd("sparse_detr::ms_deform_attn", _backward, setup_context=_setup_context, lib=lib)
    _LIB = lib


def registration_error() -> Optional[str]:
    """Why the operator could not be registered at import (the kernels then cannot be used), or None."""
    return _ERROR


try:
    _register()
except Exception as error:  # noqa: BLE001 - e.g. a torch too old for register_fake/register_autograd
    _ERROR = f"{type(error).__name__}: {error}"

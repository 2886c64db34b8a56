"""Multi-scale deformable attention: the function every model calls.

Shapes (B batch, S = sum_l H_l * W_l value tokens, H heads, D channels per head, Q queries,
L levels, P points per level):

    value               [B, S, H, D]
    spatial_shapes      [L, 2] int64, (H_l, W_l) per level
    level_start_index   [L] int64, offset of each level in S
    sampling_locations  [B, Q, H, L, P, 2] (x, y) in [0, 1] relative to each level's full (padded) map
    attention_weights   [B, Q, H, L, P]
    -> output           [B, Q, H * D]

``level_shapes`` (optional everywhere it is taken): the same (H_l, W_l) as Python ints, which the
pure-PyTorch paths reshape with. Without it they read ``spatial_shapes.tolist()``; exporters need it
(``torch.export`` sees symbolic sizes only in Python ints, never in a tensor's values).

A location is bilinearly sampled with ``align_corners=False`` semantics (pixel centres at
(i + 0.5) / W) and zeros outside the map. :func:`ms_deform_attn_pytorch` (``reference.py``, importable
from here) is the one pure-PyTorch reference; every other path is checked against it.
:func:`ms_deform_attn` takes one of three paths, chosen by :func:`choose_implementation` (which
``models.ops.implementation(device, dtype)`` reports):

* ``"kernel"``: the compiled kernels (the ``sparse_detr::ms_deform_attn`` operator, see ``_library.py``;
  optional, built lazily on first use, see ``_extension.py``) for CPU and CUDA tensors when they can
  be built and pass their self-check against the reference (``selfcheck.py``), unless ``MSDA_IMPL=pytorch``;
* ``"gather"``: :func:`ms_deform_attn_gather` for CUDA tensors in deterministic mode (below);
* ``"pytorch"``: the reference, otherwise, and always while exporting (``torch.onnx.export``,
  ``torch.export``): its ``grid_sample`` is the ONNX GridSample operator, which onnxruntime runs with no
  custom build.

Determinism: on the CPU both paths are deterministic for a given thread count (the kernel gives each
work item its own grad_value buffer and sums the buffers in a fixed order; how many there are depends
on the thread count). On CUDA the kernel's backward and ``grid_sample``'s accumulate
grad_value with atomicAdd, whose order varies from run to run; with
``torch.use_deterministic_algorithms(True)`` (``--deterministic``) CUDA tensors therefore take
:func:`ms_deform_attn_gather`, whose backward is torch.gather's deterministic scatter-add (slower, and
four times grid_sample's memory for the sampled values).

The kernels and the reference agree to rounding, with one dtype difference: the kernels accept locations and
weights in any floating dtype (they compute with them in float32, float64 for float64 values) and
return the dtype of ``value``; the reference needs ``grid_sample``-compatible dtypes.
"""
from __future__ import annotations

import logging
from typing import Optional, Union

import torch
from torch import Tensor

from . import _extension, selfcheck
from .reference import LevelShapes, level_shapes_of, ms_deform_attn_pytorch

# The reference lives in reference.py (below this module and selfcheck.py, which both use it); its names stay
# importable from here.
__all__ = ["LevelShapes", "implementation", "is_exporting", "level_shapes_of", "ms_deform_attn",
           "ms_deform_attn_gather", "ms_deform_attn_pytorch"]

logger = logging.getLogger(__name__)

_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_logged_gather = False  # the gather path is announced once per process


def ms_deform_attn_gather(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                          attention_weights: Tensor, level_shapes: Optional[LevelShapes] = None) -> Tensor:
    """Pure-PyTorch multi-scale deformable attention from ``torch.gather`` of the four bilinear corners: the
    same function as :func:`ms_deform_attn_pytorch`, with a backward that is deterministic on CUDA under
    ``torch.use_deterministic_algorithms(True)``."""
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, levels, points, _ = sampling_locations.shape
    shapes = level_shapes_of(spatial_shapes, level_shapes)
    samples, weights = [], []
    for level, (value_l, (h, w)) in enumerate(zip(value.split([h * w for h, w in shapes], dim=1), shapes)):
        # [B, H_l*W_l, H, D] -> [B*H, H_l*W_l, D]; locations [B, Q, H, P, 2] -> pixels [B*H, Q*P]
        value_l = value_l.transpose(1, 2).flatten(0, 1)
        xy = sampling_locations[:, :, :, level].transpose(1, 2).reshape(batch * heads, num_queries * points, 2)
        x, y = xy[..., 0] * w - 0.5, xy[..., 1] * h - 0.5  # align_corners=False: pixel centres at i + 0.5
        x0, y0 = x.floor().detach(), y.floor().detach()
        fx, fy = x - x0, y - y0
        for cx, cy, wx, wy in ((x0, y0, 1 - fx, 1 - fy), (x0 + 1, y0, fx, 1 - fy), (x0, y0 + 1, 1 - fx, fy),
                               (x0 + 1, y0 + 1, fx, fy)):
            inside = (cx >= 0) & (cx <= w - 1) & (cy >= 0) & (cy <= h - 1)  # zeros outside the map
            index = (cy.clamp(0, h - 1) * w + cx.clamp(0, w - 1)).long()
            samples.append(torch.gather(value_l, 1, index[..., None].expand(-1, -1, head_dim)))
            weights.append(wx * wy * inside)
    # Samples [B*H, L*4 corners, Q, P, D] weighted by bilinear weight x attention weight, summed over L, 4, P.
    samples = torch.stack(samples, 1).view(batch * heads, levels * 4, num_queries, points, head_dim)
    bilinear = torch.stack(weights, 1).view(batch * heads, levels, 4, num_queries, points)
    attention = attention_weights.permute(0, 2, 3, 1, 4).reshape(batch * heads, levels, 1, num_queries, points)
    total = (bilinear * attention).view(batch * heads, levels * 4, num_queries, points, 1)
    output = (samples * total).sum((1, 3))  # [B*H, Q, D]
    return output.view(batch, heads, num_queries, head_dim).transpose(1, 2).flatten(2)


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                   sampling_locations: Tensor, attention_weights: Tensor,
                   level_shapes: Optional[LevelShapes] = None) -> Tensor:
    """Multi-scale deformable attention; see the module docstring for shapes.

    ``level_start_index`` is what compiled kernels index with; the PyTorch paths derive the
    level boundaries from ``level_shapes`` (or ``spatial_shapes``).
    """
    if is_exporting():
        return ms_deform_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights, level_shapes)
    path = choose_implementation(value.device.type, value.dtype)
    if path == "gather":
        return ms_deform_attn_gather(value, spatial_shapes, sampling_locations, attention_weights, level_shapes)
    if path == "kernel":
        return torch.ops.sparse_detr.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                                                    attention_weights)
    return ms_deform_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights, level_shapes)


def is_exporting() -> bool:
    """True while ``torch.export`` / ``torch.onnx.export`` trace the model: the graph then takes the reference."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


# torch.compile evaluates this once while tracing (building/loading the kernel then) and bakes the
# answer into the graph.
@torch.compiler.assume_constant_result
def choose_implementation(device_type: str, dtype: torch.dtype) -> str:
    """``"gather"``, ``"kernel"`` or ``"pytorch"``: the path of :func:`ms_deform_attn` for ``value`` tensors of
    ``device_type`` and ``dtype``, from the deterministic-algorithms flag, ``MSDA_IMPL`` and whether the kernel
    builds (the first ask builds it). Raises RuntimeError under ``MSDA_IMPL=kernel`` when it does not."""
    if device_type == "cuda" and torch.are_deterministic_algorithms_enabled():
        _log_gather_once()
        return "gather"
    requested = _extension.requested_implementation()
    if requested == "pytorch" or dtype not in _KERNEL_DTYPES:
        return "pytorch"
    status = _extension.load(device_type, warn=requested == "auto")
    if status.loaded and selfcheck.kernel_agrees(device_type, dtype):
        return "kernel"
    if status.loaded and requested == "kernel":
        raise RuntimeError(f"{_extension.ENV_IMPL}=kernel but the compiled kernel for {device_type} {dtype} tensors "
                           "failed its self-check against the PyTorch reference (logged above)")
    if requested == "kernel":
        raise RuntimeError(f"{_extension.ENV_IMPL}=kernel but the compiled kernel for {device_type} tensors is "
                           f"unavailable ({status.state}: {status.reason}); build it with `{_extension.BUILD_COMMAND}`")
    return "pytorch"


def implementation(device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """:func:`choose_implementation` for tensors on ``device`` (``"cuda"``, ``"cpu:0"``, ...) of ``dtype``."""
    return choose_implementation(torch.device(device).type, dtype)


def _log_gather_once() -> None:
    global _logged_gather
    if not _logged_gather:
        _logged_gather = True
        logger.info("deterministic algorithms: multi-scale deformable attention on CUDA takes the torch.gather "
                    "path (the CUDA kernel and grid_sample accumulate gradients with atomicAdd)")

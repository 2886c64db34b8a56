"""The pure-PyTorch reference of multi-scale deformable attention, which every other path is checked against
(shapes: see ``ms_deform_attn_func.py``). Below both ``ms_deform_attn_func.py`` (which dispatches to it) and
``selfcheck.py`` (which compares the compiled kernels with it), so that neither imports the other for it.

A location is bilinearly sampled with ``align_corners=False`` semantics (pixel centres at (i + 0.5) / W) and
zeros outside the map: ``grid_sample``, which is also the ONNX GridSample operator.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

LevelShapes = Sequence[tuple[int, int]]


def level_shapes_of(spatial_shapes: Tensor, level_shapes: Optional[LevelShapes]) -> list[tuple[int, int]]:
    """(H_l, W_l) per level as Python ints: ``level_shapes`` when given, else read from the tensor."""
    if level_shapes is not None:
        return [(h, w) for h, w in level_shapes]
    return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]


def ms_deform_attn_pytorch(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                           attention_weights: Tensor, level_shapes: Optional[LevelShapes] = None) -> Tensor:
    """Pure-PyTorch multi-scale deformable attention (runs on any device and dtype)."""
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, levels, points, _ = sampling_locations.shape
    shapes = level_shapes_of(spatial_shapes, level_shapes)
    per_level_values = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample wants coordinates in [-1, 1].
    grids = sampling_locations * 2 - 1
    sampled = []
    for level, (h, w) in enumerate(shapes):
        # [B, H_l*W_l, H, D] -> [B*H, D, H_l, W_l]
        level_value = per_level_values[level].permute(0, 2, 3, 1).reshape(batch * heads, head_dim, h, w)
        # [B, Q, H, P, 2] -> [B*H, Q, P, 2]
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # -> [B*H, D, Q, P]
        sampled.append(F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))
    # [B*H, D, Q, L*P] weighted by [B*H, 1, Q, L*P]
    sampled = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, num_queries, levels * points)
    output = (sampled * weights).sum(-1).view(batch, heads * head_dim, num_queries)
    return output.transpose(1, 2).contiguous()

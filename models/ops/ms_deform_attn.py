"""The multi-scale deformable attention layer (projections around ``ms_deform_attn``)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ms_deform_attn_func import LevelShapes, ms_deform_attn


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR, eq. 3).

    Each query predicts, per head, ``n_points`` sampling offsets and attention weights on every one
    of ``n_levels`` feature maps around its reference point (or inside its reference box).
    """

    def __init__(self, *, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Offsets start as rings: head h points in direction 2*pi*h/n_heads, point p at distance p+1.
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        distances = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        grid = directions.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1) * distances
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query: Tensor, reference_points: Tensor, value_input: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Optional[Tensor] = None,
                level_shapes: Optional[LevelShapes] = None) -> tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            query:             [B, Q, C] queries (with position embedding added).
            reference_points:  [B, Q, L, 2] normalised (x, y) points, or [B, Q, L, 4] (cx, cy, w, h)
                               boxes, both relative to the padded map of each level.
            value_input:       [B, S, C] flattened multi-scale features.
            spatial_shapes:    [L, 2] (H_l, W_l); level_start_index: [L].
            padding_mask:      [B, S] bool, True on padding tokens (their values are zeroed).
            level_shapes:      the (H_l, W_l) of ``spatial_shapes`` as Python ints (needed to export).

        Returns:
            output [B, Q, C], sampling_locations [B, Q, heads, L, P, 2], attention_weights [B, Q, heads, L, P].
        """
        batch, num_queries, _ = query.shape
        _, num_values, _ = value_input.shape
        value = self.value_proj(value_input)
        if padding_mask is not None:
            # Times a 0/1 mask, in place: on CPU several times faster than masked_fill with a broadcast bool
            # mask; the projection's output is fresh and its backward does not read it.
            value = value.mul_((~padding_mask)[..., None].to(value.dtype))
        value = value.view(batch, num_values, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(
            batch, num_queries, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(
            batch, num_queries, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1).view(batch, num_queries, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: normalise by (W_l, H_l).
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            locations = (reference_points[:, :, None, :, None, :]
                         + offsets / normalizer[None, None, None, :, None, :])
        elif reference_points.shape[-1] == 4:
            # Offsets are relative to the box: at most half its size when |offset| <= n_points.
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {reference_points.shape[-1]}")
        output = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, level_shapes)
        return self.output_proj(output), locations, weights

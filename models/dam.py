"""Decoder attention map (DAM): where the decoder looks, splatted onto the encoder's token grid.

Sparse DETR trains its scoring network to predict the tokens with the largest DAM, and logs how
much of the DAM its kept tokens cover.
"""
from __future__ import annotations

import torch
from torch import Tensor


def attention_map_to_token_grid(spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                                attention_weights: Tensor) -> Tensor:
    """Splat every sampling point's attention weight bilinearly onto the flattened token grid.

    Args:
        spatial_shapes:     [L, 2] (H_l, W_l); level_start_index: [L].
        sampling_locations: [B, n_layers, Q, heads, L, P, 2] (x, y) in [0, 1] of each padded level map.
        attention_weights:  [B, n_layers, Q, heads, L, P].

    Returns:
        [B, S] attention mass per token, summed over layers, heads, queries and points. As the
        reference, a location x maps to grid coordinate x * W_l (not x * W_l - 0.5) and weights
        falling outside a level are dropped.
    """
    batch = sampling_locations.shape[0]
    num_tokens = int(spatial_shapes.prod(1).sum())
    # (W_l, H_l) per level, broadcast against [..., L, P, 2].
    size_xy = spatial_shapes.flip(-1).view(-1, 1, 2).to(sampling_locations.dtype)
    grid = sampling_locations * size_xy
    low = grid.floor()
    frac = grid - low
    low = low.long()
    sizes = spatial_shapes.flip(-1).view(-1, 1, 2)
    masses = torch.zeros(batch, num_tokens, dtype=attention_weights.dtype, device=attention_weights.device)
    for dx in (0, 1):
        for dy in (0, 1):
            corner = low + torch.tensor([dx, dy], device=low.device)
            # Bilinear weight of this corner: product of (frac or 1 - frac) along x and y.
            wx = frac[..., 0] if dx else 1 - frac[..., 0]
            wy = frac[..., 1] if dy else 1 - frac[..., 1]
            inside = ((corner >= 0) & (corner < sizes)).all(-1)
            index = corner[..., 1] * sizes[..., 0] + corner[..., 0] + level_start_index.view(-1, 1)
            weight = attention_weights * wx * wy * inside
            masses.scatter_add_(1, (index * inside).flatten(1), weight.flatten(1))
    return masses


def topk_token_targets(attention_map: Tensor, padding_mask: Tensor, counts: Tensor) -> Tensor:
    """Binary targets [B, S]: 1 on the ``counts[i]`` tokens of image i with the largest DAM.

    Padding tokens never count: they are pushed below every valid token first (below the minimum, with which
    a valid token could tie), and each image takes at most its number of valid tokens (rho = 1 gives counts of
    valid + 1, which would otherwise reach into the padding): every valid token, then.
    """
    attention_map = attention_map.masked_fill(padding_mask, attention_map.min() - 1)
    num_topk = min(int(counts.max()), attention_map.shape[1])
    topk_index = torch.topk(attention_map, num_topk, dim=1)[1]
    counts = torch.minimum(counts, (~padding_mask).sum(1))
    within_count = torch.arange(num_topk, device=counts.device)[None] < counts[:, None]
    return torch.zeros_like(attention_map).scatter_(1, topk_index, within_count.to(attention_map.dtype))


def dam_coverage(kept_index: Tensor, attention_map: Tensor, spatial_shapes: Tensor) -> list[Tensor]:
    """Fraction of the DAM that falls on the kept tokens: overall, then per level (each [B]).

    Args: kept_index [B, K]; attention_map [B, S]; spatial_shapes [L, 2].
    """
    kept = torch.zeros_like(attention_map).scatter_(1, kept_index, 1.0)
    hit = kept * attention_map
    coverage = [hit.sum(-1) / attention_map.sum(-1)]
    for level_hit, level_total in zip(hit.split(spatial_shapes.prod(1).tolist(), dim=1),
                                      attention_map.split(spatial_shapes.prod(1).tolist(), dim=1)):
        coverage.append(level_hit.sum(-1) / level_total.sum(-1))
    return coverage

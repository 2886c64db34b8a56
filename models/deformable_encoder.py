"""Encoder of the deformable transformer, dense (Deformable DETR) or sparse (Sparse DETR: it updates the tokens
a rule of ``models/token_selection.py`` chose).

Tokens are the L feature maps flattened and concatenated, level after level: [B, S, C] with
S = sum_l H_l * W_l. Boxes are normalised (cx, cy, w, h); "unact" boxes are their logits.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activation_checkpoint import checkpointing, run_block
from .ops import LevelShapes, MSDeformAttn, level_shapes_of


def clones(module: nn.Module, n: int) -> nn.ModuleList:
    """``n`` independent copies of ``module``."""
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """tokens [B, S, ...] gathered at index [B, K] along S -> [B, K, ...]."""
    expanded = index.view(*index.shape, *([1] * (tokens.dim() - 2))).expand(-1, -1, *tokens.shape[2:])
    return torch.gather(tokens, 1, expanded)


class DeformableTransformerEncoderLayer(nn.Module):
    """Post-norm layer: multi-scale deformable self-attention, then a feed-forward network."""

    def __init__(self, *, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model=d_model, n_levels=n_levels, n_heads=n_heads, n_points=n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, query: Tensor, query_pos: Tensor, reference_points: Tensor, value: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor, padding_mask: Tensor,
                level_shapes: Optional[LevelShapes] = None) -> tuple[Tensor, Tensor, Tensor]:
        """query [B, K, C] attends to value [B, S, C] (K = S, or the kept tokens of the sparse encoder);
        ``level_shapes``: ``spatial_shapes`` as Python ints (see ``models/ops/ms_deform_attn_func.py``).

        Returns the updated queries [B, K, C], sampling locations and attention weights.
        """
        attended, locations, weights = self.self_attn(query + query_pos, reference_points, value, spatial_shapes,
                                                      level_start_index, padding_mask, level_shapes)
        query = self.norm1(query + self.dropout1(attended))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(query))))
        query = self.norm2(query + self.dropout3(ffn))
        return query, locations, weights


class DeformableTransformerEncoder(nn.Module):
    """A stack of encoder layers; sparse when given the indices of the tokens to update.

    ``class_embed`` / ``bbox_embed``: the detector's heads for the encoder auxiliary loss (Sparse
    DETR), one per layer but the last; None without that loss. ``grad_checkpoint``: activation
    checkpointing of each layer in training (see ``models/activation_checkpoint.py``).
    """

    def __init__(self, *, layer: DeformableTransformerEncoderLayer, num_layers: int,
                 class_embed: Optional[nn.ModuleList] = None, bbox_embed: Optional[nn.ModuleList] = None,
                 grad_checkpoint: bool = False):
        super().__init__()
        self.layers = clones(layer, num_layers)
        self.num_layers = num_layers
        self.grad_checkpoint = grad_checkpoint
        # Registered after the layers: the reference's state-dict order.
        self.class_embed = class_embed
        self.bbox_embed = bbox_embed

    @staticmethod
    def reference_points(level_shapes: LevelShapes, valid_ratios: Tensor) -> Tensor:
        """Centre of every token, normalised by its level's valid (unpadded) size and mapped onto
        every level -> [B, S, L, 2] (x, y), relative to each level's padded map. ``level_shapes``:
        (H_l, W_l) per level, Python ints."""
        points = []
        for level, (h, w) in enumerate(level_shapes):
            # arange + 0.5 equals the reference's linspace(0.5, h - 0.5, h) exactly, and stays exportable
            # with a symbolic h (linspace would freeze it).
            ref_y, ref_x = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=valid_ratios.device) + 0.5,
                torch.arange(w, dtype=torch.float32, device=valid_ratios.device) + 0.5,
                indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
            points.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]

    def forward(self, src: Tensor, pos: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                valid_ratios: Tensor, padding_mask: Tensor, kept_index: Optional[Tensor] = None,
                kept_counts: Optional[Tensor] = None, proposals_unact: Optional[Tensor] = None,
                level_shapes: Optional[LevelShapes] = None) -> dict:
        """
        Args:
            src, pos:        [B, S, C] tokens and their (level) position embeddings.
            valid_ratios:    [B, L, 2] valid (w, h) fraction of each level; padding_mask: [B, S].
            kept_index:      [B, K] tokens to update (Sparse DETR); None updates all tokens.
            kept_counts:     [B] how many of ``kept_index`` each image writes back (its own count).
            proposals_unact: [B, S, 4] proposal boxes (logits) of every token, for the aux heads.
            level_shapes:    ``spatial_shapes`` [L, 2] as Python ints (read from it when None).

        Returns a dict: ``memory`` [B, S, C] and, with aux heads, ``aux_logits`` / ``aux_boxes``:
        lists (one per layer but the last) of [B, K, num_classes] / [B, K, 4] (sigmoid boxes).
        """
        level_shapes = level_shapes_of(spatial_shapes, level_shapes)
        reference_points = self.reference_points(level_shapes, valid_ratios)
        query, query_pos = src, pos
        if kept_index is not None:
            reference_points = gather_tokens(reference_points, kept_index)
            query, query_pos = gather_tokens(src, kept_index), gather_tokens(pos, kept_index)
            if proposals_unact is not None:
                proposals_unact = gather_tokens(proposals_unact, kept_index)
        memory = src
        aux_logits, aux_boxes = [], []
        checkpointed = checkpointing(self, self.grad_checkpoint)
        for layer_id, layer in enumerate(self.layers):
            # Sparse: the layer updates the kept tokens only; the write-back below stays outside the checkpoint.
            query, _, _ = run_block(layer, query, query_pos, reference_points, memory, spatial_shapes,
                                    level_start_index, padding_mask, level_shapes, active=checkpointed)
            memory = query if kept_index is None else self.write_back(memory, query, kept_index, kept_counts)
            if self.class_embed is not None and layer_id < self.num_layers - 1:
                aux_logits.append(self.class_embed[layer_id](query))
                aux_boxes.append((proposals_unact + self.bbox_embed[layer_id](query)).sigmoid())
        out = {"memory": memory}
        if self.class_embed is not None:
            out.update(aux_logits=aux_logits, aux_boxes=aux_boxes)
        return out

    @staticmethod
    def write_back(memory: Tensor, query: Tensor, kept_index: Tensor, kept_counts: Tensor) -> Tensor:
        """Sparse DETR: the updated kept tokens query [B, K, C] put back into memory [B, S, C].

        Every image gathers the batch's largest count K; only its own first ``kept_counts[i]`` are
        written back. Rows past the count write back the value already there (a no-op).
        """
        writes = (torch.arange(kept_index.shape[1], device=memory.device)[None] < kept_counts[:, None])[..., None]
        current = gather_tokens(memory, kept_index)
        return memory.scatter(1, kept_index[..., None].expand_as(query), torch.where(writes, query, current))

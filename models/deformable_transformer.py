"""Deformable transformer of Deformable DETR, with the Efficient DETR and Sparse DETR extensions.

Token layout: the L feature maps are flattened and concatenated, level after level, into S =
sum_l H_l * W_l tokens. Box format everywhere is normalised (cx, cy, w, h); "unact" tensors hold
the same boxes before the sigmoid (logits).
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from util.misc import inverse_sigmoid

from .ops import MSDeformAttn


def _clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


def _gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """tokens [B, S, ...] gathered at index [B, K] along S -> [B, K, ...]."""
    expanded = index.view(*index.shape, *([1] * (tokens.dim() - 2))).expand(-1, -1, *tokens.shape[2:])
    return torch.gather(tokens, 1, expanded)


class MaskPredictor(nn.Module):
    """Sparse DETR's scoring network: one saliency logit per token, from the token and the image mean.

    [B, S, C] -> [B, S, 1]. Half of the hidden features are averaged over all tokens of the image
    (padding included, as the reference) to give every token global context.
    """

    def __init__(self, *, in_dim: int, hidden_dim: int):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.layer1 = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden_dim), nn.GELU())
        self.layer2 = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim // 2), nn.GELU(),
            nn.Linear(hidden_dim // 2, hidden_dim // 4), nn.GELU(),
            nn.Linear(hidden_dim // 4, 1),
        )

    def forward(self, tokens: Tensor) -> Tensor:
        z = self.layer1(tokens)
        z_local, z_global = z.split(self.hidden_dim // 2, dim=-1)
        z_global = z_global.mean(dim=1, keepdim=True).expand_as(z_local)
        return self.layer2(torch.cat([z_local, z_global], dim=-1))


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
                spatial_shapes: Tensor, level_start_index: Tensor, padding_mask: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        """query [B, K, C] attends to value [B, S, C] (K = S, or the kept tokens of the sparse encoder).

        Returns the updated queries [B, K, C], sampling locations and attention weights.
        """
        attended, locations, weights = self.self_attn(query + query_pos, reference_points, value, spatial_shapes,
                                                      level_start_index, padding_mask)
        query = self.norm1(query + self.dropout1(attended))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(query))))
        query = self.norm2(query + self.dropout3(ffn))
        return query, locations, weights


class DeformableTransformerEncoder(nn.Module):
    """A stack of encoder layers; sparse when given the indices of the tokens to update.

    ``class_embed`` / ``bbox_embed`` (one head per layer but the last) are attached by the detector
    when it trains with the encoder auxiliary loss (Sparse DETR).
    """

    def __init__(self, layer: DeformableTransformerEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.num_layers = num_layers
        self.class_embed: Optional[nn.ModuleList] = None
        self.bbox_embed: Optional[nn.ModuleList] = None

    @staticmethod
    def reference_points(spatial_shapes: Tensor, valid_ratios: Tensor) -> Tensor:
        """Centre of every token, normalised by its level's valid (unpadded) size and mapped onto
        every level -> [B, S, L, 2] (x, y), relative to each level's padded map."""
        points = []
        for level, (h, w) in enumerate(spatial_shapes.tolist()):
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=valid_ratios.device),
                torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=valid_ratios.device),
                indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
            points.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]

    def forward(self, src: Tensor, pos: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                valid_ratios: Tensor, padding_mask: Tensor, kept_index: Optional[Tensor] = None,
                kept_counts: Optional[Tensor] = None, proposals_unact: Optional[Tensor] = None) -> dict:
        """
        Args:
            src, pos:        [B, S, C] tokens and their (level) position embeddings.
            valid_ratios:    [B, L, 2] valid (w, h) fraction of each level; padding_mask: [B, S].
            kept_index:      [B, K] tokens to update (Sparse DETR); None updates all tokens.
            kept_counts:     [B] how many of ``kept_index`` each image writes back (its own count).
            proposals_unact: [B, S] x 4 proposal boxes (logits) of every token, for the aux heads.

        Returns a dict: ``memory`` [B, S, C] and, with aux heads, ``aux_logits`` / ``aux_boxes``:
        lists (one per layer but the last) of [B, K, num_classes] / [B, K, 4] (sigmoid boxes).
        """
        reference_points = self.reference_points(spatial_shapes, valid_ratios)
        memory = src
        query, query_pos = src, pos
        if kept_index is not None:
            reference_points = _gather_tokens(reference_points, kept_index)
            query, query_pos = _gather_tokens(src, kept_index), _gather_tokens(pos, kept_index)
            if proposals_unact is not None:
                proposals_unact = _gather_tokens(proposals_unact, kept_index)
            # Every image gathers the batch's largest count K; only its own first kept_counts[i] are
            # written back. Rows past the count write back the value already there (a no-op).
            writes_back = (torch.arange(kept_index.shape[1], device=src.device)[None] < kept_counts[:, None])[..., None]
        aux_logits, aux_boxes = [], []
        for layer_id, layer in enumerate(self.layers):
            query, _, _ = layer(query, query_pos, reference_points, memory, spatial_shapes, level_start_index,
                                padding_mask)
            if kept_index is None:
                memory = query
            else:
                current = _gather_tokens(memory, kept_index)
                memory = memory.scatter(1, kept_index[..., None].expand_as(query),
                                        torch.where(writes_back, query, current))
            if self.class_embed is not None and layer_id < self.num_layers - 1:
                aux_logits.append(self.class_embed[layer_id](query))
                aux_boxes.append((proposals_unact + self.bbox_embed[layer_id](query)).sigmoid())
        out = {"memory": memory}
        if self.class_embed is not None:
            out.update(aux_logits=aux_logits, aux_boxes=aux_boxes)
        return out


class DeformableTransformerDecoderLayer(nn.Module):
    """Post-norm layer: query self-attention, deformable cross-attention, feed-forward network."""

    def __init__(self, *, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model=d_model, n_levels=n_levels, n_heads=n_heads, n_points=n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor, padding_mask: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        q = k = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attended, locations, weights = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes,
                                                       level_start_index, padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attended))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        tgt = self.norm3(tgt + self.dropout4(ffn))
        return tgt, locations, weights


class DeformableTransformerDecoder(nn.Module):
    """A stack of decoder layers.

    ``bbox_embed`` (attached by the detector with ``--with_box_refine``) refines the reference boxes
    after every layer; ``class_embed`` is attached for two-stage, whose proposal head is the last entry.
    """

    def __init__(self, layer: DeformableTransformerDecoderLayer, num_layers: int):
        super().__init__()
        self.layers = _clones(layer, num_layers)
        self.num_layers = num_layers
        self.class_embed: Optional[nn.ModuleList] = None
        self.bbox_embed: Optional[nn.ModuleList] = None

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor, valid_ratios: Tensor,
                padding_mask: Tensor) -> dict:
        """
        Args:
            tgt, query_pos:   [B, Q, C] query contents and positions.
            reference_points: [B, Q, 2] normalised points or [B, Q, 4] boxes (cxcywh, sigmoid space).

        Returns a dict with ``hs`` [n_layers, B, Q, C], ``references`` [n_layers, B, Q, 2|4] (the
        reference each layer's output is refined to, detached), ``sampling_locations``
        [B, n_layers, Q, heads, L, P, 2] and ``attention_weights`` [B, n_layers, Q, heads, L, P].
        """
        hs, references, all_locations, all_weights = [], [], [], []
        ratios = valid_ratios if reference_points.shape[-1] == 2 else torch.cat([valid_ratios, valid_ratios], -1)
        for layer_id, layer in enumerate(self.layers):
            # References are relative to the valid image; the op samples the padded map.
            tgt, locations, weights = layer(tgt, query_pos, reference_points[:, :, None] * ratios[:, None], memory,
                                            spatial_shapes, level_start_index, padding_mask)
            all_locations.append(locations)
            all_weights.append(weights)
            if self.bbox_embed is not None:
                delta = self.bbox_embed[layer_id](tgt)
                if reference_points.shape[-1] == 4:
                    refined = delta + inverse_sigmoid(reference_points)
                else:
                    refined = torch.cat([delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1)
                reference_points = refined.sigmoid().detach()
                ratios = torch.cat([valid_ratios, valid_ratios], -1)
            hs.append(tgt)
            references.append(reference_points)
        return {"hs": torch.stack(hs), "references": torch.stack(references),
                "sampling_locations": torch.stack(all_locations, 1), "attention_weights": torch.stack(all_weights, 1)}


class DeformableTransformer(nn.Module):
    """Encoder + decoder of the Deformable DETR family.

    Variants: ``two_stage`` (queries from the top-scoring encoder proposals), ``eff_query_init``
    (Efficient DETR: query contents are the selected encoder tokens), ``eff_specific_head``
    (proposals ranked by their best class score, not a binary score), ``rho`` > 0 (Sparse DETR:
    the encoder updates only the top ``rho`` fraction of tokens chosen by ``enc_mask_predictor``)
    and ``use_enc_aux_loss`` (detection heads after every encoder layer but the last).
    """

    def __init__(self, *, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 1024, dropout: float = 0.1,
                 num_feature_levels: int = 4, dec_n_points: int = 4, enc_n_points: int = 4,
                 two_stage: bool = False, two_stage_num_proposals: int = 300, eff_query_init: bool = False,
                 eff_specific_head: bool = False, rho: float = 0.0, use_enc_aux_loss: bool = False):
        super().__init__()
        self.d_model = d_model
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        self.eff_query_init = eff_query_init
        self.eff_specific_head = eff_specific_head
        self.rho = rho
        self.use_enc_aux_loss = use_enc_aux_loss
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if rho:
            self.enc_mask_predictor = MaskPredictor(in_dim=d_model, hidden_dim=d_model)
        self.encoder = DeformableTransformerEncoder(
            DeformableTransformerEncoderLayer(d_model=d_model, d_ffn=dim_feedforward, dropout=dropout,
                                              n_levels=num_feature_levels, n_heads=nhead, n_points=enc_n_points),
            num_encoder_layers)
        self.decoder = DeformableTransformerDecoder(
            DeformableTransformerDecoderLayer(d_model=d_model, d_ffn=dim_feedforward, dropout=dropout,
                                              n_levels=num_feature_levels, n_heads=nhead, n_points=dec_n_points),
            num_decoder_layers)
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            pos_dim = d_model if eff_query_init else 2 * d_model
            self.pos_trans = nn.Linear(2 * d_model, pos_dim)
            self.pos_trans_norm = nn.LayerNorm(pos_dim)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    @staticmethod
    def proposal_pos_embed(proposals_unact: Tensor, num_pos_feats: int = 128, temperature: float = 10000.0
                           ) -> Tensor:
        """Sine embedding of [B, K, 4] box logits -> [B, K, 4 * num_pos_feats]."""
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals_unact.device)
        dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
        pos = proposals_unact.sigmoid()[:, :, :, None] * (2 * math.pi) / dim_t
        return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)

    @staticmethod
    def token_proposals(padding_mask: Tensor, spatial_shapes: Tensor) -> tuple[Tensor, Tensor]:
        """One proposal box per token: its centre and a size of 0.05 * 2^level (Deformable DETR A.4).

        Returns ``proposals_unact`` [B, S, 4] (logits; inf on padding and near the border) and
        ``valid`` [B, S, 1] (False there). Computed in float32, as the reference.
        """
        batch = padding_mask.shape[0]
        proposals, start = [], 0
        for level, (h, w) in enumerate(spatial_shapes.tolist()):
            level_mask = padding_mask[:, start:start + h * w].view(batch, h, w)
            valid_h = (~level_mask[:, :, 0]).sum(1)
            valid_w = (~level_mask[:, 0, :]).sum(1)
            grid_y, grid_x = torch.meshgrid(
                torch.linspace(0, h - 1, h, dtype=torch.float32, device=padding_mask.device),
                torch.linspace(0, w - 1, w, dtype=torch.float32, device=padding_mask.device), indexing="ij")
            grid = torch.stack([grid_x, grid_y], -1)
            scale = torch.stack([valid_w, valid_h], 1).view(batch, 1, 1, 2)
            centres = (grid.unsqueeze(0).expand(batch, -1, -1, -1) + 0.5) / scale
            sizes = torch.full_like(centres, 0.05 * 2.0 ** level)
            proposals.append(torch.cat((centres, sizes), -1).view(batch, -1, 4))
            start += h * w
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals_unact = torch.log(proposals / (1 - proposals))
        proposals_unact = proposals_unact.masked_fill(padding_mask.unsqueeze(-1), float("inf"))
        proposals_unact = proposals_unact.masked_fill(~valid, float("inf"))
        return proposals_unact, valid

    def project_tokens(self, tokens: Tensor, padding_mask: Tensor, valid: Tensor) -> Tensor:
        """Zero padded and border tokens, then ``enc_output`` + LayerNorm: the proposal features."""
        tokens = tokens * (valid & ~padding_mask.unsqueeze(-1)).to(tokens.dtype)
        return self.enc_output_norm(self.enc_output(tokens))

    @staticmethod
    def valid_ratio(mask: Tensor) -> Tensor:
        """[B, H, W] padding mask -> [B, 2] valid (w, h) fractions."""
        _, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1)
        valid_w = (~mask[:, 0, :]).sum(1)
        return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)

    def forward(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor],
                query_embed: Optional[Tensor] = None) -> dict:
        """
        Args:
            srcs, pos_embeds: L maps [B, C, H_l, W_l]; masks: L [B, H_l, W_l] bool (True on padding).
            query_embed:      [Q, 2C] learned (position, content) queries; None with two-stage.

        Returns a dict:
            hs [n_dec, B, Q, C]; init_reference [B, Q, 2|4]; inter_references [n_dec, B, Q, 2|4];
            spatial_shapes [L, 2]; level_start_index [L]; mask_flatten [B, S];
            sampling_locations_dec [B, n_dec, Q, heads, L, P, 2]; attn_weights_dec [B, n_dec, Q, heads, L, P];
            two-stage: enc_outputs_class [B, S, num_classes], enc_outputs_coord_unact [B, S, 4];
            rho > 0: backbone_mask_prediction [B, S] (padding at the minimum), backbone_topk_proposals
            [B, K], sparse_token_nums [B] int32;
            use_enc_aux_loss: enc_aux_logits / enc_aux_boxes, lists of [B, K, num_classes] / [B, K, 4].
        """
        if not self.two_stage and query_embed is None:
            raise ValueError("query_embed is required unless two_stage")
        spatial_shapes = torch.as_tensor([src.shape[-2:] for src in srcs], dtype=torch.long, device=srcs[0].device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        src_flatten = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)
        mask_flatten = torch.cat([mask.flatten(1) for mask in masks], 1)
        pos_flatten = torch.cat([pos.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1)
                                 for level, pos in enumerate(pos_embeds)], 1)
        valid_ratios = torch.stack([self.valid_ratio(m) for m in masks], 1)
        out = {"spatial_shapes": spatial_shapes, "level_start_index": level_start_index, "mask_flatten": mask_flatten}

        # Sparse DETR: score the backbone tokens and keep the top rho fraction of each image's valid ones.
        # Every token's proposal box depends only on the padding: made once, used by the scoring
        # network, the encoder auxiliary heads and the two-stage proposals.
        if self.rho or self.use_enc_aux_loss or self.two_stage:
            proposals_unact, proposals_valid = self.token_proposals(mask_flatten, spatial_shapes)
        kept_index = kept_counts = None
        if self.rho:
            valid_token_nums = (~mask_flatten).sum(-1)
            kept_counts = (valid_token_nums * self.rho).int() + 1
            num_kept = min(int(kept_counts.max()), src_flatten.shape[1])
            scores = self.enc_mask_predictor(
                self.project_tokens(src_flatten + pos_flatten, mask_flatten, proposals_valid)).squeeze(-1)
            # Padding never wins a place (-inf, where the reference's minimum could tie with a valid
            # token); the reported logits put padding at the minimum, as the reference.
            kept_index = torch.topk(scores.masked_fill(mask_flatten, float("-inf")), num_kept, dim=1)[1]
            scores = scores.masked_fill(mask_flatten, scores.min())
            out.update(backbone_mask_prediction=scores, backbone_topk_proposals=kept_index,
                       sparse_token_nums=kept_counts)

        encoded = self.encoder(src_flatten, pos_flatten, spatial_shapes, level_start_index, valid_ratios, mask_flatten,
                               kept_index=kept_index, kept_counts=kept_counts,
                               proposals_unact=proposals_unact if self.use_enc_aux_loss else None)
        memory = encoded["memory"]
        if self.use_enc_aux_loss:
            out.update(enc_aux_logits=encoded["aux_logits"], enc_aux_boxes=encoded["aux_boxes"])

        batch, _, channels = memory.shape
        if self.two_stage:
            proposal_features = self.project_tokens(memory, mask_flatten, proposals_valid)
            # The head after the last decoder one scores and regresses every token's proposal.
            enc_class = self.decoder.class_embed[self.decoder.num_layers](proposal_features)
            enc_coord_unact = proposals_unact + self.decoder.bbox_embed[self.decoder.num_layers](proposal_features)
            out.update(enc_outputs_class=enc_class, enc_outputs_coord_unact=enc_coord_unact)
            objectness = enc_class.max(-1)[0] if self.eff_specific_head else enc_class[..., 0]
            topk_index = torch.topk(objectness, self.two_stage_num_proposals, dim=1)[1]
            topk_coords_unact = _gather_tokens(enc_coord_unact, topk_index).detach()
            reference_points = topk_coords_unact.sigmoid()
            pos_trans_out = self.pos_trans_norm(self.pos_trans(self.proposal_pos_embed(topk_coords_unact, self.d_model // 2)))
            if self.eff_query_init:
                query_pos, tgt = pos_trans_out, _gather_tokens(memory, topk_index)
            else:
                query_pos, tgt = pos_trans_out.split(channels, dim=2)
        else:
            query_pos, tgt = query_embed.split(channels, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(batch, -1, -1)
            tgt = tgt.unsqueeze(0).expand(batch, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()

        decoded = self.decoder(tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index,
                               valid_ratios, mask_flatten)
        out.update(hs=decoded["hs"], init_reference=reference_points, inter_references=decoded["references"],
                   sampling_locations_dec=decoded["sampling_locations"],
                   attn_weights_dec=decoded["attention_weights"])
        return out


def build_deformable_transformer(args) -> DeformableTransformer:
    return DeformableTransformer(
        d_model=args.hidden_dim,
        nhead=args.nheads,
        num_encoder_layers=args.enc_layers,
        num_decoder_layers=args.dec_layers,
        dim_feedforward=args.dim_feedforward,
        dropout=args.dropout,
        num_feature_levels=args.num_feature_levels,
        dec_n_points=args.dec_n_points,
        enc_n_points=args.enc_n_points,
        two_stage=args.two_stage,
        two_stage_num_proposals=args.num_queries,
        eff_query_init=args.eff_query_init,
        eff_specific_head=args.eff_specific_head,
        rho=args.rho,
        use_enc_aux_loss=args.use_enc_aux_loss,
    )

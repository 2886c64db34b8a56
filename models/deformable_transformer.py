"""Deformable transformer of Deformable DETR, with the Efficient DETR and Sparse DETR extensions.

Token layout: the L feature maps are flattened and concatenated, level after level, into S =
sum_l H_l * W_l tokens. Box format everywhere is normalised (cx, cy, w, h); "unact" tensors hold
the same boxes before the sigmoid (logits). The encoder lives in ``models/deformable_encoder.py``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from util.errors import InputError

from .deformable_encoder import DeformableTransformerEncoder, DeformableTransformerEncoderLayer, clones, gather_tokens
from .activation_checkpoint import checkpointing, run_block
from .heads import refine_box_logits
from .ops import LevelShapes, MSDeformAttn, is_exporting
from .token_selection import TokenSelector, build_token_selector


class FlatLevels(NamedTuple):
    """The L feature levels flattened into S tokens, level after level."""
    src: Tensor                # [B, S, C] tokens
    pos: Tensor                # [B, S, C] position encodings plus level embeddings
    mask: Tensor               # [B, S] True on padding
    spatial_shapes: Tensor     # [L, 2] (H_l, W_l)
    level_start_index: Tensor  # [L] first token of each level
    valid_sizes: Tensor        # [B, L, 2] (w, h) unpadded size of each level, in tokens
    valid_ratios: Tensor       # [B, L, 2] (w, h) unpadded fraction of each level
    level_shapes: LevelShapes  # spatial_shapes as Python ints (symbolic while exporting: the graph keeps H, W free)


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
                spatial_shapes: Tensor, level_start_index: Tensor, padding_mask: Tensor,
                level_shapes: Optional[LevelShapes] = None) -> tuple[Tensor, Tensor, Tensor]:
        q = k = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attended, locations, weights = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes,
                                                       level_start_index, padding_mask, level_shapes)
        tgt = self.norm1(tgt + self.dropout1(attended))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        tgt = self.norm3(tgt + self.dropout4(ffn))
        return tgt, locations, weights


class DeformableTransformerDecoder(nn.Module):
    """A stack of decoder layers.

    ``bbox_embed`` (the detector's box heads, with box refinement): after layer l, head l turns the
    layer's output into box logits that are both layer l's predicted boxes and, detached, layer l+1's
    reference. ``class_embed`` (two-stage) holds the proposal head, the entry after the decoder's own.
    ``grad_checkpoint``: activation checkpointing of each layer in training.
    """

    def __init__(self, *, layer: DeformableTransformerDecoderLayer, num_layers: int,
                 class_embed: Optional[nn.ModuleList] = None, bbox_embed: Optional[nn.ModuleList] = None,
                 grad_checkpoint: bool = False):
        super().__init__()
        self.layers = clones(layer, num_layers)
        self.num_layers = num_layers
        self.grad_checkpoint = grad_checkpoint
        # Registered after the layers, class heads first: the reference's state-dict order.
        self.class_embed = class_embed
        self.bbox_embed = bbox_embed

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor, valid_ratios: Tensor,
                padding_mask: Tensor, level_shapes: Optional[LevelShapes] = None) -> dict:
        """
        Args:
            tgt, query_pos:   [B, Q, C] query contents and positions.
            reference_points: [B, Q, 2] normalised points or [B, Q, 4] boxes (cxcywh, sigmoid space).
            level_shapes:     ``spatial_shapes`` as Python ints (see ``models/ops/ms_deform_attn_func.py``).

        Returns a dict with ``hs`` [n_layers, B, Q, C], ``sampling_locations``
        [B, n_layers, Q, heads, L, P, 2], ``attention_weights`` [B, n_layers, Q, heads, L, P] and, with
        ``bbox_embed``, ``box_logits``: every layer's refined boxes [B, Q, 4], not detached. A list, not
        stacked: the boxes a loss leaves unused leave their heads without a gradient (not a zero one).
        """
        hs, box_logits, all_locations, all_weights = [], [], [], []
        ratios = valid_ratios if reference_points.shape[-1] == 2 else torch.cat([valid_ratios, valid_ratios], -1)
        checkpointed = checkpointing(self, self.grad_checkpoint)
        for layer_id, layer in enumerate(self.layers):
            # References are relative to the valid image; the op samples the padded map.
            tgt, locations, weights = run_block(layer, tgt, query_pos, reference_points[:, :, None] * ratios[:, None],
                                                memory, spatial_shapes, level_start_index, padding_mask, level_shapes,
                                                active=checkpointed)
            hs.append(tgt)
            all_locations.append(locations)
            all_weights.append(weights)
            if self.bbox_embed is not None:
                box_logits.append(refine_box_logits(self.bbox_embed[layer_id](tgt), reference_points))
                # The next layer starts from these boxes, detached as in the reference implementation.
                reference_points = box_logits[-1].sigmoid().detach()
                ratios = torch.cat([valid_ratios, valid_ratios], -1)
        out = {"hs": torch.stack(hs), "sampling_locations": torch.stack(all_locations, 1),
               "attention_weights": torch.stack(all_weights, 1)}
        if self.bbox_embed is not None:
            out["box_logits"] = box_logits
        return out


class DeformableTransformer(nn.Module):
    """Encoder + decoder of the Deformable DETR family.

    Variants: ``with_box_refine`` (every decoder layer refines the boxes of the one before),
    ``two_stage`` (queries from the top-scoring encoder proposals), ``eff_query_init`` (Efficient
    DETR: query contents are the selected encoder tokens), ``eff_specific_head`` (proposals ranked
    by their best class score, not a binary score), ``token_selector`` (Sparse DETR: the encoder updates
    only the top ``rho`` fraction of tokens chosen by this rule, see ``models/token_selection.py``; registered
    as ``transformer.<token_selector.STATE_NAME>``, e.g. ``enc_mask_predictor``) and
    ``use_enc_aux_loss`` (detection heads after every encoder layer but the last).

    ``class_embed`` / ``bbox_embed`` are the detector's heads (one per decoder layer, then the
    two-stage proposal head, then one per encoder layer but the last), needed with ``with_box_refine``,
    ``two_stage`` or ``use_enc_aux_loss``. The decoder holds every box head (box refinement) and every
    class head (two-stage), the encoder its own (encoder auxiliary loss), and the detector the same
    modules: the official checkpoints' layout (``transformer.decoder.class_embed.*``).
    ``grad_checkpoint``: activation checkpointing, in training, of every encoder and decoder layer and of
    the two passes over all S tokens: the token selector and the two-stage proposal heads.
    """

    def __init__(self, *, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 1024, dropout: float = 0.1,
                 num_feature_levels: int = 4, dec_n_points: int = 4, enc_n_points: int = 4,
                 with_box_refine: bool = False, two_stage: bool = False, two_stage_num_proposals: int = 300,
                 eff_query_init: bool = False, eff_specific_head: bool = False,
                 token_selector: Optional[TokenSelector] = None, use_enc_aux_loss: bool = False,
                 class_embed: Optional[nn.ModuleList] = None,
                 bbox_embed: Optional[nn.ModuleList] = None, grad_checkpoint: bool = False):
        super().__init__()
        if two_stage and not with_box_refine:
            raise ValueError("a two-stage transformer needs with_box_refine=True: the decoder refines the proposals")
        if token_selector is not None and not two_stage:
            raise ValueError("a token selector needs two_stage=True: it scores the two-stage projection of the tokens")
        if (with_box_refine or use_enc_aux_loss) and (class_embed is None or bbox_embed is None):
            raise ValueError("with_box_refine, two_stage and use_enc_aux_loss need the detector's class_embed and "
                             "bbox_embed")
        self.d_model = d_model
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        self.eff_query_init = eff_query_init
        self.eff_specific_head = eff_specific_head
        self.use_enc_aux_loss = use_enc_aux_loss
        self.grad_checkpoint = grad_checkpoint
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        # Registered here under the rule's name: the official checkpoints' state-dict order (enc_mask_predictor).
        self.selector_name = token_selector.STATE_NAME if token_selector is not None else None
        if token_selector is not None:
            self.add_module(self.selector_name, token_selector)
        layer_args = dict(d_model=d_model, d_ffn=dim_feedforward, dropout=dropout, n_levels=num_feature_levels,
                          n_heads=nhead)
        first_encoder_head = num_decoder_layers + int(two_stage)
        self.encoder = DeformableTransformerEncoder(
            layer=DeformableTransformerEncoderLayer(**layer_args, n_points=enc_n_points),
            num_layers=num_encoder_layers,
            class_embed=class_embed[first_encoder_head:] if use_enc_aux_loss else None,
            bbox_embed=bbox_embed[first_encoder_head:] if use_enc_aux_loss else None,
            grad_checkpoint=grad_checkpoint)
        self.decoder = DeformableTransformerDecoder(
            layer=DeformableTransformerDecoderLayer(**layer_args, n_points=dec_n_points),
            num_layers=num_decoder_layers,
            class_embed=class_embed if two_stage else None,
            bbox_embed=bbox_embed if with_box_refine else None,
            grad_checkpoint=grad_checkpoint)
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            pos_dim = d_model if eff_query_init else 2 * d_model
            self.pos_trans = nn.Linear(2 * d_model, pos_dim)
            self.pos_trans_norm = nn.LayerNorm(pos_dim)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters(heads=[head for head in (class_embed, bbox_embed) if head is not None])

    def _reset_parameters(self, heads: list[nn.Module]) -> None:
        """The reference's initialisation; the detector's heads keep the one the detector gave them."""
        head_parameters = {id(p) for head in heads for p in head.parameters()}
        for p in self.parameters():
            if p.dim() > 1 and id(p) not in head_parameters:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)
        if self.selector is not None:
            self.selector.reset_parameters()

    @property
    def selector(self) -> Optional[TokenSelector]:
        """The token-selection rule (Sparse DETR), None for a dense encoder."""
        return getattr(self, self.selector_name) if self.selector_name else None

    @property
    def rho(self) -> float:
        """The fraction of tokens the encoder updates; 0 for a dense encoder."""
        return self.selector.rho if self.selector is not None else 0.0

    # -- the steps of ``forward``, in order
    def flatten_levels(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor]) -> FlatLevels:
        """L maps [B, C, H_l, W_l], masks [B, H_l, W_l] and position encodings -> one token sequence."""
        level_shapes = tuple((src.shape[-2], src.shape[-1]) for src in srcs)
        if is_exporting():  # from the symbolic sizes: as_tensor would freeze them at the example's
            spatial_shapes = torch.stack([torch.stack([torch.scalar_tensor(size, dtype=torch.long, device=srcs[0].device)
                                                       for size in shape]) for shape in level_shapes])
        else:
            spatial_shapes = torch.as_tensor(level_shapes, dtype=torch.long, device=srcs[0].device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        pos = [pos.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1)
               for level, pos in enumerate(pos_embeds)]
        # The valid size of every level, once: counts for the proposals, fractions for the sampling points.
        valid_sizes, valid_ratios = [], []
        for mask in masks:
            _, h, w = mask.shape
            valid_h = (~mask[:, :, 0]).sum(1)
            valid_w = (~mask[:, 0, :]).sum(1)
            valid_sizes.append(torch.stack([valid_w, valid_h], -1))
            valid_ratios.append(torch.stack([valid_w.float() / w, valid_h.float() / h], -1))
        return FlatLevels(src=torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1), pos=torch.cat(pos, 1),
                          mask=torch.cat([mask.flatten(1) for mask in masks], 1), spatial_shapes=spatial_shapes,
                          level_start_index=level_start_index, valid_sizes=torch.stack(valid_sizes, 1),
                          valid_ratios=torch.stack(valid_ratios, 1), level_shapes=level_shapes)

    @staticmethod
    def token_proposals(levels: FlatLevels) -> tuple[Tensor, Tensor]:
        """One proposal box per token: its centre and a size of 0.05 * 2^level (Deformable DETR A.4).

        Returns ``proposals_unact`` [B, S, 4] (logits; inf on padding and near the border) and
        ``valid`` [B, S, 1] (False there). Computed in float32, as the reference.
        """
        batch, device = levels.mask.shape[0], levels.mask.device
        proposals = []
        for level, (h, w) in enumerate(levels.level_shapes):
            # arange, not the reference's linspace(0, h - 1, h): the same integers, and exportable with a
            # symbolic h (linspace would freeze it).
            grid_y, grid_x = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device),
                                            torch.arange(w, dtype=torch.float32, device=device), indexing="ij")
            grid = torch.stack([grid_x, grid_y], -1)
            scale = levels.valid_sizes[:, level].view(batch, 1, 1, 2)
            centres = (grid.unsqueeze(0).expand(batch, -1, -1, -1) + 0.5) / scale
            sizes = torch.full_like(centres, 0.05 * 2.0 ** level)
            proposals.append(torch.cat((centres, sizes), -1).view(batch, -1, 4))
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals_unact = torch.log(proposals / (1 - proposals))
        proposals_unact = proposals_unact.masked_fill(levels.mask.unsqueeze(-1), float("inf"))
        proposals_unact = proposals_unact.masked_fill(~valid, float("inf"))
        return proposals_unact, valid

    def project_tokens(self, tokens: Tensor, padding_mask: Tensor, valid: Tensor) -> Tensor:
        """Zero padded and border tokens, then ``enc_output`` + LayerNorm: the proposal features."""
        tokens = tokens * (valid & ~padding_mask.unsqueeze(-1)).to(tokens.dtype)
        return self.enc_output_norm(self.enc_output(tokens))

    def select_sparse_tokens(self, levels: FlatLevels, proposals_unact: Tensor, proposals_valid: Tensor) -> dict:
        """Sparse DETR: the selector scores the backbone tokens and keeps the top ``rho`` fraction of each image's
        valid ones. Returns :meth:`TokenSelector.select`'s outputs: ``backbone_mask_prediction`` [B, S],
        ``backbone_topk_proposals`` [B, K], ``sparse_token_nums`` [B] and the rule's own."""
        scored = run_block(self.score_tokens, levels.src + levels.pos, levels.mask, proposals_valid, proposals_unact,
                           active=checkpointing(self, self.grad_checkpoint))
        return self.selector.select(scored, levels.mask)

    def score_tokens(self, tokens: Tensor, padding_mask: Tensor, valid: Tensor, proposals_unact: Tensor) -> dict:
        """The selector's outputs (``scores`` [B, S], ...) for the tokens [B, S, C] (with their position encoding)."""
        return self.selector(self.project_tokens(tokens, padding_mask, valid), proposals_unact)

    @staticmethod
    def proposal_pos_embed(proposals_unact: Tensor, num_pos_feats: int = 128, temperature: float = 10000.0
                           ) -> Tensor:
        """Sine embedding of [B, K, 4] box logits -> [B, K, 4 * num_pos_feats]."""
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals_unact.device)
        dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
        pos = proposals_unact.sigmoid()[:, :, :, None] * (2 * math.pi) / dim_t
        return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)

    def two_stage_queries(self, memory: Tensor, levels: FlatLevels, proposals_unact: Tensor,
                          proposals_valid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Two-stage: every encoded token proposes a box; the ``two_stage_num_proposals`` best become the queries.

        Returns the queries' contents and positions [B, Q, C], their reference boxes [B, Q, 4] (sigmoid,
        detached) and every token's proposal: class logits [B, S, num_classes], box logits [B, S, 4].
        """
        proposal_class, proposal_unact = run_block(self.token_proposal_heads, memory, levels.mask, proposals_valid,
                                                   proposals_unact, active=checkpointing(self, self.grad_checkpoint))
        objectness = proposal_class.max(-1)[0] if self.eff_specific_head else proposal_class[..., 0]
        if objectness.shape[1] < self.two_stage_num_proposals:
            shapes = " + ".join(f"{h}x{w}" for h, w in levels.spatial_shapes.tolist())
            raise InputError(f"the images give {objectness.shape[1]} tokens ({shapes} over the feature levels), fewer "
                             f"than the {self.two_stage_num_proposals} two-stage proposals that --num_queries asks "
                             "for: use larger images (--scales / --val_size; tools/predict.py --size; 800 px on the "
                             "short side gives about 17,000 tokens) or a lower --num_queries")
        topk_index = torch.topk(objectness, self.two_stage_num_proposals, dim=1)[1]
        topk_coords_unact = gather_tokens(proposal_unact, topk_index).detach()
        pos_trans_out = self.pos_trans_norm(self.pos_trans(self.proposal_pos_embed(topk_coords_unact,
                                                                                   self.d_model // 2)))
        if self.eff_query_init:  # Efficient DETR: the contents are the selected tokens themselves
            query_pos, tgt = pos_trans_out, gather_tokens(memory, topk_index)
        else:
            query_pos, tgt = pos_trans_out.split(self.d_model, dim=2)
        return tgt, query_pos, topk_coords_unact.sigmoid(), proposal_class, proposal_unact

    def token_proposal_heads(self, memory: Tensor, padding_mask: Tensor, valid: Tensor, proposals_unact: Tensor
                             ) -> tuple[Tensor, Tensor]:
        """Every encoded token's proposal, scored and regressed by the head after the decoder's own: class
        logits [B, S, num_classes] and box logits [B, S, 4] (``proposals_unact`` [B, S, 4] plus the offsets)."""
        features = self.project_tokens(memory, padding_mask, valid)
        return (self.decoder.class_embed[self.decoder.num_layers](features),
                proposals_unact + self.decoder.bbox_embed[self.decoder.num_layers](features))

    def learned_queries(self, query_embed: Tensor, batch: int) -> tuple[Tensor, Tensor, Tensor]:
        """Deformable DETR's queries: ``query_embed`` [Q, 2C] splits into positions and contents, the
        same for every image. Returns contents and positions [B, Q, C] and reference points [B, Q, 2],
        a learned function of the positions."""
        query_pos, tgt = query_embed.split(self.d_model, dim=1)
        query_pos = query_pos.unsqueeze(0).expand(batch, -1, -1)
        tgt = tgt.unsqueeze(0).expand(batch, -1, -1)
        return tgt, query_pos, self.reference_points(query_pos).sigmoid()

    def forward(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor],
                query_embed: Optional[Tensor] = None) -> dict:
        """
        Args:
            srcs, pos_embeds: L maps [B, C, H_l, W_l]; masks: L [B, H_l, W_l] bool (True on padding).
            query_embed:      [Q, 2C] learned (position, content) queries; None with two-stage.

        Returns a dict:
            hs [n_dec, B, Q, C]; init_reference [B, Q, 2|4] (the decoder's first reference);
            with_box_refine: box_logits, n_dec [B, Q, 4], every decoder layer's boxes before the sigmoid;
            spatial_shapes [L, 2]; level_start_index [L]; mask_flatten [B, S];
            sampling_locations_dec [B, n_dec, Q, heads, L, P, 2]; attn_weights_dec [B, n_dec, Q, heads, L, P];
            two-stage: enc_outputs_class [B, S, num_classes], enc_outputs_coord_unact [B, S, 4];
            token_selection: a dict of the selector's outputs (``TokenSelector.select``): backbone_mask_prediction
                [B, S], backbone_topk_proposals [B, K], sparse_token_nums [B] and the rule's own;
            use_enc_aux_loss: enc_aux_logits / enc_aux_boxes, lists of [B, K, num_classes] / [B, K, 4].
        """
        if not self.two_stage and query_embed is None:
            raise ValueError("query_embed is required unless two_stage")
        levels = self.flatten_levels(srcs, masks, pos_embeds)
        out = {"spatial_shapes": levels.spatial_shapes, "level_start_index": levels.level_start_index,
               "mask_flatten": levels.mask}
        # Every token's proposal box depends only on the padding: made once, used by the token
        # selector, the encoder auxiliary heads and the two-stage proposals.
        if self.selector is not None or self.use_enc_aux_loss or self.two_stage:
            proposals_unact, proposals_valid = self.token_proposals(levels)
        kept_index = kept_counts = None
        if self.selector is not None:
            selection = out["token_selection"] = self.select_sparse_tokens(levels, proposals_unact, proposals_valid)
            kept_index, kept_counts = selection["backbone_topk_proposals"], selection["sparse_token_nums"]

        encoded = self.encoder(levels.src, levels.pos, levels.spatial_shapes, levels.level_start_index,
                               levels.valid_ratios, levels.mask, kept_index=kept_index, kept_counts=kept_counts,
                               proposals_unact=proposals_unact if self.use_enc_aux_loss else None,
                               level_shapes=levels.level_shapes)
        memory = encoded["memory"]
        if self.use_enc_aux_loss:
            out.update(enc_aux_logits=encoded["aux_logits"], enc_aux_boxes=encoded["aux_boxes"])

        if self.two_stage:
            tgt, query_pos, reference_points, enc_class, enc_coord_unact = self.two_stage_queries(
                memory, levels, proposals_unact, proposals_valid)
            out.update(enc_outputs_class=enc_class, enc_outputs_coord_unact=enc_coord_unact)
        else:
            tgt, query_pos, reference_points = self.learned_queries(query_embed, memory.shape[0])

        decoded = self.decoder(tgt, query_pos, reference_points, memory, levels.spatial_shapes,
                               levels.level_start_index, levels.valid_ratios, levels.mask, levels.level_shapes)
        out.update(hs=decoded["hs"], init_reference=reference_points,
                   sampling_locations_dec=decoded["sampling_locations"],
                   attn_weights_dec=decoded["attention_weights"])
        if self.with_box_refine:
            out["box_logits"] = decoded["box_logits"]
        return out


def build_deformable_transformer(args, *, class_embed: Optional[nn.ModuleList] = None,
                                 bbox_embed: Optional[nn.ModuleList] = None) -> DeformableTransformer:
    """The transformer of ``args``, holding the detector's heads where its variant uses them."""
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
        with_box_refine=args.with_box_refine,
        two_stage=args.two_stage,
        two_stage_num_proposals=args.num_queries,
        eff_query_init=args.eff_query_init,
        eff_specific_head=args.eff_specific_head,
        token_selector=build_token_selector(args) if args.rho else None,
        use_enc_aux_loss=args.use_enc_aux_loss,
        class_embed=class_embed,
        bbox_embed=bbox_embed,
        grad_checkpoint=args.grad_checkpoint,
    )

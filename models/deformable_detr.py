"""Deformable DETR detector: backbone -> input projections -> deformable transformer -> heads.

Also Efficient DETR and Sparse DETR, which are flags of the same detector.
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import Tensor, nn

from util.misc import NestedTensor, nested_tensor_from_tensor_list

from .backbone import Joiner, build_backbone
from .backbone_common import masked_map
from .criterion import SetCriterion, build_weight_dict, output_group_suffixes
from .deformable_transformer import DeformableTransformer, build_deformable_transformer
from .heads import MLP, PostProcess, prediction_dict, refine_box_logits
from .matcher import build_matcher
from .token_selection import RULES


def deformable_heads(*, hidden_dim: int, num_classes: int, num_decoder_layers: int, two_stage: bool,
                     num_encoder_heads: int, independent: bool) -> tuple[nn.ModuleList, nn.ModuleList]:
    """The class heads (Linear) and box heads (3-layer MLP) of the Deformable DETR family.

    In order: one per decoder layer, then the two-stage proposal head, then ``num_encoder_heads``
    (encoder auxiliary loss). ``independent``: separate copies of one initialisation (box
    refinement, encoder auxiliary loss), else one module shared by every entry.
    """
    class_embed = nn.Linear(hidden_dim, num_classes)
    bbox_embed = MLP(input_dim=hidden_dim, hidden_dim=hidden_dim, output_dim=4, num_layers=3)
    # Focal-loss prior: every class starts at probability 0.01; boxes start at the reference.
    nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))
    nn.init.constant_(bbox_embed.layers[-1].weight, 0.0)
    nn.init.constant_(bbox_embed.layers[-1].bias, 0.0)
    num_heads = num_decoder_layers + int(two_stage) + num_encoder_heads
    if independent:
        class_embeds = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_heads))
        bbox_embeds = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_heads))
    else:
        class_embeds = nn.ModuleList(class_embed for _ in range(num_heads))
        bbox_embeds = nn.ModuleList(bbox_embed for _ in range(num_heads))
    # The first head (all of them when shared) regresses from the learned queries' points, which have no
    # size: a size logit of -2 starts boxes at ~0.12 x 0.12. Two-stage references are boxes; 0 keeps them.
    with torch.no_grad():
        bbox_embeds[0].layers[-1].bias[2:] = 0.0 if two_stage else -2.0
    return class_embeds, bbox_embeds


class DeformableDETR(nn.Module):
    """Deformable DETR and its variants (the variant flags live on the transformer).

    ``class_embed`` / ``bbox_embed`` (see :func:`deformable_heads`): one head per decoder layer, then
    the two-stage proposal head, then one per encoder layer but the last (encoder auxiliary loss).
    The transformer holds the heads it uses too: the same modules, which is also how the official
    checkpoints store them (``transformer.decoder.class_embed.*`` next to ``class_embed.*``).
    """

    def __init__(self, *, backbone: Joiner, transformer: DeformableTransformer, class_embed: nn.ModuleList,
                 bbox_embed: nn.ModuleList, num_queries: int, num_feature_levels: int, aux_loss: bool = True):
        super().__init__()
        num_heads = (transformer.decoder.num_layers + int(transformer.two_stage)
                     + (transformer.encoder.num_layers - 1 if transformer.use_enc_aux_loss else 0))
        if len(class_embed) != num_heads or len(bbox_embed) != num_heads:
            raise ValueError(f"this transformer needs {num_heads} class and box heads, got {len(class_embed)} and "
                             f"{len(bbox_embed)}")
        hidden_dim = transformer.d_model
        self.transformer = transformer
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.aux_loss = aux_loss
        # Registered after the transformer: the reference's state-dict order.
        self.class_embed = class_embed
        self.bbox_embed = bbox_embed
        if not transformer.two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        # C3-C5 by 1x1 convs, further levels by stride-2 3x3 convs on C5 then on the previous level.
        projections = [nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim))
                       for c in backbone.num_channels[:num_feature_levels]]
        in_channels = backbone.num_channels[-1]
        for _ in range(num_feature_levels - len(projections)):
            projections.append(nn.Sequential(nn.Conv2d(in_channels, hidden_dim, kernel_size=3, stride=2, padding=1),
                                             nn.GroupNorm(32, hidden_dim)))
            in_channels = hidden_dim
        self.input_proj = nn.ModuleList(projections)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        self.backbone = backbone

    def feature_levels(self, samples: NestedTensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """The transformer's L input levels: maps [B, hidden, H_l, W_l], padding masks [B, H_l, W_l] and
        position encodings [B, hidden, H_l, W_l]; the backbone's maps, then strided convolutions."""
        features, pos = self.backbone(samples)
        srcs = [proj(f.tensors) for proj, f in zip(self.input_proj, features)]
        masks = [f.mask for f in features]
        for level in range(len(srcs), self.num_feature_levels):
            extra = masked_map(self.input_proj[level](features[-1].tensors if level == len(features) else srcs[-1]),
                               samples.mask)
            srcs.append(extra.tensors)
            masks.append(extra.mask)
            pos.append(self.backbone.position_encoding(extra))
        return srcs, masks, pos

    def forward(self, samples: NestedTensor | list[Tensor]) -> dict:
        """
        Args:
            samples: a NestedTensor (images [B, 3, H, W], mask [B, H, W] True on padding) or a list of
                     [3, H, W] images.

        Returns a dict (boxes are normalised cxcywh, relative to each image's unpadded size):
            pred_logits [B, Q, num_classes], pred_boxes [B, Q, 4]: the last decoder layer;
            aux_outputs: (with aux_loss) a list, one per decoder layer but the last, of the same two keys;
            enc_outputs: (two-stage) the proposal of every token, pred_logits [B, S, num_classes], pred_boxes [B, S, 4];
            aux_outputs_enc: (use_enc_aux_loss) one per encoder layer but the last, over the K kept
                tokens (all S without rho): pred_logits [B, K, num_classes], pred_boxes [B, K, 4];
            backbone_mask_prediction [B, S] (the rule's scores), backbone_topk_proposals [B, K], sparse_token_nums [B]
                and the token-selection rule's own outputs (e.g. backbone_outputs): (rho > 0, see
                models/token_selection.py);
            sampling_locations_dec [B, n_dec, Q, heads, L, P, 2], attn_weights_dec [B, n_dec, Q, heads, L, P],
            spatial_shapes [L, 2], level_start_index [L], mask_flatten [B, S]: what the DAM is made of.
        """
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(samples)
        srcs, masks, pos = self.feature_levels(samples)
        query_embed = None if self.transformer.two_stage else self.query_embed.weight
        t = self.transformer(srcs, masks, pos, query_embed)

        logits = [self.class_embed[level](hs) for level, hs in enumerate(t["hs"])]
        if self.transformer.with_box_refine:
            box_logits = t["box_logits"]  # the decoder's refinement ran these very heads
        else:
            box_logits = [refine_box_logits(self.bbox_embed[level](hs), t["init_reference"])
                          for level, hs in enumerate(t["hs"])]
        out = prediction_dict(logits, [b.sigmoid() for b in box_logits], self.aux_loss)
        if self.transformer.two_stage:
            out["enc_outputs"] = {"pred_logits": t["enc_outputs_class"],
                                  "pred_boxes": t["enc_outputs_coord_unact"].sigmoid()}
        if self.transformer.use_enc_aux_loss:
            out["aux_outputs_enc"] = [{"pred_logits": a, "pred_boxes": b}
                                      for a, b in zip(t["enc_aux_logits"], t["enc_aux_boxes"])]
        out.update(t.get("token_selection", {}))
        for key in ("sampling_locations_dec", "attn_weights_dec", "spatial_shapes", "level_start_index",
                    "mask_flatten"):
            out[key] = t[key]
        return out


def build_deformable_detr(args, *, load_backbone_weights: bool = True, with_criterion: bool = True
                          ) -> tuple[DeformableDETR, Optional[SetCriterion], dict[str, nn.Module]]:
    """The Deformable DETR family from parsed ``main.py`` arguments; no criterion with ``with_criterion=False``
    (then the loss flags are not read)."""
    backbone = build_backbone(args, load_weights=load_backbone_weights)
    num_encoder_heads = args.enc_layers - 1 if args.use_enc_aux_loss else 0
    class_embed, bbox_embed = deformable_heads(hidden_dim=args.hidden_dim, num_classes=args.num_classes,
                                               num_decoder_layers=args.dec_layers, two_stage=args.two_stage,
                                               num_encoder_heads=num_encoder_heads,
                                               independent=args.with_box_refine or args.use_enc_aux_loss)
    model = DeformableDETR(
        backbone=backbone,
        transformer=build_deformable_transformer(args, class_embed=class_embed, bbox_embed=bbox_embed),
        class_embed=class_embed,
        bbox_embed=bbox_embed,
        num_queries=args.num_queries,
        num_feature_levels=args.num_feature_levels,
        aux_loss=args.aux_loss,
    )
    if not with_criterion:
        return model, None, {"bbox": PostProcess(focal=True)}
    rule = RULES[args.token_selection] if args.rho else None
    suffixes = output_group_suffixes(num_decoder_layers=args.dec_layers, aux_loss=args.aux_loss,
                                     two_stage=args.two_stage, num_encoder_aux=num_encoder_heads,
                                     selection_groups=tuple(rule.MATCHED_GROUPS) if rule else ())
    weight_dict = build_weight_dict(suffixes, cls=args.cls_loss_coef, bbox=args.bbox_loss_coef,
                                    giou=args.giou_loss_coef, selection=rule.loss_weights(args) if rule else None)
    criterion = SetCriterion(num_classes=args.num_classes, matcher=build_matcher(args, focal=True),
                             weight_dict=weight_dict, focal=True, focal_alpha=args.focal_alpha,
                             class_specific_proposals=args.eff_specific_head, token_selection=rule)
    return model, criterion, {"bbox": PostProcess(focal=True)}

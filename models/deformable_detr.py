"""Deformable DETR detector: backbone -> input projections -> deformable transformer -> heads.

Also Efficient DETR and Sparse DETR, which are flags of the same detector.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from util.misc import NestedTensor, inverse_sigmoid, nested_tensor_from_tensor_list

from .backbone import Joiner, build_backbone
from .criterion import PostProcess, SetCriterion, build_weight_dict, output_group_suffixes
from .deformable_transformer import DeformableTransformer, build_deformable_transformer
from .matcher import build_matcher


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


@torch.no_grad()
def _init_size_bias(box_head: MLP, value: float) -> None:
    """Initial (w, h) logits of a box head: -2 gives boxes of ~0.12 x 0.12, 0 keeps proposal sizes."""
    box_head.layers[-1].bias[2:] = value


class DeformableDETR(nn.Module):
    """Deformable DETR and its variants (the variant flags live on the transformer).

    Heads, in order: one per decoder layer, then the two-stage proposal head, then one per encoder
    layer but the last (encoder auxiliary loss). They are independent copies with
    ``with_box_refine`` or ``use_enc_aux_loss`` and one shared module otherwise. The encoder and
    decoder hold references to the heads they use, which is also how the official checkpoints
    store them (``transformer.decoder.class_embed.*`` next to ``class_embed.*``).
    """

    def __init__(self, *, backbone: Joiner, transformer: DeformableTransformer, num_classes: int, num_queries: int,
                 num_feature_levels: int, aux_loss: bool = True, with_box_refine: bool = False):
        super().__init__()
        self.transformer = transformer
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        two_stage, enc_aux = transformer.two_stage, transformer.use_enc_aux_loss
        if two_stage and not with_box_refine:
            raise ValueError("a two-stage transformer needs with_box_refine=True: the decoder refines the proposals")
        hidden_dim = transformer.d_model

        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        # Focal-loss prior: every class starts at probability 0.01.
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.constant_(bbox_embed.layers[-1].weight, 0.0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0.0)
        num_dec, num_enc = transformer.decoder.num_layers, transformer.encoder.num_layers
        num_heads = num_dec + int(two_stage) + (num_enc - 1 if enc_aux else 0)
        if with_box_refine or enc_aux:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_heads))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_heads))
            _init_size_bias(self.bbox_embed[0], -2.0)
        else:
            _init_size_bias(bbox_embed, -2.0)
            self.class_embed = nn.ModuleList(class_embed for _ in range(num_heads))
            self.bbox_embed = nn.ModuleList(bbox_embed for _ in range(num_heads))
        # Attached in the reference's order (class, then box), which fixes the state-dict key order.
        if two_stage:
            transformer.decoder.class_embed = self.class_embed
        if with_box_refine:
            transformer.decoder.bbox_embed = self.bbox_embed
        if two_stage:
            for head in self.bbox_embed:
                _init_size_bias(head, 0.0)
        if enc_aux:
            transformer.encoder.class_embed = self.class_embed[num_heads - (num_enc - 1):]
            transformer.encoder.bbox_embed = self.bbox_embed[num_heads - (num_enc - 1):]
            for head in transformer.encoder.bbox_embed:
                _init_size_bias(head, 0.0)

        if not two_stage:
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
            backbone_mask_prediction [B, S], backbone_topk_proposals [B, K], sparse_token_nums [B]: (rho > 0);
            sampling_locations_dec [B, n_dec, Q, heads, L, P, 2], attn_weights_dec [B, n_dec, Q, heads, L, P],
            spatial_shapes [L, 2], level_start_index [L], mask_flatten [B, S]: what the DAM is made of.
        """
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(samples)
        features, pos = self.backbone(samples)
        srcs = [proj(f.tensors) for proj, f in zip(self.input_proj, features)]
        masks = [f.mask for f in features]
        for level in range(len(srcs), self.num_feature_levels):
            src = self.input_proj[level](features[-1].tensors if level == len(features) else srcs[-1])
            mask = F.interpolate(samples.mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
            srcs.append(src)
            masks.append(mask)
            pos.append(self.backbone.position_encoding(NestedTensor(src, mask)))

        query_embed = None if self.transformer.two_stage else self.query_embed.weight
        t = self.transformer(srcs, masks, pos, query_embed)

        logits, boxes = [], []
        references = [t["init_reference"], *t["inter_references"][:-1]]
        for level, (hs, reference) in enumerate(zip(t["hs"], references)):
            delta = self.bbox_embed[level](hs)
            reference = inverse_sigmoid(reference)
            if reference.shape[-1] == 4:
                coord = delta + reference
            else:
                coord = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            logits.append(self.class_embed[level](hs))
            boxes.append(coord.sigmoid())

        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        if self.transformer.two_stage:
            out["enc_outputs"] = {"pred_logits": t["enc_outputs_class"],
                                  "pred_boxes": t["enc_outputs_coord_unact"].sigmoid()}
        if self.transformer.use_enc_aux_loss:
            out["aux_outputs_enc"] = [{"pred_logits": a, "pred_boxes": b}
                                      for a, b in zip(t["enc_aux_logits"], t["enc_aux_boxes"])]
        for key in ("backbone_mask_prediction", "backbone_topk_proposals", "sparse_token_nums",
                    "sampling_locations_dec", "attn_weights_dec", "spatial_shapes", "level_start_index",
                    "mask_flatten"):
            if key in t:
                out[key] = t[key]
        return out


def build_deformable_detr(args, *, load_backbone_weights: bool = True) -> tuple[DeformableDETR, SetCriterion, dict[str, nn.Module]]:
    """The Deformable DETR family from parsed ``main.py`` arguments."""
    model = DeformableDETR(
        backbone=build_backbone(args, load_weights=load_backbone_weights),
        transformer=build_deformable_transformer(args),
        num_classes=args.num_classes,
        num_queries=args.num_queries,
        num_feature_levels=args.num_feature_levels,
        aux_loss=args.aux_loss,
        with_box_refine=args.with_box_refine,
    )
    suffixes = output_group_suffixes(num_decoder_layers=args.dec_layers, aux_loss=args.aux_loss,
                                     two_stage=args.two_stage,
                                     num_encoder_aux=args.enc_layers - 1 if args.use_enc_aux_loss else 0)
    weight_dict = build_weight_dict(suffixes, cls=args.cls_loss_coef, bbox=args.bbox_loss_coef,
                                    giou=args.giou_loss_coef,
                                    mask_prediction=args.mask_prediction_coef if args.rho else None)
    criterion = SetCriterion(num_classes=args.num_classes, matcher=build_matcher(args), weight_dict=weight_dict,
                             focal=True, focal_alpha=args.focal_alpha,
                             class_specific_proposals=args.eff_specific_head, mask_prediction=bool(args.rho))
    return model, criterion, {"bbox": PostProcess(focal=True)}

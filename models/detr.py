"""DETR and SDETR (Stacked DETR): backbone -> 1x1 input projection -> DETR transformer -> heads.

Both classify with a softmax over ``num_classes + 1`` logits (the last is "no object") and
regress normalised (cx, cy, w, h) boxes with a 3-layer MLP and a sigmoid.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from util.misc import NestedTensor, nested_tensor_from_tensor_list

from .backbone import Joiner, build_backbone
from .criterion import SetCriterion, build_weight_dict, output_group_suffixes
from .heads import MLP, PostProcess, prediction_dict
from .matcher import build_matcher
from .transformer import Transformer, build_sdetr_transformers, build_transformer


def _as_nested(samples: NestedTensor | list[Tensor] | Tensor) -> NestedTensor:
    return samples if isinstance(samples, NestedTensor) else nested_tensor_from_tensor_list(list(samples))


class DETR(nn.Module):
    """DETR: the transformer runs on the backbone's last map (C5) with ``num_queries`` learned queries.

    Module names follow the reference (``transformer``, ``class_embed``, ``bbox_embed``,
    ``query_embed``, ``input_proj``, ``backbone``) so that its checkpoints load strictly.
    """

    def __init__(self, *, backbone: Joiner, transformer: Transformer, num_classes: int, num_queries: int,
                 aux_loss: bool = True):
        super().__init__()
        hidden_dim = transformer.d_model
        self.num_queries = num_queries
        self.transformer = transformer
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(input_dim=hidden_dim, hidden_dim=hidden_dim, output_dim=4, num_layers=3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels[-1], hidden_dim, kernel_size=1)
        self.backbone = backbone
        self.aux_loss = aux_loss

    def forward(self, samples: NestedTensor | list[Tensor]) -> dict:
        """
        Args:
            samples: a NestedTensor (images [B, 3, H, W], mask [B, H, W] True on padding) or a list of
                     [3, H, W] images.

        Returns a dict (boxes normalised cxcywh, relative to each image's unpadded size):
            pred_logits [B, Q, num_classes + 1], pred_boxes [B, Q, 4]: the last decoder layer;
            aux_outputs: (with aux_loss) one dict of the same two keys per decoder layer but the last.
        """
        features, pos = self.backbone(_as_nested(samples))
        src, mask = features[-1].tensors, features[-1].mask
        hs = self.transformer(self.input_proj(src), mask, self.query_embed.weight, pos[-1])[0]
        return prediction_dict(self.class_embed(hs), self.bbox_embed(hs).sigmoid(), self.aux_loss)


class SDETR(nn.Module):
    """SDETR (Stacked DETR): two DETR transformers in sequence.

    Stage 1 (``mytransformer1``, ``input_proj1``, ``query_embed1``) runs on C5 like DETR. Stage 2
    (``mytransformer2``, ``input_proj2``, ``query_embed2``) encodes C4 and its decoder starts from
    stage 1's last (normalised) decoder output instead of zeros, with its own query embeddings.
    The decoder outputs of both stages, stage 1 first, share one class and box head: the very last
    is the prediction, all others feed the auxiliary losses. Names are the reference's.
    """

    def __init__(self, *, backbone: Joiner, transformer1: Transformer, transformer2: Transformer, num_classes: int,
                 num_queries: int, aux_loss: bool = True):
        super().__init__()
        if len(backbone.num_channels) != 2:
            raise ValueError(f"SDETR needs a backbone returning C4 and C5, got {len(backbone.num_channels)} maps")
        if transformer1.d_model != transformer2.d_model:
            raise ValueError("both SDETR stages must have the same width")
        hidden_dim = transformer1.d_model
        self.num_queries = num_queries
        self.mytransformer1 = transformer1
        self.mytransformer2 = transformer2
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(input_dim=hidden_dim, hidden_dim=hidden_dim, output_dim=4, num_layers=3)
        self.query_embed1 = nn.Embedding(num_queries, hidden_dim)
        self.query_embed2 = nn.Embedding(num_queries, hidden_dim)
        c4_channels, c5_channels = backbone.num_channels
        self.input_proj1 = nn.Conv2d(c5_channels, hidden_dim, kernel_size=1)
        self.input_proj2 = nn.Conv2d(c4_channels, hidden_dim, kernel_size=1)
        self.backbone = backbone
        self.aux_loss = aux_loss

    @property
    def num_decoder_outputs(self) -> int:
        return self.mytransformer1.decoder.num_layers + self.mytransformer2.decoder.num_layers

    def forward(self, samples: NestedTensor | list[Tensor]) -> dict:
        """
        Args:
            samples: a NestedTensor (images [B, 3, H, W], mask [B, H, W] True on padding) or a list of
                     [3, H, W] images.

        Returns a dict (boxes normalised cxcywh, relative to each image's unpadded size):
            pred_logits [B, Q, num_classes + 1], pred_boxes [B, Q, 4]: stage 2's last decoder layer;
            aux_outputs: (with aux_loss) the other decoder layers, stage 1's then stage 2's
                (5 with the default 3 + 3 layers), each a dict of the same two keys.
        """
        (c4, c5), (pos4, pos5) = self.backbone(_as_nested(samples))
        hs1 = self.mytransformer1(self.input_proj1(c5.tensors), c5.mask, self.query_embed1.weight, pos5)[0]
        hs2 = self.mytransformer2(self.input_proj2(c4.tensors), c4.mask, self.query_embed2.weight, pos4,
                                  tgt=hs1[-1])[0]
        hs = torch.cat([hs1, hs2])
        return prediction_dict(self.class_embed(hs), self.bbox_embed(hs).sigmoid(), self.aux_loss)


def build_detr_criterion(args, *, num_decoder_outputs: int) -> SetCriterion:
    """DETR's and SDETR's criterion: softmax cross-entropy (no-object weight ``--eos_coef``) and box
    losses on each of the ``num_decoder_outputs`` decoder outputs (the last, and the others with aux loss)."""
    suffixes = output_group_suffixes(num_decoder_layers=num_decoder_outputs, aux_loss=args.aux_loss)
    weight_dict = build_weight_dict(suffixes, cls=args.cls_loss_coef, bbox=args.bbox_loss_coef,
                                    giou=args.giou_loss_coef)
    return SetCriterion(num_classes=args.num_classes, matcher=build_matcher(args, focal=False),
                        weight_dict=weight_dict, focal=False, eos_coef=args.eos_coef)


def build_detr(args, *, load_backbone_weights: bool = True, with_criterion: bool = True
               ) -> tuple[DETR, Optional[SetCriterion], dict[str, nn.Module]]:
    """DETR, its criterion (softmax cross-entropy, no-object weight ``--eos_coef``; None with
    ``with_criterion=False``) and post-processing."""
    transformer = build_transformer(args)
    model = DETR(backbone=build_backbone(args, load_weights=load_backbone_weights), transformer=transformer,
                 num_classes=args.num_classes, num_queries=args.num_queries, aux_loss=args.aux_loss)
    criterion = build_detr_criterion(args, num_decoder_outputs=transformer.decoder.num_layers) if with_criterion else None
    return model, criterion, {"bbox": PostProcess(focal=False)}


def build_sdetr(args, *, load_backbone_weights: bool = True, with_criterion: bool = True
                ) -> tuple[SDETR, Optional[SetCriterion], dict[str, nn.Module]]:
    """SDETR, its criterion (as DETR's, over all decoder outputs of both stages; None with
    ``with_criterion=False``) and post-processing."""
    transformer1, transformer2 = build_sdetr_transformers(args)
    model = SDETR(backbone=build_backbone(args, load_weights=load_backbone_weights), transformer1=transformer1,
                  transformer2=transformer2, num_classes=args.num_classes, num_queries=args.num_queries,
                  aux_loss=args.aux_loss)
    criterion = build_detr_criterion(args, num_decoder_outputs=model.num_decoder_outputs) if with_criterion else None
    return model, criterion, {"bbox": PostProcess(focal=False)}

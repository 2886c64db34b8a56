"""Token selection: the rule that chooses which tokens Sparse DETR's encoder updates (``--token_selection``).

A rule is a :class:`TokenSelector` subclass registered in :data:`RULES` under its ``name``. It owns
    - its parameters: the module, which the transformer registers as ``transformer.<STATE_NAME>``;
    - its scores for every token (:meth:`TokenSelector.forward`), and the outputs its loss needs;
    - the kept tokens: :meth:`TokenSelector.select` keeps the ``int(valid * rho) + 1`` best-scored valid tokens
      of each image (shared by every rule);
    - its loss terms: detection groups in :attr:`TokenSelector.MATCHED_GROUPS` (Hungarian-matched by the
      criterion like the two-stage proposals, weighted by --cls/bbox/giou_loss_coef as every group) and its own
      terms (:meth:`TokenSelector.losses`, weighted by :meth:`TokenSelector.loss_weights`).
The transformer, the encoder and the criterion call these and know no rule; the console line shows every loss
named ``loss_*`` without a layer suffix (``_0``, ``_enc``, ``_enc_0``), so a rule's terms appear there too.
docs/token_selection.md shows how to add a rule.

Tokens are the L feature levels flattened level after level: [B, S, C]. Boxes are normalised (cx, cy, w, h);
"unact" boxes are their logits.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dam import topk_token_targets
from .heads import MLP
from .ops import is_exporting

RULES: dict[str, type["TokenSelector"]] = {}


def register_rule(rule: type["TokenSelector"]) -> type["TokenSelector"]:
    """Class decorator: make ``rule`` a choice of ``--token_selection`` under ``rule.name``."""
    RULES[rule.name] = rule
    return rule


def build_token_selector(args) -> "TokenSelector":
    """The selector of ``--token_selection`` (``args.rho`` > 0)."""
    return RULES[args.token_selection].build(args)


def kept_counts(padding_mask: Tensor, rho: float) -> Tensor:
    """Tokens each image keeps: ``int(valid * rho) + 1`` of its valid (unpadded) tokens -> [B] int32.
    ``padding_mask`` [B, S] is True on padding."""
    return ((~padding_mask).sum(-1) * rho).int() + 1


def largest_kept_count(counts: Tensor, num_tokens: int) -> Any:
    """K = the batch's largest kept count, at most the ``num_tokens`` there are: a data-dependent size.
    While exporting it stays symbolic (the ONNX graph computes it from each image's valid tokens and
    TopK takes it as an input); the checks tell ``torch.export`` the bounds it may assume."""
    largest = counts.max()
    if not is_exporting():
        return min(int(largest), num_tokens)
    largest = largest.item()
    torch._check(largest >= 1)
    return torch.sym_min(largest, num_tokens)


class TokenSelector(nn.Module):
    """A token-selection rule. Subclasses set ``name`` and implement :meth:`build` and :meth:`forward`; the
    rest has defaults.

    Class attributes:
        name:           the ``--token_selection`` value.
        STATE_NAME:     where the transformer registers the module (its state-dict prefix is
                        ``transformer.<STATE_NAME>.``).
        SCORE_NAME:     what the scores are called in pictures (tools/visualize_sparsity.py).
        MATCHED_GROUPS: loss-name suffix -> output key of a detection group ``{"pred_logits" [B, N, K],
                        "pred_boxes" [B, N, 4]}`` that :meth:`forward` returns; the criterion matches each to the
                        targets with the labels of the two-stage proposals (all foreground, or the classes with
                        --eff_specific_head) and returns ``loss_ce<suffix>``, ``loss_bbox<suffix>``,
                        ``loss_giou<suffix>``, weighted as every other group.
    """

    name: ClassVar[str] = ""
    STATE_NAME: ClassVar[str] = "token_selector"
    SCORE_NAME: ClassVar[str] = "score"
    MATCHED_GROUPS: ClassVar[dict[str, str]] = {}

    def __init__(self, *, rho: float):
        super().__init__()
        if not 0.0 < rho <= 1.0:
            raise ValueError(f"a token selector keeps a fraction rho in (0, 1] of the tokens, got {rho}")
        self.rho = rho

    @classmethod
    def build(cls, args) -> "TokenSelector":
        """The rule's module from main.py's parsed flags (``args.rho``, ``args.hidden_dim``, ...)."""
        raise NotImplementedError(f"token selection rule {cls.name!r} has no build(args)")

    @classmethod
    def loss_weights(cls, args) -> dict[str, float]:
        """Weights of the terms :meth:`losses` returns, by name, from the parsed flags (metrics are left out)."""
        return {}

    def reset_parameters(self) -> None:
        """Called after the transformer's xavier initialisation of every matrix (the rule's too): a rule
        that needs another initialisation sets it here."""

    def forward(self, features: Tensor, proposals_unact: Tensor) -> dict[str, Any]:
        """
        Args:
            features:        [B, S, C] every backbone token plus its position encoding, through the two-stage
                             projection (``enc_output`` + LayerNorm), zero on padding and near the border first.
            proposals_unact: [B, S, 4] every token's proposal box (logits; inf on padding and near the border).

        Returns ``scores`` [B, S] (higher is kept first; padding is excluded later) and the outputs the rule's
        loss needs, which become outputs of the detector under their keys.
        """
        raise NotImplementedError(f"token selection rule {self.name!r} has no forward")

    def select(self, scored: dict[str, Any], padding_mask: Tensor) -> dict[str, Any]:
        """The kept tokens of :meth:`forward`'s ``scored`` outputs; ``padding_mask`` [B, S] True on padding.

        Returns the detector's selection outputs: ``backbone_mask_prediction`` [B, S] (the scores, padding at
        their minimum, as the reference), ``backbone_topk_proposals`` [B, K] (the kept tokens, best first, K the
        batch's largest count), ``sparse_token_nums`` [B] int32 (each image's own count), and the rule's other
        outputs.
        """
        scores = scored["scores"]
        counts = kept_counts(padding_mask, self.rho)
        num_kept = largest_kept_count(counts, scores.shape[1])
        # Padding never wins a place (-inf, where the reference's minimum could tie with a valid token).
        kept_index = torch.topk(scores.masked_fill(padding_mask, float("-inf")), num_kept, dim=1)[1]
        return {"backbone_mask_prediction": scores.masked_fill(padding_mask, scores.min()),
                "backbone_topk_proposals": kept_index, "sparse_token_nums": counts,
                **{key: value for key, value in scored.items() if key != "scores"}}

    @staticmethod
    def losses(outputs: dict[str, Any], dam: Tensor) -> dict[str, Tensor]:
        """The rule's own loss terms (``loss_*``, weighted by :meth:`loss_weights`) and metrics, from the
        detector's ``outputs`` and ``dam`` [B, S], the decoder attention map (no gradient)."""
        return {}


@register_rule
class DamSelector(TokenSelector):
    """Sparse DETR's rule: a scoring network trained to predict the tokens the decoder attends to most (its
    DAM). One saliency logit per token, from the token and the image mean: half of the hidden features are
    averaged over all tokens of the image (padding included, as the reference) to give every token global
    context. Loss: ``loss_mask_prediction`` (--mask_prediction_coef)."""

    name = "dam"
    STATE_NAME = "enc_mask_predictor"  # the official checkpoints' keys
    SCORE_NAME = "saliency"

    def __init__(self, *, rho: float, in_dim: int, hidden_dim: int):
        super().__init__(rho=rho)
        self.hidden_dim = hidden_dim
        self.layer1 = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden_dim), nn.GELU())
        self.layer2 = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim // 2), nn.GELU(),
            nn.Linear(hidden_dim // 2, hidden_dim // 4), nn.GELU(),
            nn.Linear(hidden_dim // 4, 1),
        )

    @classmethod
    def build(cls, args) -> "DamSelector":
        return cls(rho=args.rho, in_dim=args.hidden_dim, hidden_dim=args.hidden_dim)

    @classmethod
    def loss_weights(cls, args) -> dict[str, float]:
        return {"loss_mask_prediction": args.mask_prediction_coef}

    def forward(self, features: Tensor, proposals_unact: Tensor) -> dict[str, Any]:
        z = self.layer1(features)
        z_local, z_global = z.split(self.hidden_dim // 2, dim=-1)
        z_global = z_global.mean(dim=1, keepdim=True).expand_as(z_local)
        return {"scores": self.layer2(torch.cat([z_local, z_global], dim=-1)).squeeze(-1)}

    @staticmethod
    def losses(outputs: dict[str, Any], dam: Tensor) -> dict[str, Tensor]:
        """The scoring network's logits against the top tokens of the DAM (each image's own count)."""
        with torch.no_grad():
            target = topk_token_targets(dam, outputs["mask_flatten"], outputs["sparse_token_nums"])
        prediction = outputs["backbone_mask_prediction"]
        return {"loss_mask_prediction": F.multilabel_soft_margin_loss(prediction, target.to(prediction.dtype))}


@register_rule
class ObjectnessSelector(TokenSelector):
    """The paper's objectness-score (OS) baseline: a detection head on the backbone tokens keeps the tokens it
    finds most object-like. Its outputs are the ``_backbone`` group (``backbone_outputs``), one box per token,
    Hungarian-matched with the labels of the two-stage proposals: one foreground class, or the
    ``num_classes`` classes with ``class_specific`` (--eff_specific_head), whose best logit is the score."""

    name = "objectness"
    SCORE_NAME = "objectness"
    MATCHED_GROUPS = {"_backbone": "backbone_outputs"}

    def __init__(self, *, rho: float, d_model: int, num_classes: int, class_specific: bool):
        super().__init__(rho=rho)
        self.score_head = nn.Linear(d_model, num_classes if class_specific else 1)
        self.box_head = MLP(input_dim=d_model, hidden_dim=d_model, output_dim=4, num_layers=3)

    @classmethod
    def build(cls, args) -> "ObjectnessSelector":
        return cls(rho=args.rho, d_model=args.hidden_dim, num_classes=args.num_classes,
                   class_specific=args.eff_specific_head)

    def reset_parameters(self) -> None:
        # As the detector's heads: every class starts at probability 0.01 (focal prior), boxes at the proposals.
        nn.init.constant_(self.score_head.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.constant_(self.box_head.layers[-1].weight, 0.0)
        nn.init.constant_(self.box_head.layers[-1].bias, 0.0)

    def forward(self, features: Tensor, proposals_unact: Tensor) -> dict[str, Any]:
        logits = self.score_head(features)
        boxes = (proposals_unact + self.box_head(features)).sigmoid()
        return {"scores": logits.max(-1)[0], "backbone_outputs": {"pred_logits": logits, "pred_boxes": boxes}}

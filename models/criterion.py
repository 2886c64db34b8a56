"""Set-prediction losses: Hungarian matching, then classification and box losses per output group.

Output groups and the suffix of their loss names:
    ""         the last decoder layer (``pred_logits`` / ``pred_boxes`` of the outputs)
    "_{i}"     decoder layer i (``aux_outputs[i]``), i < n_dec - 1
    "_enc"     two-stage proposals (``enc_outputs``), matched class-agnostically unless class-specific
    "_enc_{i}" encoder layer i auxiliary heads (``aux_outputs_enc[i]``), i < n_enc - 1
    other      the groups of the token-selection rule (``TokenSelector.MATCHED_GROUPS``, e.g. "_backbone"),
               matched as the two-stage proposals
With a token-selection rule (Sparse DETR) the criterion adds the rule's own terms (``TokenSelector.losses``) and
the DAM coverage of the kept tokens (``corr_*``), whatever the rule.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from util import box_ops
from util.misc import accuracy, get_world_size, is_dist_avail_and_initialized

from .dam import attention_map_to_token_grid, dam_coverage
from .matcher import HungarianMatcher
from .token_selection import TokenSelector

BOX_LOSSES = ("loss_ce", "loss_bbox", "loss_giou")


def output_group_suffixes(*, num_decoder_layers: int, aux_loss: bool, two_stage: bool = False,
                          num_encoder_aux: int = 0, selection_groups: tuple[str, ...] = ()) -> list[str]:
    """Suffixes of the output groups a model produces (see the module docstring); ``selection_groups``: those of
    its token-selection rule (``TokenSelector.MATCHED_GROUPS``)."""
    suffixes = [""]
    if aux_loss:
        suffixes += [f"_{i}" for i in range(num_decoder_layers - 1)]
    if two_stage:
        suffixes.append("_enc")
    suffixes += list(selection_groups)
    suffixes += [f"_enc_{i}" for i in range(num_encoder_aux)]
    return suffixes


def build_weight_dict(suffixes: list[str], *, cls: float, bbox: float, giou: float,
                      selection: Optional[dict[str, float]] = None) -> dict[str, float]:
    """Weights of every loss the criterion returns for these groups, then of the token-selection rule's own
    terms (``selection``: ``TokenSelector.loss_weights``); metrics are not weighted."""
    weights = {f"{name}{suffix}": coef for suffix in suffixes
               for name, coef in zip(BOX_LOSSES, (cls, bbox, giou))}
    weights.update(selection or {})
    return weights


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, num_boxes: float, alpha: float = 0.25,
                       gamma: float = 2.0) -> Tensor:
    """Focal loss (RetinaNet) on [B, Q, C] logits and one-hot targets, mean over queries, sum / num_boxes."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_boxes


class SetCriterion(nn.Module):
    """Losses of the Deformable DETR family (sigmoid focal classification) and of DETR (softmax
    cross-entropy with a down-weighted no-object class, ``focal=False``).

    ``weight_dict`` names every loss returned and its weight; the total loss is
    ``sum(losses[k] * weight_dict[k] for k in weight_dict)``. Keys not in it (``class_error``,
    ``cardinality_error*``, ``corr_*``) are metrics, computed without gradient. ``token_selection``: the rule
    class of a Sparse DETR model (its matched groups and own terms; ``models/token_selection.py``).
    """

    def __init__(self, *, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 focal: bool = True, focal_alpha: float = 0.25, eos_coef: float = 0.1,
                 class_specific_proposals: bool = False, token_selection: Optional[type[TokenSelector]] = None):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.focal = focal
        self.focal_alpha = focal_alpha
        self.class_specific_proposals = class_specific_proposals
        self.token_selection = token_selection
        if not focal:
            empty_weight = torch.ones(num_classes + 1)
            empty_weight[-1] = eos_coef
            self.register_buffer("empty_weight", empty_weight)

    # -- single losses; ``matched`` is (batch index, prediction index, target labels, target boxes)
    def loss_labels(self, outputs: dict, matched: tuple, num_boxes: float, log: bool) -> dict[str, Tensor]:
        logits = outputs["pred_logits"]
        batch_idx, pred_idx, target_labels, _ = matched
        if self.focal:
            onehot = torch.zeros_like(logits)
            onehot[batch_idx, pred_idx, target_labels] = 1
            loss = sigmoid_focal_loss(logits, onehot, num_boxes, alpha=self.focal_alpha) * logits.shape[1]
        else:
            target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
            target_classes[batch_idx, pred_idx] = target_labels
            # Flattened to [B*Q, C]: CUDA's [B, C, Q] form (nll_loss2d) has no deterministic implementation.
            loss = F.cross_entropy(logits.flatten(0, 1), target_classes.flatten(), self.empty_weight.to(logits.dtype))
        losses = {"loss_ce": loss}
        if log:
            losses["class_error"] = 100 - accuracy(logits[batch_idx, pred_idx], target_labels)[0]
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """|number of predictions whose argmax is not the last class - number of targets|, batch mean."""
        logits = outputs["pred_logits"]
        num_targets = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device, dtype=torch.float)
        num_predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
        return {"cardinality_error": F.l1_loss(num_predicted, num_targets)}

    def loss_boxes(self, outputs: dict, matched: tuple, num_boxes: float) -> dict[str, Tensor]:
        batch_idx, pred_idx, _, target_boxes = matched
        pred_boxes = outputs["pred_boxes"][batch_idx, pred_idx]
        giou = torch.diag(box_ops.generalized_box_iou(box_ops.box_cxcywh_to_xyxy(pred_boxes),
                                                      box_ops.box_cxcywh_to_xyxy(target_boxes)))
        return {"loss_bbox": F.l1_loss(pred_boxes, target_boxes, reduction="sum") / num_boxes,
                "loss_giou": (1 - giou).sum() / num_boxes}

    def loss_token_selection(self, outputs: dict) -> dict[str, Tensor]:
        """Sparse DETR: the rule's own terms, then how much of the decoder attention map (DAM) falls on the kept
        tokens (``corr_mask_attn_map_dec_all``, then per level ``_0``, ``_1``, ...): the paper's measure for
        comparing rules."""
        with torch.no_grad():
            dam = attention_map_to_token_grid(outputs["spatial_shapes"], outputs["level_start_index"],
                                              outputs["sampling_locations_dec"], outputs["attn_weights_dec"])
            coverage = dam_coverage(outputs["backbone_topk_proposals"], dam, outputs["spatial_shapes"])
        losses = self.token_selection.losses(outputs, dam)
        losses["corr_mask_attn_map_dec_all"] = coverage[0].mean()
        losses.update({f"corr_mask_attn_map_dec_{level}": c.mean() for level, c in enumerate(coverage[1:])})
        return losses

    # -- groups
    def output_groups(self, outputs: dict, targets: list[dict]):
        """Yield (suffix, group outputs, group targets) for every output group present."""
        yield "", outputs, targets
        for i, group in enumerate(outputs.get("aux_outputs", [])):
            yield f"_{i}", group, targets
        # Proposals are class-agnostic (all targets are class 0) unless the head is class-specific.
        proposal_targets = targets if self.class_specific_proposals else [
            {**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
        if "enc_outputs" in outputs:
            yield "_enc", outputs["enc_outputs"], proposal_targets
        if self.token_selection is not None:
            for suffix, key in self.token_selection.MATCHED_GROUPS.items():
                yield suffix, outputs[key], proposal_targets
        for i, group in enumerate(outputs.get("aux_outputs_enc", [])):
            yield f"_enc_{i}", group, targets

    def num_boxes(self, targets: list[dict], device: torch.device) -> float:
        """Targets per process averaged over processes (at least 1): the loss normaliser."""
        num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        if is_dist_avail_and_initialized():
            torch.distributed.all_reduce(num_boxes)
        return torch.clamp(num_boxes / get_world_size(), min=1).item()

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """
        Args:
            outputs: the model's output dict.
            targets: B dicts with ``labels`` [M_i] int64 and ``boxes`` [M_i, 4] normalised cxcywh.

        Returns every loss of ``weight_dict`` plus the logged metrics, unweighted.
        """
        num_boxes = self.num_boxes(targets, outputs["pred_logits"].device)
        losses = {}
        for suffix, group, group_targets in self.output_groups(outputs, targets):
            indices = self.matcher(group, group_targets)
            device = group["pred_logits"].device
            batch_idx = torch.cat([torch.full_like(pred, i) for i, (pred, _) in enumerate(indices)]).to(device)
            pred_idx = torch.cat([pred for pred, _ in indices]).to(device)
            target_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(group_targets, indices)])
            target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(group_targets, indices)])
            matched = (batch_idx, pred_idx, target_labels, target_boxes)
            group_losses = self.loss_labels(group, matched, num_boxes, log=suffix == "")
            group_losses.update(self.loss_boxes(group, matched, num_boxes))
            group_losses.update(self.loss_cardinality(group, group_targets))
            losses.update({f"{name}{suffix}": value for name, value in group_losses.items()})
        if self.token_selection is not None:
            losses.update(self.loss_token_selection(outputs))
        return losses

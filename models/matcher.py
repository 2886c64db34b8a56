"""Hungarian matching between predictions and targets."""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """One-to-one assignment of targets to predictions minimising

        cost_class * class cost + cost_bbox * L1(boxes) - cost_giou * GIoU(boxes).

    The class cost is the focal-loss difference (pos - neg, alpha 0.25, gamma 2) of sigmoid
    probabilities when ``focal`` (the Deformable family), else minus the softmax probability (DETR).
    Unmatched predictions are "no object".
    """

    def __init__(self, *, cost_class: float = 1.0, cost_bbox: float = 1.0, cost_giou: float = 1.0,
                 focal: bool = True, focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("matcher costs cannot all be 0: set --set_cost_class, --set_cost_bbox or --set_cost_giou")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal = focal
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def class_cost(self, logits: Tensor, target_labels: Tensor) -> Tensor:
        """[N, C] logits, [M] labels -> [N, M] classification cost."""
        if not self.focal:
            return -logits.softmax(-1)[:, target_labels]
        prob = logits.sigmoid()
        alpha, gamma = self.focal_alpha, self.focal_gamma
        neg = (1 - alpha) * prob ** gamma * -(1 - prob + 1e-8).log()
        pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        return pos[:, target_labels] - neg[:, target_labels]

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """
        Args:
            outputs: ``pred_logits`` [B, Q, C] and ``pred_boxes`` [B, Q, 4] (normalised cxcywh).
            targets: B dicts with ``labels`` [M_i] and ``boxes`` [M_i, 4] (normalised cxcywh).

        Returns:
            B pairs ``(prediction indices, target indices)``, int64 tensors of length min(Q, M_i).
        """
        batch, num_queries = outputs["pred_logits"].shape[:2]
        sizes = [len(t["boxes"]) for t in targets]
        if sum(sizes) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [(empty, empty) for _ in targets]
        # Costs of every prediction against every target of the batch at once; split per image below.
        logits = outputs["pred_logits"].flatten(0, 1)
        pred_boxes = outputs["pred_boxes"].flatten(0, 1)
        target_labels = torch.cat([t["labels"] for t in targets])
        target_boxes = torch.cat([t["boxes"] for t in targets])
        cost = (self.cost_bbox * torch.cdist(pred_boxes, target_boxes, p=1)
                + self.cost_class * self.class_cost(logits, target_labels)
                - self.cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(target_boxes)))
        cost = cost.view(batch, num_queries, -1).cpu()
        indices = []
        for i, image_cost in enumerate(cost.split(sizes, -1)):
            pred_idx, target_idx = linear_sum_assignment(image_cost[i])
            indices.append((torch.as_tensor(pred_idx, dtype=torch.int64), torch.as_tensor(target_idx, dtype=torch.int64)))
        return indices


def build_matcher(args, *, focal: bool) -> HungarianMatcher:
    """The matcher of the ``--set_cost_*`` weights; ``focal`` for the sigmoid classifiers (Deformable family)."""
    return HungarianMatcher(cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox, cost_giou=args.set_cost_giou,
                            focal=focal)

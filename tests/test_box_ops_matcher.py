"""Box utilities and the Hungarian matcher."""
import math

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from models.matcher import HungarianMatcher
from util import box_ops
from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


def test_box_conversions_round_trip():
    boxes = torch.rand(10, 4)
    torch.testing.assert_close(box_ops.box_xyxy_to_cxcywh(box_ops.box_cxcywh_to_xyxy(boxes)), boxes)


def test_generalized_iou_known_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0], [3.0, 3.0, 4.0, 4.0]])
    giou = box_ops.generalized_box_iou(a, b)
    # identical: 1; overlap 1 / union 7 in a 3x3 hull: 1/7 - 2/9; disjoint in a 4x4 hull: 0 - 11/16
    torch.testing.assert_close(giou, torch.tensor([[1.0, 1 / 7 - 2 / 9, -11 / 16]]))


def test_generalized_iou_rejects_degenerate_boxes():
    with pytest.raises(ValueError, match="degenerate"):
        box_ops.generalized_box_iou(torch.tensor([[1.0, 1.0, 0.0, 2.0]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))


def _random_batch(num_targets, num_queries=12, num_classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    outputs = {"pred_logits": torch.randn(len(num_targets), num_queries, num_classes, generator=g),
               "pred_boxes": torch.rand(len(num_targets), num_queries, 4, generator=g) * 0.5 + 0.2}
    targets = [{"labels": torch.randint(0, num_classes, (n,), generator=g),
                "boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.2} for n in num_targets]
    return outputs, targets


@pytest.mark.parametrize("focal", [True, False])
def test_matcher_batched_equals_per_image(focal):
    matcher = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2, focal=focal)
    outputs, targets = _random_batch([3, 0, 5, 1])
    batched = matcher(outputs, targets)
    for i, target in enumerate(targets):
        single = matcher({k: v[i:i + 1] for k, v in outputs.items()}, [target])[0]
        assert torch.equal(batched[i][0], single[0]) and torch.equal(batched[i][1], single[1])
        assert len(batched[i][0]) == len(target["labels"])


def test_matcher_all_images_empty():
    matcher = HungarianMatcher()
    outputs, targets = _random_batch([0, 0])
    assert all(len(p) == 0 and len(t) == 0 for p, t in matcher(outputs, targets))


def test_matcher_finds_the_obvious_assignment():
    matcher = HungarianMatcher(cost_class=0, cost_bbox=1, cost_giou=0)
    boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.3, 0.3]])
    outputs = {"pred_logits": torch.zeros(1, 3, 2), "pred_boxes": boxes[None]}
    targets = [{"labels": torch.tensor([0, 1]), "boxes": boxes[[2, 0]]}]
    pred, tgt = matcher(outputs, targets)[0]
    assert dict(zip(tgt.tolist(), pred.tolist())) == {0: 2, 1: 0}


def test_matcher_rejects_all_zero_costs():
    with pytest.raises(ValueError, match="cannot all be 0"):
        HungarianMatcher(cost_class=0, cost_bbox=0, cost_giou=0)


def _focal_class_cost_by_hand(p: float, alpha: float = 0.25, gamma: float = 2.0) -> float:
    """Deformable DETR's matching class cost for sigmoid probability ``p`` of the target's class: the focal
    loss of calling it positive minus that of calling it negative."""
    positive = alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
    negative = (1 - alpha) * p ** gamma * -math.log(1 - p + 1e-8)
    return positive - negative


def test_focal_class_cost_equals_the_formula():
    probabilities = torch.tensor([[0.5, 0.8, 0.1], [0.3, 0.95, 0.6]], dtype=torch.float64)
    logits = torch.logit(probabilities)
    cost = HungarianMatcher(focal=True).class_cost(logits, torch.tensor([2, 0, 1, 1]))
    expected = [[_focal_class_cost_by_hand(float(probabilities[q, c])) for c in (2, 0, 1, 1)] for q in range(2)]
    torch.testing.assert_close(cost, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-9)
    # At p = 0.5 both terms share (0.5^2 ln 2); only the (alpha, 1 - alpha) weights differ.
    assert cost[0, 1].item() == pytest.approx((0.25 - 0.75) * 0.25 * math.log(2), rel=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_matcher_minimises_the_total_cost_computed_by_hand(seed):
    """On random batches, the assignment minimises cost_class * focal cost + cost_bbox * L1 - cost_giou * GIoU
    with every pair's cost written out here."""
    outputs, targets = _random_batch([4, 3], num_queries=6, num_classes=3, seed=seed)
    matcher = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2, focal=True)
    for i, ((pred_idx, target_idx), target) in enumerate(zip(matcher(outputs, targets), targets)):
        probabilities = outputs["pred_logits"][i].sigmoid()
        cost = torch.zeros(len(probabilities), len(target["labels"]), dtype=torch.float64)
        for q in range(cost.shape[0]):
            for t, label in enumerate(target["labels"].tolist()):
                pred_box, target_box = outputs["pred_boxes"][i, q], target["boxes"][t]
                giou = generalized_box_iou(box_cxcywh_to_xyxy(pred_box[None]), box_cxcywh_to_xyxy(target_box[None]))
                cost[q, t] = (2 * _focal_class_cost_by_hand(float(probabilities[q, label]))
                              + 5 * float((pred_box - target_box).abs().sum()) - 2 * float(giou))
        best_rows, best_cols = linear_sum_assignment(cost.numpy())
        assert float(cost[pred_idx, target_idx].sum()) == pytest.approx(float(cost[best_rows, best_cols].sum()),
                                                                          rel=1e-5)

"""Box utilities and the Hungarian matcher."""
import pytest
import torch

from models.matcher import HungarianMatcher
from util import box_ops


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

"""Detections planted in place of a tiny untrained model's (whose AP is 0): built from the ground truth so that
every COCO number of the evaluation tests is a fraction strictly between 0 and 1.

Each non-crowd box j of an image is found once, shifted right by (j % 4) * 12% of its width (IoU 1, 0.79, 0.61,
0.47), with the next category every third box; each image also gets a small background detection and one of
category 0, which the synthetic dataset does not declare (the results file must leave it out)."""
from __future__ import annotations

import torch

from datasets.coco_eval import CocoEvaluator


def planted_detections(coco_gt, image_id: int) -> dict[str, torch.Tensor]:
    """``{"boxes": [K, 4] xyxy, "scores": [K], "labels": [K]}`` for ``image_id`` of ``coco_gt``."""
    cat_ids = sorted(coco_gt.getCatIds())
    boxes, scores, labels = [], [], []
    anns = sorted((a for a in coco_gt.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)), key=lambda a: a["id"])
    for j, ann in enumerate(anns):
        x, y, w, h = ann["bbox"]
        shift = (j % 4) * 0.12 * w
        label = ann["category_id"]
        if j % 3 == 2:
            label = cat_ids[(cat_ids.index(label) + 1) % len(cat_ids)]
        boxes.append([x + shift, y, x + shift + w, y + h])
        scores.append(0.9 - 0.07 * ((j + image_id) % 5))
        labels.append(label)
    boxes += [[0.0, 0.0, 5.0, 5.0], [1.0, 1.0, 9.0, 9.0]]
    scores += [0.5 + 0.1 * (image_id % 3), 0.95]
    labels += [cat_ids[image_id % len(cat_ids)], 0]
    return {"boxes": torch.tensor(boxes, dtype=torch.float64), "scores": torch.tensor(scores, dtype=torch.float64),
            "labels": torch.tensor(labels)}


ORIGINAL_UPDATE = CocoEvaluator.update


def planted_update(self: CocoEvaluator, predictions) -> None:
    """``CocoEvaluator.update`` with the planted detections of the images of ``predictions``."""
    ORIGINAL_UPDATE(self, {int(i): planted_detections(self.coco_gt, int(i)) for i in predictions})

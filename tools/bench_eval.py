#!/usr/bin/env python
"""Both COCO evaluation backends on the same synthetic detections: their times and their largest difference.

    python tools/bench_eval.py                     # 5,000 images, 80 classes, 100 detections each
    python tools/bench_eval.py --images 50         # a quick check (the tests run this size)

The set imitates COCO val2017 at the scale of a real evaluation: 640x480 images with 1 to 15 boxes of COCO's 80
category ids (non-contiguous, 1-90), box sides drawn log-uniformly from 4 to 450 pixels so every area range
(small < 32², medium, large > 96²) holds boxes, a crowd region on about one image in ten, and exactly
``--detections`` detections per image: jittered copies of the true boxes (some with a wrong class), and
background boxes, with random scores. Each backend runs ``datasets.coco_eval.CocoEvaluator`` from scratch
(its ground-truth index included) through the 12 stats, as an evaluation after an epoch does.

Prints one line per backend (its time, its AP / AR) and the largest absolute difference of the 12 stats and of
the per-class AP; exit status 1 when a difference is over ``--tolerance`` (1e-4). Time it on a quiet machine:
the numbers in docs/benchmarks.md say which one.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.coco import coco_from_dict  # noqa: E402
from datasets.coco_eval import BACKENDS, CocoEvaluator  # noqa: E402
from datasets.coco_names import COCO_CATEGORY_NAMES  # noqa: E402
from datasets.coco_results import per_class_ap  # noqa: E402

logger = logging.getLogger("bench_eval")

WIDTH, HEIGHT = 640, 480
MIN_SIDE, MAX_SIDE = 4.0, 450.0
CROWD_FRACTION = 0.1


def _random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    """``[n, 4]`` xywh boxes inside the image, sides log-uniform in [MIN_SIDE, MAX_SIDE] (every area range)."""
    sides = np.exp(rng.uniform(np.log(MIN_SIDE), np.log(MAX_SIDE), size=(n, 2)))
    sides = np.minimum(sides, [WIDTH - 1, HEIGHT - 1])
    corners = rng.uniform(0, 1, size=(n, 2)) * ([WIDTH, HEIGHT] - sides)
    return np.concatenate([corners, sides], axis=1)


def synthetic_set(num_images: int, detections_per_image: int = 100, seed: int = 0) -> tuple[dict, dict]:
    """``(ground truth, predictions)``: a COCO annotation dict and ``{image_id: {"boxes": [K, 4] xyxy pixels,
    "scores": [K], "labels": [K] category ids}}`` with K = ``detections_per_image``, as the model's
    post-processing gives them."""
    rng = np.random.default_rng(seed)
    cat_ids = np.array(sorted(COCO_CATEGORY_NAMES))
    images, annotations, predictions = [], [], {}
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": WIDTH, "height": HEIGHT})
        n = int(rng.integers(1, 16))
        boxes, labels = _random_boxes(rng, n), rng.choice(cat_ids, size=n)
        crowd = np.zeros(n, dtype=bool)
        crowd[0] = rng.uniform() < CROWD_FRACTION
        for box, label, is_crowd in zip(boxes, labels, crowd):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": [float(v) for v in box], "area": float(box[2] * box[3]),
                                "iscrowd": int(is_crowd)})
        # Detections: up to 3 jittered copies of each box (a fifth of them relabelled), then background.
        copies = min(detections_per_image, 3 * n)
        source = rng.integers(0, n, size=copies)
        jitter = rng.normal(0, 0.15, size=(copies, 4)) * np.repeat(boxes[source, 2:], 2, axis=0).reshape(copies, 4)
        found = boxes[source] + jitter
        found[:, 2:] = np.maximum(found[:, 2:], 1.0)
        found_labels = np.where(rng.uniform(size=copies) < 0.2, rng.choice(cat_ids, size=copies), labels[source])
        background = _random_boxes(rng, detections_per_image - copies)
        xywh = np.concatenate([found, background])
        predictions[image_id] = {
            "boxes": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
            "scores": np.concatenate([rng.uniform(0.2, 1.0, copies), rng.uniform(0.0, 0.6, len(background))]),
            "labels": np.concatenate([found_labels, rng.choice(cat_ids, size=len(background))]),
        }
    categories = [{"id": int(i), "name": COCO_CATEGORY_NAMES[int(i)], "supercategory": "object"} for i in cat_ids]
    return {"images": images, "annotations": annotations, "categories": categories}, predictions


def evaluate_with(backend: str, ground_truth: dict, predictions: dict) -> tuple[float, list[float], list[float]]:
    """``(seconds, 12 stats, per-class AP)`` of one backend, from a fresh evaluator to the summary."""
    coco_gt = coco_from_dict(ground_truth)
    start = time.perf_counter()
    evaluator = CocoEvaluator(coco_gt, backend=backend)
    evaluator.update(predictions)
    evaluator.summarize()
    seconds = time.perf_counter() - start
    per_class = [row["AP"] for row in per_class_ap(evaluator.coco_eval["bbox"], coco_gt)]
    return seconds, evaluator.stats, per_class


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000, help="images of the synthetic set")
    parser.add_argument("--detections", type=int, default=100, help="detections per image")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic set")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest difference that counts as equal")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS,
                        help="backends to run; the difference is taken against the first")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ground_truth, predictions = synthetic_set(args.images, args.detections, args.seed)
    crowd = sum(a["iscrowd"] for a in ground_truth["annotations"])
    logger.info("synthetic set: %d images, %d classes, %d boxes (%d crowd), %d detections per image",
                args.images, len(ground_truth["categories"]), len(ground_truth["annotations"]), crowd,
                args.detections)
    results = {name: evaluate_with(name, ground_truth, predictions) for name in args.backends}
    for name, (seconds, stats, _) in results.items():
        logger.info("%-17s %7.2f s   AP %.4f  AP50 %.4f  APs %.4f  APm %.4f  APl %.4f  AR100 %.4f", name, seconds,
                    stats[0], stats[1], stats[3], stats[4], stats[5], stats[8])
    first = results[args.backends[0]]
    worst = 0.0
    for name in args.backends[1:]:
        stats_diff = max(abs(a - b) for a, b in zip(first[1], results[name][1]))
        class_diff = max(abs(a - b) for a, b in zip(first[2], results[name][2]))
        worst = max(worst, stats_diff, class_diff)
        logger.info("largest difference %s vs %s: %.2e (12 stats), %.2e (per-class AP); %.1fx faster",
                    name, args.backends[0], stats_diff, class_diff, first[0] / max(results[name][0], 1e-9))
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())

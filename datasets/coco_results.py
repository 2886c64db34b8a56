"""What an evaluation leaves behind: per-class AP, the COCO results file, ``eval.pth`` and the evaluation JSON.

    per_class_ap(coco_eval, coco_gt)    AP and AP50 of each category, from pycocotools' precision array
    results_file(evaluator)             the detections as the COCO evaluation server takes them
    evaluation_record(evaluator, ...)   the JSON: 12 named stats, per-class AP, checkpoint, model, dataset
    save_evaluation / save_detections   the files (written whole or not at all)

The JSON holds fractions in [0, 1] as pycocotools gives them (the console shows percent); -1 means the
evaluated images hold no ground truth of that kind (no small box, say), not a score. It is plain JSON: the
standard library's ``json.load`` reads it.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from util.console import COCO_STAT_NAMES

from .coco_eval import CocoEvaluator

FORMAT_VERSION = 1
STATS_UNIT = "fractions in [0, 1]; -1: no ground truth of that kind among the evaluated images"


def per_class_ap(coco_eval: Any, coco_gt: Any) -> list[dict[str, Any]]:
    """AP (IoU .50:.95) and AP50 of every category of an accumulated pycocotools (or faster-coco-eval)
    ``COCOeval``, over all areas with up to 100 detections per image, as pycocotools' summary computes the
    overall AP: the mean of ``eval["precision"][T, R, k, area all, 100 dets]`` over its entries > -1 (-1 when
    there are none: no ground truth of the class among the evaluated images).

    Returns ``[{"category_id", "name", "AP", "AP50", "num_boxes"}]`` in category-id order; ``num_boxes``
    counts the non-crowd ground-truth boxes of the class in the evaluated images. The mean of the ``AP`` of
    the classes with ground truth is the overall AP."""
    params = coco_eval.params
    precision = np.asarray(coco_eval.eval["precision"])
    area, dets = list(params.areaRngLbl).index("all"), list(params.maxDets).index(max(params.maxDets))
    iou50 = int(np.argmin(np.abs(np.asarray(params.iouThrs) - 0.5)))
    boxes: dict[int, int] = {}
    for image_id in params.imgIds:
        for ann in coco_gt.imgToAnns.get(int(image_id), []):
            if not ann.get("iscrowd", 0):
                boxes[ann["category_id"]] = boxes.get(ann["category_id"], 0) + 1

    def mean(values: np.ndarray) -> float:
        valid = values[values > -1]
        return float(valid.mean()) if valid.size else -1.0

    rows = []
    for k, cat_id in enumerate(params.catIds):
        cat_id = int(cat_id)
        rows.append({"category_id": cat_id, "name": coco_gt.cats[cat_id].get("name", str(cat_id)),
                     "AP": mean(precision[:, :, k, area, dets]), "AP50": mean(precision[iou50, :, k, area, dets]),
                     "num_boxes": boxes.get(cat_id, 0)})
    return rows


def results_file(evaluator: CocoEvaluator) -> list[dict[str, Any]]:
    """The detections of ``evaluator`` as a COCO results file: ``[{"image_id", "category_id", "bbox": [x, y, w,
    h] pixels of the original image, "score"}]``, by image. The model's labels are the dataset's category ids
    (datasets/coco.py keeps them as they are), so they need no mapping back; a label that is no category of
    the dataset (a class the model was never shown) is left out, which changes no COCO number (the evaluation
    only scores the dataset's categories)."""
    declared = set(evaluator.coco_gt.getCatIds())
    return [det for det in evaluator.results if det["category_id"] in declared]


def dataset_description(dataset: Any, num_images: int) -> dict[str, Any]:
    """The JSON's ``dataset``: the annotation file, the image folder and the number of images evaluated."""
    return {"annotations": str(getattr(dataset, "ann_file", "")), "images": str(getattr(dataset, "img_folder", "")),
            "num_images": num_images}


def evaluation_record(evaluator: CocoEvaluator, *, checkpoint: Optional[str | Path], weights: str,
                      model: Mapping[str, Any], dataset: Mapping[str, Any],
                      epoch: Optional[int] = None) -> dict[str, Any]:
    """The evaluation JSON of an evaluated ``evaluator``: ``stats`` (the 12 COCO stats by name, AP first),
    ``per_class`` (:func:`per_class_ap`), the ``checkpoint`` evaluated (and its ``epoch`` in training),
    ``weights`` ("raw" or "ema": the moving average), ``model`` (its description), ``dataset``
    (:func:`dataset_description`) and the evaluation ``backend``."""
    stats = evaluator.stats
    coco_eval = evaluator.coco_eval[evaluator.iou_types[0]]
    return {
        "format_version": FORMAT_VERSION,
        "stats": dict(zip(COCO_STAT_NAMES, stats)),
        "stats_unit": STATS_UNIT,
        "per_class": per_class_ap(coco_eval, evaluator.coco_gt) if coco_eval.eval else [],
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "epoch": epoch,
        "weights": weights,
        "model": dict(model),
        "dataset": dict(dataset),
        "backend": evaluator.backend,
    }


def _write_atomically(path: Path, write) -> None:
    """``write(file object)`` into a temporary file next to ``path``, then rename it: a killed process never
    leaves a half-written ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any, *, indent: Optional[int] = 1) -> None:
    """``obj`` as JSON at ``path`` (atomically); ``indent=None``: compact (a results file is large)."""
    data = json.dumps(obj, indent=indent).encode()
    _write_atomically(Path(path), lambda f: f.write(data))


def save_eval_pth(path: Path, evaluator: CocoEvaluator) -> None:
    """The references' ``eval.pth``: ``torch.save`` of the pycocotools ``COCOeval.eval`` dict (``params``,
    ``counts``, ``date``, ``precision`` [T, R, K, A, M], ``recall`` [T, K, A, M], ``scores``), what their
    plotting scripts read (it pickles a pycocotools ``Params``, so reading it back needs an unrestricted load)."""
    evaluated = evaluator.coco_eval[evaluator.iou_types[0]].eval
    _write_atomically(Path(path), lambda f: torch.save(evaluated, f))


def save_evaluation(output_dir: Path, evaluator: CocoEvaluator, *, name: str, checkpoint: Optional[Path],
                    weights: str, model: Mapping[str, Any], dataset: Any, epoch: Optional[int] = None,
                    eval_pth: bool = False) -> Path:
    """Write ``output_dir``/<name>.json (:func:`evaluation_record`; ``dataset``: the
    evaluated Dataset) and with ``eval_pth`` the references' ``eval.pth``; returns the JSON's path."""
    record = evaluation_record(evaluator, checkpoint=checkpoint, weights=weights, model=model, epoch=epoch,
                               dataset=dataset_description(dataset, len(evaluator.img_ids)))
    path = output_dir / f"{name}.json"
    write_json(path, record)
    if eval_pth:
        save_eval_pth(output_dir / "eval.pth", evaluator)
    return path


def save_detections(path: Path, evaluator: CocoEvaluator) -> int:
    """Write the COCO results file of ``evaluator`` (:func:`results_file`) to ``path``;
    returns the number of detections."""
    results = results_file(evaluator)
    write_json(path, results, indent=None)
    return len(results)

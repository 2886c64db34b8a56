"""COCO box evaluation with pycocotools, usable with or without torch.distributed.

Usage::

    evaluator = CocoEvaluator(coco_gt)
    evaluator.update({image_id: {"scores": [K], "labels": [K], "boxes": [K, 4]}, ...})
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    evaluator.summarize()            # the usual 12-line table as text (logged at DEBUG)
    ap = evaluator.stats[0]          # AP@[.5:.95]
    evaluator.results                # every detection in the COCO results format, by image

``backend`` picks the implementation: ``"pycocotools"`` (the default, the references') or
``"faster_coco_eval"`` (the faster-coco-eval package's C++ evaluation, same 12 numbers to 1e-4 on the
synthetic COCO-sized set of tools/bench_eval.py; see docs/benchmarks.md).

``boxes`` are absolute xyxy pixels of the *original* image, ``labels`` are COCO category ids.
Only images passed to :meth:`update` are evaluated (an image with zero predictions still
counts, so its ground truth becomes misses). When those images hold no ground-truth box that COCO scores
(only crowd regions, say) every stat is -1; :meth:`summarize` then says so and what to check.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from util.errors import InputError
from util.misc import all_gather_object

logger = logging.getLogger(__name__)

NUM_STATS = 12
SUPPORTED_IOU_TYPES = ("bbox",)
BACKENDS = ("pycocotools", "faster_coco_eval")


def _quiet(fn: Callable[[], Any]) -> tuple[Any, str]:
    """Run ``fn`` with stdout captured; returns ``(result, captured text)``."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        result = fn()
    return result, buffer.getvalue()


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _faster_coco_eval() -> tuple[type, type]:
    """faster-coco-eval's ``(COCO, COCOeval_faster)``; InputError naming the install when it is missing."""
    try:
        from faster_coco_eval import COCO as FasterCOCO, COCOeval_faster
    except ImportError:
        raise InputError("--eval_backend faster_coco_eval needs the faster-coco-eval package: pip install "
                         "faster-coco-eval (or use the default --eval_backend pycocotools)") from None
    return FasterCOCO, COCOeval_faster


class CocoEvaluator:
    """Collects detections per image and evaluates them against ``coco_gt`` with ``backend`` (one of
    :data:`BACKENDS`)."""

    def __init__(self, coco_gt: COCO, iou_types: Sequence[str] = ("bbox",), *, backend: str = "pycocotools"):
        unknown = [t for t in iou_types if t not in SUPPORTED_IOU_TYPES]
        if unknown:
            raise ValueError(f"unsupported iou types {unknown}; supported: {SUPPORTED_IOU_TYPES}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown evaluation backend {backend!r}; choose one of {BACKENDS}")
        self.coco_gt = coco_gt
        self.iou_types = tuple(iou_types)
        self.backend = backend
        self._coco_class: type = COCO
        if backend == "pycocotools":
            self.coco_eval: dict[str, Any] = {t: COCOeval(coco_gt, iouType=t) for t in self.iou_types}
        else:  # its own index of the ground truth (a copy: its evaluation writes "ignore" into the annotations)
            self._coco_class, evaluator_class = _faster_coco_eval()
            gt = self._coco_class(copy.deepcopy(coco_gt.dataset), print_function=logger.debug)
            # print_function=print: its messages are captured and logged at DEBUG as pycocotools' are
            self.coco_eval = {t: evaluator_class(gt, iouType=t, print_function=print) for t in self.iou_types}
        # image id -> detections of that image in COCO result format (xywh boxes)
        self.detections: dict[int, list[dict]] = {}
        self._evaluated = False

    @property
    def img_ids(self) -> list[int]:
        """Sorted ids of the images seen so far."""
        return sorted(self.detections)

    @property
    def results(self) -> list[dict]:
        """Every detection in the COCO results format (``{"image_id", "category_id", "bbox": [x, y, w, h] in
        pixels of the original image, "score"}``), by image id, each image's in the order given."""
        return [det for image_id in self.img_ids for det in self.detections[image_id]]

    def update(self, predictions: Mapping[Any, Mapping[str, Any]]) -> None:
        """Add ``{image_id: {"scores": [K], "labels": [K], "boxes": [K, 4] abs xyxy}}``.

        A repeated image id replaces the earlier detections of that image.
        """
        for image_id, pred in predictions.items():
            image_id = int(image_id)
            if image_id not in self.coco_gt.imgs:
                raise ValueError(f"image id {image_id} is not in the ground truth")
            boxes = _to_numpy(pred["boxes"]).astype(np.float64).reshape(-1, 4)
            scores = _to_numpy(pred["scores"]).astype(np.float64).reshape(-1)
            labels = _to_numpy(pred["labels"]).astype(np.int64).reshape(-1)
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
            self.detections[image_id] = [
                {"image_id": image_id, "category_id": int(c), "bbox": [float(v) for v in b], "score": float(s)}
                for b, s, c in zip(xywh, scores, labels)
            ]
        self._evaluated = False

    def synchronize_between_processes(self) -> None:
        """Merge the detections of all processes (first copy wins for duplicated images)."""
        merged: dict[int, list[dict]] = {}
        for part in all_gather_object(self.detections):
            for image_id, dets in part.items():
                merged.setdefault(image_id, dets)
        self.detections = merged
        self._evaluated = False

    def _detections_as_coco(self) -> Any:
        """A result object of the backend (pycocotools' or faster-coco-eval's ``COCO``) holding every detection
        (an empty one when there are none)."""
        annotations = []
        for image_id in self.img_ids:
            for det in self.detections[image_id]:
                w, h = det["bbox"][2], det["bbox"][3]
                annotations.append({**det, "id": len(annotations) + 1, "area": w * h, "iscrowd": 0})
        coco_dt = self._coco_class()
        coco_dt.dataset = {
            "images": list(self.coco_gt.dataset.get("images", [])),
            "categories": copy.deepcopy(self.coco_gt.dataset.get("categories", [])),
            "annotations": annotations,
        }
        _quiet(coco_dt.createIndex)
        return coco_dt

    def accumulate(self) -> None:
        """Match detections to ground truth and accumulate precision/recall (pycocotools)."""
        img_ids = self.img_ids
        coco_dt = self._detections_as_coco() if img_ids else None
        for iou_type, coco_eval in self.coco_eval.items():
            coco_eval.stats = []
            if not img_ids:
                logger.warning("CocoEvaluator: no image was evaluated; %s stats are all -1", iou_type)
                coco_eval.eval = {}
                continue
            coco_eval.cocoDt = coco_dt
            coco_eval.params.imgIds = img_ids
            _, out = _quiet(coco_eval.evaluate)
            logger.debug("pycocotools evaluate: %s", out.strip())
            _, out = _quiet(coco_eval.accumulate)
            logger.debug("pycocotools accumulate: %s", out.strip())
        self._evaluated = True

    def _compute_stats(self) -> str:
        """Fill ``coco_eval[t].stats`` for every iou type; returns the pycocotools table text."""
        if not self._evaluated:
            self.accumulate()
        text, note = [], self.no_ground_truth_note()
        for iou_type, coco_eval in self.coco_eval.items():
            if not coco_eval.eval:
                coco_eval.stats = np.full(NUM_STATS, -1.0)
                out = "no images evaluated"
            else:
                _, out = _quiet(coco_eval.summarize)
                out = f"{out.rstrip()}\n{note}" if note else out
            text.append(f"IoU metric: {iou_type}\n{out.rstrip()}")
        return "\n".join(text)

    def no_ground_truth_note(self) -> str:
        """Why every stat is -1 when the evaluated images hold no ground-truth box that COCO scores (no
        annotation, or only crowd regions or undeclared categories), else "" (also when no image was evaluated:
        :meth:`accumulate` says so)."""
        if not self.img_ids:
            return ""
        cat_ids = set(self.coco_gt.getCatIds())
        annotations = [a for i in self.img_ids for a in self.coco_gt.imgToAnns.get(i, [])]
        scored = [a for a in annotations if a["category_id"] in cat_ids and not a.get("iscrowd", 0)]
        if scored:
            return ""
        crowd = sum(1 for a in annotations if a.get("iscrowd", 0))
        undeclared = sum(1 for a in annotations if a["category_id"] not in cat_ids)
        return (f"no ground-truth boxes to evaluate: the {len(self.img_ids)} evaluated images have "
                f"{len(annotations)} annotations ({crowd} crowd regions, {undeclared} of undeclared categories) and "
                "not one non-crowd box of a declared category, so every COCO stat is -1 (undefined, not a score). "
                'Check the val annotation file: its "annotations", their "iscrowd" and "category_id" values and '
                'its "categories" (tools/check_dataset.py reports crowd-only images)')

    def summarize(self) -> str:
        """Compute the 12 stats of each iou type; log the pycocotools table (DEBUG: the console shows the short
        one of ``util.console.ap_table``) and return it as text."""
        summary = self._compute_stats()
        logger.debug("%s", summary)
        note = self.no_ground_truth_note()
        if note:
            logger.warning("CocoEvaluator: %s", note)
        return summary

    @property
    def stats(self) -> list[float]:
        """The 12 COCO stats of the first iou type.

        Order: AP, AP50, AP75, AP small/medium/large, AR@1, AR@10, AR@100, AR small/medium/large.
        Computed (without logging) if :meth:`summarize` was not called; -1 marks "no ground truth".
        """
        coco_eval = self.coco_eval[self.iou_types[0]]
        if not self._evaluated or len(coco_eval.stats) == 0:
            self._compute_stats()
        return [float(v) for v in coco_eval.stats]

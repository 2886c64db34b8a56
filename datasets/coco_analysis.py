"""Where the AP of a COCO results file goes: the COCO analysis breakdown, a class confusion matrix, and the
errors of each image (tools/analyze_detections.py draws them).

The breakdown is the one of the COCO API's ``analyze()`` (Hoiem et al.'s diagnosis, as cocodataset.org shows
it): precision-recall curves at 100 detections per image over all areas, each one forgiving one more kind of
error than the last:

    C75  PR at IoU .75                    C50  PR at IoU .50
    Loc  PR at IoU .10 (localisation errors forgiven, duplicates still count)
    Sim  Loc, and detections on a box of another class of the same supercategory forgiven
    Oth  Loc, and detections on a box of any other class forgiven
    BG   Oth, and every false positive forgiven (background detections included): precision 1 up to the recall
         Oth reaches
    FN   every missed box forgiven too: precision 1 at every recall

"Forgiven" is done as the COCO API does: the other classes' boxes become crowd regions of the analysed class
for its evaluation, so a detection on one of them is ignored, neither a true nor a false positive.
A class without ground truth in the file has no curve and is left out of the means.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

ERROR_TYPES = ("C75", "C50", "Loc", "Sim", "Oth", "BG", "FN")
MAX_DETS = 100


def coco_from(dataset: dict) -> COCO:
    """A pycocotools ``COCO`` indexing ``dataset`` (its messages dropped)."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def results_as_coco(coco_gt: COCO, results: Sequence[dict]) -> COCO:
    """The detections of a COCO results file (``[{"image_id", "category_id", "bbox": xywh, "score"}]``) as a
    ``COCO``, as pycocotools' ``loadRes`` builds it."""
    with contextlib.redirect_stdout(io.StringIO()):
        return coco_gt.loadRes(list(results)) if results else coco_from(
            {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"], "annotations": []})


def _precision(coco_gt: COCO, coco_dt: COCO, iou_thrs: Sequence[float], cat_ids: Sequence[int]) -> np.ndarray:
    """pycocotools' precision ``[T, R, K]`` at IoU thresholds ``iou_thrs``, all areas, 100 detections."""
    evaluation = COCOeval(coco_gt, coco_dt, iouType="bbox")
    evaluation.params.iouThrs = np.asarray(iou_thrs, dtype=np.float64)
    evaluation.params.maxDets = [MAX_DETS]
    evaluation.params.areaRng = [[0, 1e10]]
    evaluation.params.areaRngLbl = ["all"]
    evaluation.params.catIds = list(cat_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation.evaluate()
        evaluation.accumulate()
    return evaluation.eval["precision"][:, :, :, 0, 0]


def _forgiving(coco_gt: COCO, cat_id: int, forgiven: set[int]) -> COCO:
    """The ground truth of ``cat_id`` alone plus the boxes of the ``forgiven`` classes as crowd regions of it."""
    annotations = [dict(a) for a in coco_gt.dataset["annotations"] if a["category_id"] == cat_id]
    annotations += [{**a, "category_id": cat_id, "iscrowd": 1} for a in coco_gt.dataset["annotations"]
                    if a["category_id"] in forgiven]
    return coco_from({"images": coco_gt.dataset["images"], "categories": [coco_gt.cats[cat_id]],
                      "annotations": annotations})


@dataclass
class Breakdown:
    """The analysis curves: ``precision[e, r, k]`` of error type ``ERROR_TYPES[e]`` at recall ``recall[r]``
    for class ``cat_ids[k]`` (the classes with ground truth, named ``names``)."""
    recall: np.ndarray
    precision: np.ndarray
    cat_ids: list[int]
    names: list[str]

    @property
    def ap(self) -> np.ndarray:
        """``[7, K]``: the area under each curve of each class (the mean precision over the recall points)."""
        return self.precision.mean(axis=1)

    @property
    def overall(self) -> np.ndarray:
        """``[7, R]``: each curve averaged over the classes."""
        return self.precision.mean(axis=2)

    def summary(self) -> dict[str, Any]:
        """The JSON of the breakdown: overall and per-class AP of each error type."""
        ap = self.ap
        return {"error_types": list(ERROR_TYPES),
                "overall": {e: float(v) for e, v in zip(ERROR_TYPES, ap.mean(axis=1))},
                "per_class": [{"category_id": c, "name": n, **{e: float(v) for e, v in zip(ERROR_TYPES, ap[:, k])}}
                              for k, (c, n) in enumerate(zip(self.cat_ids, self.names))]}


def error_breakdown(coco_gt: COCO, coco_dt: COCO) -> Breakdown:
    """The C75 ... FN curves (see the module docstring) of every class with ground truth."""
    scored = sorted({a["category_id"] for a in coco_gt.dataset["annotations"] if not a.get("iscrowd", 0)}
                    & set(coco_gt.getCatIds()))
    base = _precision(coco_gt, coco_dt, [0.75, 0.5, 0.1], scored)
    precision = np.zeros((len(ERROR_TYPES), base.shape[1], len(scored)))
    precision[:3] = base
    for k, cat_id in enumerate(scored):
        own = [a for a in coco_dt.dataset["annotations"] if a["category_id"] == cat_id]
        detections = coco_from({"images": coco_dt.dataset["images"], "categories": [coco_gt.cats[cat_id]],
                                "annotations": own})
        supercategory = coco_gt.cats[cat_id].get("supercategory")
        similar = {c for c, cat in coco_gt.cats.items() if c != cat_id and supercategory is not None
                   and cat.get("supercategory") == supercategory}
        others = set(coco_gt.cats) - {cat_id}
        for index, forgiven in ((3, similar), (4, others)):
            precision[index, :, k] = _precision(_forgiving(coco_gt, cat_id, forgiven), detections, [0.1],
                                                [cat_id])[0, :, 0]
    precision[precision < 0] = 0  # recall never reached: precision 0 there
    precision[5] = precision[4] > 0
    precision[6] = 1.0
    return Breakdown(np.linspace(0, 1, base.shape[1]), precision, scored,
                     [coco_gt.cats[c].get("name", str(c)) for c in scored])


def box_iou(a: np.ndarray, b: np.ndarray, *, crowd: np.ndarray | None = None) -> np.ndarray:
    """IoU ``[len(a), len(b)]`` of xywh boxes; against a crowd box of ``b`` (``crowd[j]``), as COCO does, the
    intersection over the area of the box of ``a``."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, :2] + a[:, None, 2:], b[None, :, :2] + b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a, area_b = a[:, 2] * a[:, 3], b[:, 2] * b[:, 3]
    union = area_a[:, None] + area_b[None, :] - inter
    if crowd is not None:
        union = np.where(np.asarray(crowd, dtype=bool)[None, :], area_a[:, None], union)
    return inter / np.maximum(union, 1e-12)


@dataclass
class ImageErrors:
    """One image's detections at a score threshold against its ground truth: ``matches`` (ground-truth
    annotation, detection) pairs at IoU >= the threshold, of the same class or not, ``background`` the
    detections on no box, ``missed`` the boxes no detection found."""
    image_id: int
    matches: list[tuple[dict, dict]]
    background: list[dict]
    missed: list[dict]

    @property
    def num_errors(self) -> int:
        """False positives (background, wrong class) plus boxes without a detection of their class."""
        wrong = sum(1 for gt, det in self.matches if gt["category_id"] != det["category_id"])
        return len(self.background) + len(self.missed) + 2 * wrong


def image_errors(coco_gt: COCO, coco_dt: COCO, image_id: int, *, score_threshold: float,
                 iou_threshold: float = 0.5) -> ImageErrors:
    """Greedy matching of ``image_id``'s detections scoring >= ``score_threshold``, highest score first, each
    to the unmatched box with which its IoU is >= ``iou_threshold``, one of its own class first, else the one
    it overlaps most. A detection on a crowd region (COCO's IoU) is ignored; crowd regions are never missed."""
    gts = coco_gt.imgToAnns.get(image_id, [])
    dets = sorted((d for d in coco_dt.imgToAnns.get(image_id, []) if d["score"] >= score_threshold),
                  key=lambda d: -d["score"])
    boxes = [g for g in gts if not g.get("iscrowd", 0)]
    crowds = [g for g in gts if g.get("iscrowd", 0)]
    iou = box_iou([d["bbox"] for d in dets], [g["bbox"] for g in boxes])
    crowd_iou = box_iou([d["bbox"] for d in dets], [g["bbox"] for g in crowds], crowd=np.ones(len(crowds)))
    taken: set[int] = set()
    matches, background = [], []
    for i, det in enumerate(dets):
        free = [j for j in range(len(boxes)) if j not in taken and iou[i, j] >= iou_threshold]
        same = [j for j in free if boxes[j]["category_id"] == det["category_id"]]
        if same or free:
            j = max(same or free, key=lambda j: iou[i, j])
            taken.add(j)
            matches.append((boxes[j], det))
        elif not (crowd_iou.shape[1] and crowd_iou[i].max() >= iou_threshold):
            background.append(det)
    missed = [g for j, g in enumerate(boxes) if j not in taken]
    return ImageErrors(image_id, matches, background, missed)


def confusion_matrix(errors: Sequence[ImageErrors], cat_ids: Sequence[int]) -> np.ndarray:
    """``[K + 1, K + 1]`` counts over ``errors``: row = the class of the box (last row: background, no box),
    column = the class detected on it (last column: missed, no detection); rows and columns in ``cat_ids``
    order."""
    index = {c: k for k, c in enumerate(cat_ids)}
    none = len(cat_ids)
    matrix = np.zeros((none + 1, none + 1), dtype=np.int64)
    for image in errors:
        for gt, det in image.matches:
            matrix[index.get(gt["category_id"], none), index.get(det["category_id"], none)] += 1
        for det in image.background:
            matrix[none, index.get(det["category_id"], none)] += 1
        for gt in image.missed:
            matrix[index.get(gt["category_id"], none), none] += 1
    return matrix

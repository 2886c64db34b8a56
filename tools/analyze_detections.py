#!/usr/bin/env python
"""Where the AP of a detector goes, in pictures: the COCO analysis breakdown, a confusion matrix of the classes,
and the worst images with their errors drawn.

    python main.py ... --eval --resume CKPT --output_dir ev --save_detections     # writes ev/detections_val.json
    python tools/analyze_detections.py ev/detections_val.json \\
        --annotations path/to/coco/annotations/instances_val2017.json --images path/to/coco/val2017 --out ev/analysis

Writes into ``--out``:

    breakdown.png     the PR curves of the COCO analysis (C75, C50, Loc, Sim, Oth, BG, FN; see
                      datasets/coco_analysis.py) over all classes, and per class the AP each error type costs
                      for the ``--classes`` classes that lose the most
    confusion.png     box class (rows, plus background) against detected class (columns, plus missed), of the
                      detections scoring >= ``--score_threshold`` matched at IoU >= 0.5, each row normalised
    worst_images.png  the ``--worst`` images with the most errors at that threshold: correct detections green,
                      wrong-class ones orange, background ones red, missed boxes blue (captioned "missed")
    analysis.json     the numbers behind them

Without ``--images`` the worst images are drawn on grey canvases of their size.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.coco_analysis import (  # noqa: E402
    ERROR_TYPES, Breakdown, ImageErrors, coco_from, confusion_matrix, error_breakdown, image_errors, results_as_coco,
)
from datasets.coco_checks import read_annotation_file  # noqa: E402
from util.draw import draw_boxes  # noqa: E402
from util.errors import InputError  # noqa: E402

logger = logging.getLogger("analyze_detections")

# Colours of the curves, from the strictest (C75) to the most forgiving (FN), as the COCO site draws them.
CURVE_COLORS = ("#ffffff", "#5b8fd6", "#2fb37a", "#ffcc33", "#ff8c33", "#d94040", "#e6c3f0")
TRUE, WRONG_CLASS, BACKGROUND, MISSED = (40, 200, 60), (255, 150, 0), (230, 30, 30), (0, 90, 255)
MIN_DRAWN_SIDE = 384  # smaller images are enlarged before drawing, so that the captions fit


def plot_breakdown(breakdown: Breakdown, path: Path, *, classes: int) -> None:
    """The overall PR curves as stacked areas, and the AP lost to each error type for the worst classes."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [1, 1.3]})
    overall, ap = breakdown.overall, breakdown.ap.mean(axis=1)
    for e in reversed(range(len(ERROR_TYPES))):  # the most forgiving curve first, the others drawn over it
        left.fill_between(breakdown.recall, overall[e], color=CURVE_COLORS[e], edgecolor="black", linewidth=0.5,
                          label=f"[{ap[e]:.3f}] {ERROR_TYPES[e]}")
    handles, labels = left.get_legend_handles_labels()
    left.legend(handles[::-1], labels[::-1], loc="lower left", fontsize=9)
    left.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall", ylabel="precision",
             title=f"all {len(breakdown.cat_ids)} classes: where the AP goes")
    # Per class: the AP each step adds (C75, then C50 - C75, ...), for the classes whose C75 AP is lowest.
    per_class = breakdown.ap
    order = np.argsort(per_class[0])[:classes][::-1]
    gains = np.diff(np.vstack([np.zeros(per_class.shape[1]), per_class]), axis=0)[:, order]
    bottom = np.zeros(len(order))
    for e in range(len(ERROR_TYPES)):
        right.barh(range(len(order)), gains[e], left=bottom, color=CURVE_COLORS[e], edgecolor="black",
                   linewidth=0.5, label=ERROR_TYPES[e])
        bottom += gains[e]
    right.set_yticks(range(len(order)), [breakdown.names[k] for k in order], fontsize=8)
    right.set(xlim=(0, 1), xlabel="AP (C75) and what each error type costs",
              title=f"the {len(order)} classes with the lowest AP75")
    right.legend(loc="lower right", fontsize=8, ncol=len(ERROR_TYPES))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(matrix: np.ndarray, names: Sequence[str], path: Path, *, score_threshold: float) -> None:
    """The confusion matrix, each row normalised to its sum, the counts written in the cells (small matrices)."""
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.25 * len(names), 24)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(names) + 1)
    ax.set_xticks(ticks, [*names, "missed"], rotation=90, fontsize=7)
    ax.set_yticks(ticks, [*names, "background"], fontsize=7)
    if len(names) <= 20:
        for (r, c), count in np.ndenumerate(matrix):
            if count:
                ax.text(c, r, str(count), ha="center", va="center", fontsize=7,
                        color="white" if rows[r, c] > 0.5 else "black")
    ax.set(xlabel="detected class", ylabel="box class",
           title=f"confusion at score >= {score_threshold:g}, IoU >= 0.5 (rows sum to 1)")
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_image_errors(image: PIL.Image.Image, errors: ImageErrors, names: dict[int, str]) -> PIL.Image.Image:
    """``image`` with the matches (green: right class, orange: wrong class), background detections (red) and
    missed boxes (blue) drawn, each captioned; enlarged to a shorter side of MIN_DRAWN_SIDE when smaller."""
    scale = max(1.0, MIN_DRAWN_SIDE / min(image.size))
    canvas = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)))

    def xyxy(box: Sequence[float]) -> list[float]:
        x, y, w, h = (v * scale for v in box)
        return [x, y, x + w, y + h]

    boxes, colors, captions = [], [], []
    for gt, det in errors.matches:
        right = gt["category_id"] == det["category_id"]
        boxes.append(xyxy(det["bbox"]))
        colors.append(TRUE if right else WRONG_CLASS)
        label = names.get(det["category_id"], str(det["category_id"]))
        captions.append(f"{label} {det['score']:.2f}" if right else
                        f"{label} on {names.get(gt['category_id'], gt['category_id'])}")
    for det in errors.background:
        boxes.append(xyxy(det["bbox"]))
        colors.append(BACKGROUND)
        captions.append(f"{names.get(det['category_id'], det['category_id'])} {det['score']:.2f}")
    for gt in errors.missed:
        boxes.append(xyxy(gt["bbox"]))
        colors.append(MISSED)
        captions.append(f"missed {names.get(gt['category_id'], gt['category_id'])}")
    draw_boxes(canvas, boxes, colors, captions)
    return canvas


def worst_images_grid(images: Sequence[PIL.Image.Image], titles: Sequence[str], path: Path) -> None:
    """The drawn images in a grid of up to 4 columns, each titled."""
    cols = min(4, len(images))
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(image)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_image(images: Optional[Path], info: dict) -> PIL.Image.Image:
    """The image file of ``info`` under ``images``, or a grey canvas of its size without a folder or file."""
    if images is not None and (images / info["file_name"]).is_file():
        return PIL.Image.open(images / info["file_name"]).convert("RGB")
    return PIL.Image.new("RGB", (int(info["width"]), int(info["height"])), (90, 90, 90))


def analyze(results_path: Path, annotations: Path, out: Path, *, images: Optional[Path] = None,
            score_threshold: float = 0.5, worst: int = 8, classes: int = 20) -> dict:
    """Write the pictures and analysis.json into ``out``; returns the JSON."""
    try:
        results = json.loads(results_path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: cannot read the results file {results_path} ({err}); it is the JSON list that "
                         "main.py --eval --save_detections writes")
    try:
        coco_gt = coco_from(read_annotation_file(annotations))
    except (InputError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    unknown = sorted({r["image_id"] for r in results} - set(coco_gt.imgs))
    if unknown:
        raise SystemExit(f"error: {results_path} has detections of {len(unknown)} images that {annotations} does not "
                         f"list (e.g. {unknown[:3]}): use the annotation file of the split that was evaluated")
    coco_dt = results_as_coco(coco_gt, results)
    out.mkdir(parents=True, exist_ok=True)
    breakdown = error_breakdown(coco_gt, coco_dt)
    plot_breakdown(breakdown, out / "breakdown.png", classes=classes)
    cat_ids = sorted(coco_gt.getCatIds())
    names = {c: coco_gt.cats[c].get("name", str(c)) for c in cat_ids}
    errors = [image_errors(coco_gt, coco_dt, i, score_threshold=score_threshold) for i in sorted(coco_gt.imgs)]
    matrix = confusion_matrix(errors, cat_ids)
    plot_confusion(matrix, [names[c] for c in cat_ids], out / "confusion.png", score_threshold=score_threshold)
    ranked = sorted(errors, key=lambda e: (-e.num_errors, e.image_id))[:worst]
    drawn = [draw_image_errors(load_image(images, coco_gt.imgs[e.image_id]), e, names) for e in ranked]
    worst_images_grid(drawn, [f"{coco_gt.imgs[e.image_id]['file_name']}: {e.num_errors} errors" for e in ranked],
                      out / "worst_images.png")
    summary = {"results": str(results_path), "annotations": str(annotations), "score_threshold": score_threshold,
               "breakdown": breakdown.summary(), "confusion": {"classes": [names[c] for c in cat_ids],
                                                               "matrix": matrix.tolist()},
               "worst_images": [{"image_id": e.image_id, "errors": e.num_errors} for e in ranked]}
    (out / "analysis.json").write_text(json.dumps(summary, indent=1))
    overall = summary["breakdown"]["overall"]
    logger.info("AP of each curve, over %d classes: %s", len(breakdown.cat_ids),
                "  ".join(f"{e} {100 * overall[e]:.1f}" for e in ERROR_TYPES))
    logger.info("wrote %s", ", ".join(str(out / n) for n in ("breakdown.png", "confusion.png", "worst_images.png",
                                                             "analysis.json")))
    return summary


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("results", type=Path, help="COCO results file (main.py --eval --save_detections)")
    parser.add_argument("--annotations", type=Path, required=True,
                        help="the annotation file of the evaluated split, e.g. instances_val2017.json")
    parser.add_argument("--images", type=Path, default=None, help="its image folder (for the worst images)")
    parser.add_argument("--out", type=Path, default=Path("analysis"), help="output folder")
    parser.add_argument("--score_threshold", type=float, default=0.5,
                        help="detections counted by the confusion matrix and the worst images")
    parser.add_argument("--worst", type=int, default=8, help="images in the worst-images grid")
    parser.add_argument("--classes", type=int, default=20, help="classes in the per-class breakdown")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.worst < 1 or args.classes < 1 or not 0 <= args.score_threshold <= 1:
        parser.error("--worst and --classes must be at least 1, --score_threshold in [0, 1]")
    analyze(args.results, args.annotations, args.out, images=args.images, score_threshold=args.score_threshold,
            worst=args.worst, classes=args.classes)


if __name__ == "__main__":
    main()

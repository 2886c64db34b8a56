"""Summarise a finished training run in two PNGs: loss / AP curves and detections on a few val images.

    python tools/demo_report.py outputs/demo/run --coco_path outputs/demo/data

Reads ``RUN_DIR/log.txt`` (one JSON line per epoch) and ``RUN_DIR/checkpoint.pth`` (the final weights and the
flags they were trained with) and writes

* ``RUN_DIR/curves.png``: train / test loss, AP, AP50 and the ``--keys`` losses per epoch (tools/plot_logs.py);
* ``RUN_DIR/predictions.png``: the first ``--num_images`` images of ``COCO_PATH/val2017`` with the ground truth
  (white, dashed) and the detections scoring at least ``--threshold`` (coloured, with class and score);

then prints the last evaluation's AP and AP50. ``--weights ema`` (runs trained with ``--ema_decay``) draws and
reports the moving average of the weights instead, and plots both curves. ``make demo`` runs it after
configs/demo_synthetic.sh.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches as patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import PIL.Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.plot_logs import plot_logs, read_log  # noqa: E402
from inference import Detector  # noqa: E402
from util.errors import InputError  # noqa: E402
from util.console import COCO_STAT_NAMES  # noqa: E402
from util.draw import PALETTE  # noqa: E402


def last_evaluation(run_dir: Path, key: str = "test_coco_eval_bbox") -> Optional[dict[str, Any]]:
    """The last epoch record of ``run_dir/log.txt`` that holds COCO stats under ``key``, or None."""
    evaluated = [r for r in read_log(run_dir) if r.get(key)]
    return evaluated[-1] if evaluated else None


def plot_predictions(checkpoint: Path, coco_path: Path, out: Path, num_images: int = 8, threshold: float = 0.5,
                     columns: int = 4, weights: str = "raw") -> Path:
    """Draw ground truth and detections of the first ``num_images`` val images in one PNG, with the
    checkpoint's ``weights`` (raw or ema)."""
    annotations = json.loads((coco_path / "annotations" / "instances_val2017.json").read_text())
    names = {c["id"]: c["name"] for c in annotations["categories"]}
    images = sorted(annotations["images"], key=lambda i: i["id"])[:num_images]
    if not images:
        raise SystemExit(f"no val images in {coco_path}")
    boxes_of: dict[int, list[dict]] = {}
    for ann in annotations["annotations"]:
        boxes_of.setdefault(ann["image_id"], []).append(ann)

    try:
        detector = Detector.from_checkpoint(checkpoint, device="cpu", weights=weights, batch_size=len(images))
    except (FileNotFoundError, InputError) as err:
        raise SystemExit(str(err)) from None
    pictures = []
    for info in images:
        with PIL.Image.open(coco_path / "val2017" / info["file_name"]) as image:
            pictures.append(image.convert("RGB"))
    detections = detector(pictures)

    rows = math.ceil(len(images) / columns)
    columns = min(columns, len(images))
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.75 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, info, picture, dets in zip(axes.flat, images, pictures, detections):
        ax.imshow(picture, interpolation="nearest")
        truth = boxes_of.get(info["id"], [])
        for ann in truth:
            x, y, w, h = ann["bbox"]
            ax.add_patch(patches.Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor="white", linestyle="--",
                                           linewidth=1.0))
        kept = [(s, int(l), b) for s, l, b in zip(dets["scores"].tolist(), dets["labels"].tolist(),
                                                   dets["boxes"].tolist()) if s >= threshold]
        for score, label, (x0, y0, x1, y1) in sorted(kept):
            color = tuple(c / 255 for c in PALETTE[label % len(PALETTE)])
            ax.add_patch(patches.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=color,
                                           linewidth=1.6))
            above = y0 >= 0.08 * picture.height  # else the label goes inside the box, under the panel's title
            ax.text(x0, y0 - 1 if above else y0 + 1, f"{names.get(label, label)} {score:.2f}", color="white",
                    fontsize=6, va="bottom" if above else "top",
                    bbox=dict(facecolor=color, edgecolor="none", pad=0.8, alpha=0.9))
        ax.set_title(f"{len(truth)} object{'s' * (len(truth) != 1)}, {len(kept)} detection{'s' * (len(kept) != 1)}",
                     fontsize=8)
    averaged = " (moving average of the weights)" if weights == "ema" else ""
    fig.suptitle(f"{checkpoint.parent.name}/{checkpoint.name}{averaged}: detections scoring >= {threshold:g} "
                 f"(coloured), ground truth (white, dashed)", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100)
    plt.close(fig)
    buffer.seek(0)
    with PIL.Image.open(buffer) as png:  # 256 colours: a third of the size, no visible loss
        png.convert("RGB").quantize(colors=256).save(out, format="PNG", optimize=True)
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="training output folder (log.txt, checkpoint.pth)")
    parser.add_argument("--coco_path", required=True, help="the dataset the run was trained on")
    parser.add_argument("--checkpoint", default="", help="weights to draw detections of; default RUN_DIR/checkpoint.pth")
    parser.add_argument("--curves", default="", metavar="PNG", help="default RUN_DIR/curves.png")
    parser.add_argument("--predictions", default="", metavar="PNG", help="default RUN_DIR/predictions.png")
    parser.add_argument("--num_images", type=int, default=8, help="val images to draw")
    parser.add_argument("--threshold", type=float, default=0.4, help="lowest detection score drawn")
    parser.add_argument("--keys", nargs="*", default=["loss_ce", "loss_giou", "loss_mask_prediction"],
                        metavar="KEY", help="more train_/test_ values to plot (see tools/plot_logs.py)")
    parser.add_argument("--weights", default="raw", choices=("raw", "ema"),
                        help="draw and report the trained weights (raw) or their moving average (ema: runs trained "
                             "with --ema_decay; the curves then show both)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    curves = plot_logs([run_dir], args.curves or run_dir / "curves.png", args.keys,
                       weights="both" if args.weights == "ema" else "raw")
    predictions = plot_predictions(Path(args.checkpoint) if args.checkpoint else run_dir / "checkpoint.pth",
                                   Path(args.coco_path), Path(args.predictions or run_dir / "predictions.png"),
                                   args.num_images, args.threshold, weights=args.weights)
    print(f"wrote {curves} and {predictions}")
    key = "test_ema_coco_eval_bbox" if args.weights == "ema" else "test_coco_eval_bbox"
    record = last_evaluation(run_dir, key)
    if record is None:
        print(f"no evaluation in the log ({key})")
        return {}
    stats = dict(zip(COCO_STAT_NAMES, record[key]))
    of = "the moving average of the weights" if args.weights == "ema" else "the weights"
    print(f"epoch {record['epoch']}: AP {stats['AP']:.3f}, AP50 {stats['AP50']:.3f}, AP75 {stats['AP75']:.3f} "
          f"(COCO box AP of {of} on {run_dir}'s val set)")
    return stats


if __name__ == "__main__":
    main()

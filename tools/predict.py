"""Detect objects in images with a trained checkpoint: COCO-format JSON detections and one PNG per image.

    python tools/predict.py --resume exps/r50_sparse_detr_rho_0.1/checkpoint.pth photos/ dog.jpg --out preds

The model is rebuilt from the ``args`` stored in the checkpoint (ours store them). Official checkpoints hold
the weights only: give the model flags after ``--``, e.g.

    python tools/predict.py --resume sparse_detr_swint_10.pth img.jpg --out preds -- \\
        --backbone swin_tiny --with_box_refine --two_stage --eff_query_init --eff_specific_head --rho 0.1 \\
        --use_enc_aux_loss

Images go through the validation transform (shorter side ``--size``, longer at most ``--max_size``) in batches
of ``--batch_size``. ``DIR/detections.json`` lists every detection scoring at least ``--threshold`` as
``{"image_id", "file_name", "category_id", "bbox": [x, y, w, h], "score"}`` in the original image's pixels
(``--threshold 0`` keeps all of them, e.g. for COCO evaluation); ``image_id`` is the image's id in the
``--categories`` annotation file when it lists the file name, else a fresh id above every id of that file (without
``--categories``: the position in the input, from 1); ids are unique, and the fresh ones are printed.
``DIR/<image name>.png`` draws the same detections with class names: COCO's for 91-class models, those of
``--categories`` (a COCO-format annotation JSON) when given, the category ids otherwise.

An image that cannot be decoded is skipped with a warning (the others are written). ``--out`` may not be an
input folder or inside one, and an input file is never overwritten (its PNG gets a ``_<n>`` suffix).
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import PIL.Image
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.images import UNREADABLE_IMAGE_ERRORS, open_rgb_image  # noqa: E402
from inference import Detector  # noqa: E402
from util.draw import category_color, draw_boxes  # noqa: E402
from util.errors import InputError  # noqa: E402
from util.process import keep_freed_memory  # noqa: E402

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def find_images(inputs: Sequence[str]) -> list[Path]:
    """Image files among ``inputs`` (files, or folders whose images are taken in name order)."""
    images = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            images.append(path)
        else:
            raise SystemExit(f"image or folder not found: {path}")
    if not images:
        raise SystemExit(f"no images in {', '.join(inputs)} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


def draw_detections(image: PIL.Image.Image, detections: Sequence[Mapping[str, Any]], names: Mapping[int, str],
                    out: Path) -> None:
    """``image`` with ``detections`` (COCO format: ``bbox`` [x, y, w, h] pixels, ``category_id``, ``score``), the
    best drawn last, on top, written to ``out`` as PNG."""
    canvas = image.convert("RGB")
    ordered = sorted(detections, key=lambda d: d["score"])
    draw_boxes(canvas, [(x, y, x + w, y + h) for x, y, w, h in (d["bbox"] for d in ordered)],
               [category_color(d["category_id"]) for d in ordered],
               [f"{names.get(d['category_id'], str(d['category_id']))} {d['score']:.2f}" for d in ordered])
    canvas.save(out, format="PNG")


def check_out_dir(out_dir: Path, inputs: Sequence[str], images: Sequence[Path]) -> None:
    """SystemExit if ``out_dir`` is an input folder or inside one (its PNGs could overwrite the inputs, and be read
    as inputs by the next run), or if ``out_dir/detections.json`` is an input."""
    out = out_dir.resolve()
    for item in inputs:
        folder = Path(item).resolve()
        if Path(item).is_dir() and (out == folder or folder in out.parents):
            where = "the input folder" if out == folder else "inside the input folder"
            raise SystemExit(f"--out {out_dir} is {where} {item}: the PNGs written there could overwrite its images; "
                             "choose an --out folder outside the input folders")
    if out / "detections.json" in {image.resolve() for image in images}:
        raise SystemExit(f"--out {out_dir} would overwrite the input {out / 'detections.json'}: choose another --out")


def _png_paths(images: Sequence[Path], out_dir: Path) -> list[Path]:
    """``out_dir/<stem>.png``, with ``_<n>`` appended where two inputs share a stem or where the name is one of the
    input files (an input is never overwritten)."""
    inputs = {image.resolve() for image in images}
    paths, used = [], set()
    for image in images:
        name, n = image.stem, 1
        while name in used or (out_dir / f"{name}.png").resolve() in inputs:
            name, n = f"{image.stem}_{n}", n + 1
        used.add(name)
        paths.append(out_dir / f"{name}.png")
    return paths


def readable_images(paths: Sequence[Path], skipped: list[Path]) -> list[tuple[int, PIL.Image.Image]]:
    """``(index in paths, RGB 8-bit image)`` of the ``paths`` that can be decoded; the others are logged and
    appended to ``skipped``."""
    readable = []
    for index, path in enumerate(paths):
        try:
            readable.append((index, open_rgb_image(path)))
        except UNREADABLE_IMAGE_ERRORS as err:
            skipped.append(path)
            logger.warning("cannot read image %s (%s): skipped, no detections or PNG for it", path, err)
    return readable


def image_detections(dets: Mapping[str, torch.Tensor], image: PIL.Image.Image, file_name: str, image_id: int,
                     threshold: float) -> list[dict[str, Any]]:
    """The detections of one image scoring at least ``threshold``, best first, as COCO results with the
    ``file_name``: ``bbox`` ``[x, y, w, h]`` clipped to the image, in its pixels."""
    image_dets = []
    for score, label, box in zip(dets["scores"].tolist(), dets["labels"].tolist(), dets["boxes"].tolist()):
        if score < threshold:
            continue
        x0, y0 = max(0.0, box[0]), max(0.0, box[1])
        x1, y1 = min(float(image.width), box[2]), min(float(image.height), box[3])
        image_dets.append({"image_id": image_id, "file_name": file_name, "category_id": int(label),
                           "bbox": [round(x0, 2), round(y0, 2), round(max(0.0, x1 - x0), 2),
                                    round(max(0.0, y1 - y0), 2)],
                           "score": round(float(score), 5)})
    return sorted(image_dets, key=lambda d: -d["score"])


def assign_image_ids(images: Sequence[Path], annotations: Optional[Mapping[str, Any]]
                     ) -> tuple[list[int], list[tuple[str, int]]]:
    """``(ids, fresh)``: a unique id per image of ``images``, and ``(file name, id)`` of those given a fresh one.

    An image whose file name the annotation file ``annotations`` lists (``--categories``) gets that entry's id,
    once (a second input of the same name gets a fresh id); the others get fresh ids, counting up from above
    every id in the file (from 1 without one, i.e. the image's position when nothing is listed)."""
    listed = {Path(str(i.get("file_name", ""))).name: i["id"] for i in (annotations or {}).get("images", [])
              if isinstance(i, Mapping) and isinstance(i.get("id"), int)}
    next_id = max(listed.values(), default=0) + 1
    ids: list[int] = []
    fresh: list[tuple[str, int]] = []
    for path in images:
        image_id = listed.get(path.name)
        if image_id is None or image_id in ids:
            image_id, next_id = next_id, next_id + 1
            fresh.append((path.name, image_id))
        ids.append(image_id)
    return ids, fresh


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    model_flags: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, model_flags = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resume", required=True, metavar="CKPT",
                        help="checkpoint (ours or official), model folder (config.json + model.safetensors) or run "
                             "folder")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files or folders of images")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for detections.json and the PNGs")
    parser.add_argument("--threshold", type=float, default=0.5, help="lowest score kept (JSON and PNGs)")
    parser.add_argument("--batch_size", type=int, default=4, help="images per forward pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda")
    parser.add_argument("--categories", default="", metavar="JSON",
                        help="COCO-format annotation file whose categories name the classes; default the names "
                             "the checkpoint stores (its training set's)")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="unpickle the checkpoint without restriction (legacy files holding other objects than "
                             "weights and settings): it can carry code that then runs; only for trusted files")
    parser.add_argument("--weights", default="raw", choices=("raw", "ema"),
                        help="the checkpoint's trained weights, or their moving average (runs with --ema_decay)")
    parser.add_argument("--size", type=int, default=None,
                        help="shorter side the images are resized to; default the model's --val_size")
    parser.add_argument("--max_size", type=int, default=None, help="longest side after resizing; default the model's")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size must be at least 1, got {args.batch_size}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        parser.error(f"--device {args.device}: use cuda, cuda:N (a GPU's index) or cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if args.device == "cpu":
        keep_freed_memory()

    annotations = None
    if args.categories:
        if not Path(args.categories).is_file():
            raise SystemExit(f"--categories {args.categories}: no such file")
        annotations = json.loads(Path(args.categories).read_text())
    images = find_images(args.inputs)
    out_dir = Path(args.out)
    check_out_dir(out_dir, args.inputs, images)
    try:
        detector = Detector.from_checkpoint(args.resume, model_flags, device=args.device, weights=args.weights,
                                            trust=args.trust_checkpoint, categories=annotations, val_size=args.size,
                                            max_size=args.max_size, batch_size=args.batch_size)
    except (FileNotFoundError, InputError) as err:
        raise SystemExit(str(err)) from None
    names = detector.class_names
    image_ids, fresh_ids = assign_image_ids(images, annotations)
    if annotations is not None and fresh_ids:
        shown = ", ".join(f"{name} {image_id}" for name, image_id in fresh_ids[:10])
        print(f"{len(fresh_ids)} images are not listed in --categories {args.categories} (or repeat a listed name): "
              f"given new ids {shown}{' ...' if len(fresh_ids) > 10 else ''}")
    out_dir.mkdir(parents=True, exist_ok=True)
    png_paths = _png_paths(images, out_dir)

    results: list[dict[str, Any]] = []
    skipped: list[Path] = []
    for start in range(0, len(images), args.batch_size):
        batch = readable_images(images[start:start + args.batch_size], skipped)
        if not batch:
            continue
        batch_dets = detector([image for _, image in batch])
        for (index, image), dets in zip(batch, batch_dets):
            position = start + index
            name = images[position].name
            image_dets = image_detections(dets, image, name, image_ids[position], args.threshold)
            draw_detections(image, image_dets, names, png_paths[position])
            results += image_dets
    if len(skipped) == len(images):
        raise SystemExit(f"none of the {len(images)} images can be read (see the warnings): nothing written; give "
                         "image files PIL can decode")
    (out_dir / "detections.json").write_text(json.dumps(results))
    done = len(images) - len(skipped)
    note = f"; {len(skipped)} unreadable images skipped (see the warnings)" if skipped else ""
    print(f"{len(results)} detections in {done} images (score >= {args.threshold}): "
          f"{out_dir / 'detections.json'} and {done} PNGs in {out_dir}{note}")
    return results


if __name__ == "__main__":
    main()

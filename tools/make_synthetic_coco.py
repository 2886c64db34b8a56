#!/usr/bin/env python
"""Write a small deterministic synthetic detection dataset in the COCO layout.

    OUT/train2017/*.jpg  OUT/val2017/*.jpg
    OUT/annotations/instances_{train,val}2017.json

Each image is a textured background (colour gradient + smooth blotches + pixel noise) with
0 to 6 filled shapes: square (category 1), circle (2), triangle (3) of random size and colour.
Later shapes occlude earlier ones; each annotation's ``bbox`` ``[x, y, w, h]`` and ``area`` cover
the *visible* pixels only, and shapes left with under a quarter of their pixels visible are
erased from the image. About 10% of the images contain no object. The same seed gives
byte-identical JSON files.

Usage: python tools/make_synthetic_coco.py --out DIR [--train 200 --val 50 --seed 0 --size 128]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = [
    {"id": 1, "name": "square", "supercategory": "shape"},
    {"id": 2, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
EMPTY_FRACTION = 0.1
MAX_OBJECTS = 6
MIN_VISIBLE_FRACTION = 0.25


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """[size, size, 3] float image: linear gradient between two colours + blotches + noise."""
    start, end = rng.uniform(0, 255, size=(2, 3))
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    ramp = math.cos(angle) * xs + math.sin(angle) * ys
    ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-6)
    image = start + (end - start) * ramp[..., None]
    coarse = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
    blotches = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), dtype=np.float64)
    image = 0.7 * image + 0.3 * blotches
    return image + rng.normal(0, 6, size=image.shape)


def _shape_mask(rng: np.random.Generator, category_id: int, size: int) -> np.ndarray:
    """Boolean [size, size] mask of one randomly placed shape (may extend past the border)."""
    side = int(rng.integers(max(4, size // 10), int(size * 0.45) + 1))
    x0 = int(rng.integers(-side // 4, size - 3 * side // 4))
    y0 = int(rng.integers(-side // 4, size - 3 * side // 4))
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    box = [x0, y0, x0 + side - 1, y0 + side - 1]
    if category_id == 1:
        draw.rectangle(box, fill=1)
    elif category_id == 2:
        draw.ellipse(box, fill=1)
    else:
        cx, cy, radius = x0 + side / 2, y0 + side / 2, side / 2
        turn = rng.uniform(0, 2 * math.pi)
        corners = [
            (round(cx + radius * math.cos(turn + k * 2 * math.pi / 3)),
             round(cy + radius * math.sin(turn + k * 2 * math.pi / 3)))
            for k in range(3)
        ]
        draw.polygon(corners, fill=1)
    return np.asarray(canvas, dtype=bool)


def _render_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[dict]]:
    """One uint8 [size, size, 3] image and its objects as ``{"category_id", "bbox", "area"}``."""
    image = _background(rng, size)
    num_objects = 0 if rng.random() < EMPTY_FRACTION else int(rng.integers(1, MAX_OBJECTS + 1))
    owner = np.zeros((size, size), dtype=np.int32)  # index + 1 of the shape on top, 0 = background
    shapes = []
    for index in range(num_objects):
        category_id = int(rng.integers(1, len(CATEGORIES) + 1))
        mask = _shape_mask(rng, category_id, size)
        colour = rng.uniform(0, 255, size=3)
        if mask.any() and np.abs(image[mask].mean(axis=0) - colour).mean() < 50:
            colour = 255 - colour  # keep some contrast with what lies underneath
        owner[mask] = index + 1
        shapes.append((category_id, int(mask.sum()), colour))

    objects = []
    for index, (category_id, full_area, colour) in enumerate(shapes):
        visible = owner == index + 1
        area = int(visible.sum())
        if area == 0:
            continue
        if area < MIN_VISIBLE_FRACTION * full_area or area < 9:
            owner[visible] = 0  # too hidden to label: erase it
            continue
        shading = rng.uniform(0.8, 1.0) + rng.uniform(-0.15, 0.15) * np.linspace(-1, 1, size)[None, :, None]
        image = np.where(visible[..., None], colour * shading, image)
        ys, xs = np.nonzero(visible)
        bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
        objects.append({"category_id": category_id, "bbox": bbox, "area": area})
    image = image + rng.normal(0, 3, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), objects


def _make_split(out_dir: Path, split: str, num_images: int, seed: int, split_index: int, size: int) -> dict:
    """Render one split's images and return its COCO annotation dict."""
    rng = np.random.default_rng([seed, split_index])
    img_dir = out_dir / f"{split}2017"
    img_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        pixels, objects = _render_image(rng, size)
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(pixels).save(img_dir / file_name, quality=92)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0, **obj})
    return {
        "info": {"description": f"synthetic shapes, split={split}, seed={seed}, size={size}"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }


def make_synthetic_coco(
    out_dir: str | Path, num_train: int = 200, num_val: int = 50, seed: int = 0, size: int = 128
) -> dict[str, dict[str, int]]:
    """Write the dataset under ``out_dir``; returns ``{split: {"images": n, "annotations": m}}``."""
    if size < 32:
        raise ValueError(f"--size must be at least 32 pixels, got {size}")
    out_dir = Path(out_dir)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    counts = {}
    for split_index, (split, num_images) in enumerate((("train", num_train), ("val", num_val))):
        dataset = _make_split(out_dir, split, num_images, seed, split_index, size)
        ann_file = out_dir / "annotations" / f"instances_{split}2017.json"
        ann_file.write_text(json.dumps(dataset, sort_keys=True, separators=(",", ":")))
        counts[split] = {"images": len(dataset["images"]), "annotations": len(dataset["annotations"])}
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--train", type=int, default=200, help="number of train images")
    parser.add_argument("--val", type=int, default=50, help="number of val images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    args = parser.parse_args()
    counts = make_synthetic_coco(args.out, args.train, args.val, args.seed, args.size)
    summary = ", ".join(f"{s}: {c['images']} images / {c['annotations']} boxes" for s, c in counts.items())
    print(f"wrote synthetic COCO to {args.out} ({summary})")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""See what the model sees: a PNG grid of dataset images after the training transforms, with their boxes and
class names.

    python tools/browse_dataset.py --coco_path data/coco [--split train] [--n 16] [--out grid.png] [--seed 42]

Each image goes through the transforms of ``--split`` as main.py builds them (train: random flip, then a resize
to one of ``--scales`` or a resize, random crop and resize; val: a resize to ``--val_size``; both at most
``--max_size``), is drawn denormalised, and its boxes are converted back from the normalised cxcywh the model
is trained on to pixels of the transformed image: flipped, resized and cropped boxes are drawn where the model
will be asked to find them. The images are picked at random with ``--seed``, and each one gets the augmentation
that training with ``--seed`` draws for it in epoch ``--epoch`` (datasets/resumable.py). Images larger than
``--cell`` pixels are scaled down to fit, boxes with them.
"""
from __future__ import annotations

import argparse
import logging
import math
import random
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

import PIL.Image
import PIL.ImageDraw
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.coco import build as build_coco  # noqa: E402
from datasets.resumable import SeededSamples  # noqa: E402
from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from util.box_ops import box_cxcywh_to_xyxy  # noqa: E402
from util.draw import caption_font, category_color, draw_boxes  # noqa: E402
from util.errors import InputError  # noqa: E402

logger = logging.getLogger(__name__)

TITLE_HEIGHT = 14  # px above each image for its id and size
GAP = 4  # px between cells
BACKGROUND = (32, 32, 32)


def denormalise(image: torch.Tensor) -> PIL.Image.Image:
    """A ``[3, H, W]`` ImageNet-normalised tensor (datasets.transforms.Normalize) as an RGB image."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = (image * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    return PIL.Image.fromarray(pixels.permute(1, 2, 0).numpy())


def draw_sample(image: torch.Tensor, target: Mapping[str, torch.Tensor], names: Mapping[int, str],
                max_side: Optional[int] = None) -> PIL.Image.Image:
    """The transformed ``image`` (``[3, H, W]``, normalised) with ``target``'s boxes (normalised cxcywh, as the model
    is trained on) drawn in pixels of that image, each in its category's colour with its name. With ``max_side``
    the picture is first scaled down so that its longer side is at most that (never up), boxes with it."""
    height, width = image.shape[-2:]
    canvas = denormalise(image)
    scale = 1.0 if max_side is None else min(1.0, max_side / max(height, width))
    if scale < 1.0:
        canvas = canvas.resize((max(1, round(width * scale)), max(1, round(height * scale))), PIL.Image.BILINEAR)
    boxes = box_cxcywh_to_xyxy(target["boxes"]) * torch.tensor([width, height, width, height]) * scale
    labels = target["labels"].tolist()
    draw_boxes(canvas, boxes.tolist(), [category_color(c) for c in labels], [names.get(c, str(c)) for c in labels])
    return canvas


def grid(tiles: Sequence[PIL.Image.Image], titles: Sequence[str], columns: int) -> PIL.Image.Image:
    """The ``tiles`` in rows of ``columns``, each cell as large as the largest tile, its title above it."""
    cell_w = max(t.width for t in tiles) + GAP
    cell_h = max(t.height for t in tiles) + TITLE_HEIGHT + GAP
    rows = math.ceil(len(tiles) / columns)
    sheet = PIL.Image.new("RGB", (columns * cell_w - GAP, rows * cell_h - GAP), BACKGROUND)
    draw = PIL.ImageDraw.Draw(sheet)
    font = caption_font((0, 0))  # the smallest
    for position, (tile, title) in enumerate(zip(tiles, titles)):
        left, top = (position % columns) * cell_w, (position // columns) * cell_h
        draw.text((left + 1, top + 1), title, fill=(255, 255, 255), font=font)
        sheet.paste(tile, (left, top + TITLE_HEIGHT))
    return sheet


def browse(dataset, *, count: int, seed: int, epoch: int, cell: int) -> PIL.Image.Image:
    """The grid of ``count`` images of ``dataset`` (a datasets.coco.CocoDetection with its transforms) picked at
    random with ``seed``, each as training with ``seed`` augments it in ``epoch``."""
    indices = sorted(random.Random(seed).sample(range(len(dataset)), min(count, len(dataset))))
    samples = SeededSamples(dataset, seed)
    names = {int(c["id"]): str(c["name"]) for c in dataset.coco.dataset.get("categories", [])}
    tiles, titles = [], []
    for index in indices:
        image, target = samples[(epoch, index)]
        tiles.append(draw_sample(image, target, names, max_side=cell))
        titles.append(f"id {int(target['image_id'])}, {image.shape[-1]}x{image.shape[-2]}")
    return grid(tiles, titles, columns=math.ceil(math.sqrt(len(tiles))))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--coco_path", required=True, help="COCO-layout folder, as main.py's --coco_path")
    parser.add_argument("--split", default="train", choices=("train", "val"), help="which split and its transforms")
    parser.add_argument("--n", default=16, type=int, help="number of images")
    parser.add_argument("--out", default="grid.png",
                        help="image file to write: .png, or .jpg / .jpeg for JPEG; a name without an extension gets "
                             ".png")
    parser.add_argument("--seed", default=42, type=int, help="picks the images; the augmentation is training's with "
                                                             "this --seed")
    parser.add_argument("--epoch", default=0, type=int, help="the augmentation is the one of this training epoch")
    parser.add_argument("--cell", default=400, type=int, metavar="PX", help="longest side of each drawn image")
    parser.add_argument("--scales", default=None, type=int, nargs="+", metavar="PX",
                        help="as main.py's: training shorter-side sizes; default the reference's 480, 512, ..., 800")
    parser.add_argument("--max_size", default=1333, type=int, metavar="PX", help="as main.py's: longest image side")
    parser.add_argument("--val_size", default=800, type=int, metavar="PX", help="as main.py's: evaluation size")
    args = parser.parse_args(argv)
    for flag in ("n", "cell", "max_size", "val_size"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"error: --{flag} must be at least 1, got {getattr(args, flag)}")
    if args.epoch < 0:
        raise SystemExit(f"error: --epoch must be >= 0, got {args.epoch}")
    if args.scales is not None and min(args.scales) < 1:
        raise SystemExit(f"error: --scales must be positive sizes in pixels, got {args.scales}")
    # What datasets.coco.build reads besides these flags: no class-count check, lenient data, no cache.
    args.num_classes, args.strict_data, args.cache_mode = None, False, False
    return args


# --out's extensions and the format written for each.
OUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def out_path(out: Path) -> tuple[Path, str]:
    """``(file, PIL format)`` for ``--out``: its extension's format (a name without one gets .png); SystemExit for
    a folder or another extension (the bytes would not match the name)."""
    if out.is_dir():
        raise SystemExit(f"error: --out {out} is a folder: give a file name, e.g. {out / 'grid.png'}")
    if not out.suffix:
        return out.with_name(out.name + ".png"), "PNG"
    if out.suffix.lower() not in OUT_FORMATS:
        raise SystemExit(f"error: --out {out}: unknown extension {out.suffix!r}; give a .png, .jpg or .jpeg file")
    return out, OUT_FORMATS[out.suffix.lower()]


def main(argv: Optional[Sequence[str]] = None) -> Path:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    out, out_format = out_path(Path(args.out))
    try:
        dataset = build_coco(args.split, args)
    except (FileNotFoundError, InputError) as error:
        raise SystemExit(f"error: {error}") from None
    sheet = browse(dataset, count=args.n, seed=args.seed, epoch=args.epoch, cell=args.cell)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.convert("RGB").save(out, format=out_format, optimize=True)
    print(f"wrote {out} ({min(args.n, len(dataset))} {args.split} images after the {args.split} transforms)")
    return out


if __name__ == "__main__":
    main()

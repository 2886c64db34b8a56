#!/usr/bin/env python
"""Check a COCO-format dataset without training: what each split holds and every problem found.

    python tools/check_dataset.py --coco_path data/coco [--splits train val] [--num_classes 91]

Per split it prints the numbers of images, annotations and images without annotations, the boxes per
category, then each kind of problem with its count and first examples: the checks of training
(datasets/coco_checks.py: missing files, bad boxes, undeclared categories, ...) plus every image decoded with
PIL (unreadable files, sizes that differ from the JSON's "width"/"height", EXIF rotations, 16-bit or float
pixels), negative category ids and, with --num_classes, category ids the classifier cannot predict.

Exit status: 0 no problem, 1 problems found, 2 unusable input (missing folder or file, not COCO, no image to use:
what main.py refuses).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.coco import check_split_paths, no_images_problem, split_paths  # noqa: E402
from datasets.coco_checks import (  # noqa: E402
    Finding, clean_annotations, make_findings, negative_category_problem, num_classes_for, num_classes_problem,
    read_annotation_file,
)
from datasets.images import UNREADABLE_IMAGE_ERRORS, decode_image, exif_rotation, size_mismatch  # noqa: E402
from util.errors import InputError  # noqa: E402


def image_findings(dataset: dict, img_folder: Path) -> list[Finding]:
    """Decode every image of ``dataset``: files PIL cannot read, sizes that differ from the JSON's, EXIF
    rotations (never applied) and 16-bit or float pixels (scaled to 8 bits)."""
    unreadable, resized, rotated, scaled = [], [], [], []
    for info in dataset["images"]:
        try:
            decoded = decode_image(img_folder / info["file_name"])
        except UNREADABLE_IMAGE_ERRORS as err:
            unreadable.append(f'{info["file_name"]}: {err}')
            continue
        for found, problem in ((resized, size_mismatch(info, decoded.image)),
                               (rotated, exif_rotation(info["file_name"], decoded.orientation)),
                               (scaled, decoded.scaling and f'{info["file_name"]}: {decoded.scaling}')):
            if problem:
                found.append(problem)
    return [
        *make_findings("images that cannot be decoded", unreadable, str,
                       "skipped when loaded (the next image is used)"),
        *make_findings('images whose size differs from their "width"/"height"', resized, str,
                       "boxes are clipped to the real size and may not fit the picture (--strict_data: an error)"),
        *make_findings("images with an EXIF rotation (orientation tag 274 not 1)", rotated, str,
                       "the stored pixels are used, the rotation ignored, as COCO does: the boxes must be drawn on the "
                       "stored pixels (--strict_data: an error)"),
        *make_findings("images with 16-bit or float pixels", scaled, str,
                       "scaled to 8 bits per channel by the rule shown (datasets/images.py)"),
    ]


def split_report(coco_path: str, split: str, num_classes: Optional[int]) -> tuple[list[str], int]:
    """``(summary lines, number of problems)`` of one split; InputError or FileNotFoundError if unusable."""
    img_folder, ann_file = split_paths(coco_path, split)
    check_split_paths(img_folder, ann_file)
    dataset = read_annotation_file(ann_file)
    names = {c["id"]: c.get("name", "?") for c in dataset["categories"]}
    per_category = Counter(a["category_id"] for a in dataset["annotations"])
    annotated = {a["image_id"] for a in dataset["annotations"]}
    num_listed = len(dataset["images"])
    lines = [
        f"{split}: {ann_file} (images in {img_folder})",
        f"  images: {len(dataset['images'])}, without annotations: {len(dataset['images']) - len(annotated)}",
        f"  annotations: {len(dataset['annotations'])}",
        "  boxes per category:",
        *(f"    {cid} {names.get(cid, '(undeclared)')}: {n}" for cid, n in sorted(per_category.items())),
        f"  suggested --num_classes: {num_classes_for(dataset)}",
    ]
    problems = [str(finding) for finding in clean_annotations(dataset, img_folder)]
    unusable = no_images_problem(dataset, num_listed, ann_file, img_folder)
    if unusable:  # main.py refuses the split
        raise InputError(unusable)
    problems += [str(finding) for finding in image_findings(dataset, img_folder)]
    problems += [problem for problem in (
        negative_category_problem(dataset, ann_file),
        num_classes_problem(dataset, num_classes, ann_file) if num_classes is not None else None) if problem]
    lines += ["  problems:", *(f"    {p}" for p in problems)] if problems else ["  problems: none"]
    return lines, len(problems)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the report of every split; returns the exit status (0 clean, 1 problems, 2 unusable input)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco_path", required=True, help="folder with {train,val}2017/ and annotations/")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], choices=("train", "val"),
                        help="splits to check")
    parser.add_argument("--num_classes", type=int, default=None,
                        help="also check that every category id is < this (main.py's --num_classes)")
    args = parser.parse_args(argv)
    total = 0
    for split in args.splits:
        try:
            lines, count = split_report(args.coco_path, split, args.num_classes)
        except (InputError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print("\n".join(lines))
        total += count
    print(f"{total} kinds of problems found" if total else "no problems found")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())

"""Small COCO splits written by hand for the bad-data tests (test_bad_data*.py, test_bad_annotations.py)."""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import PIL.Image
import pytest


SMALL = dict(scales=[32], max_size=64, val_size=32)


def make_args(coco_path: Path, **overrides) -> SimpleNamespace:
    return SimpleNamespace(**{"dataset_file": "coco", "coco_path": str(coco_path), "num_classes": None,
                              "cache_mode": False, "strict_data": False, **SMALL, **overrides})


def write_split(root: Path, split: str, images: list[dict], annotations: list[dict],
                categories: Optional[list[dict]] = None) -> Path:
    """``root/<split>2017`` with a 40x30 PNG per image (an image's "pixels" entry, if any, replaces it: the
    bytes to write, or None for no file) and the split's annotation file, returned. Annotations get "id" 1, 2,
    ... unless set."""
    folder = root / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    for image in images:
        if "pixels" not in image:
            PIL.Image.new("RGB", (40, 30), (90, 120, 30)).save(folder / image["file_name"])
        elif (pixels := image.pop("pixels")) is not None:
            (folder / image["file_name"]).write_bytes(pixels)
    for ann_id, ann in enumerate(annotations, start=1):
        ann.setdefault("id", ann_id)
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}] if categories is None else categories
    ann_file = root / "annotations" / f"instances_{split}2017.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann_file


def image(image_id: int, **fields) -> dict:
    return {"id": image_id, "file_name": f"{image_id:012d}.png", "width": 40, "height": 30, **fields}


def box(image_id: int, bbox, category_id: int = 1, **fields) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "area": 25, "iscrowd": 0, **fields}


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (40, 30), (200, 10, 10)).save(buffer, "JPEG")
    return buffer.getvalue()[:-40]


def pil_error(path: Path) -> str:
    """PIL's own message for an undecodable file (its wording depends on the PIL version)."""
    with pytest.raises(OSError) as info:
        with PIL.Image.open(path) as img:
            img.convert("RGB")
    return str(info.value)

"""COCO-format detection dataset.

Expected layout under ``coco_path``::

    coco_path/
        train2017/                      images of the train split
        val2017/                        images of the val split
        annotations/
            instances_train2017.json
            instances_val2017.json

Each sample is ``(image, target)``; see :mod:`datasets.transforms` for the target dict. Without
transforms, ``boxes`` are absolute xyxy pixels; the standard transforms end with
:class:`~datasets.transforms.Normalize`, giving normalised cxcywh boxes in [0, 1].
Labels are the raw COCO ``category_id`` values (no remapping), so the classifier needs
``num_classes > max category id``.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import PIL.Image
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from . import transforms as T

logger = logging.getLogger(__name__)

COCO_NUM_CLASSES = 91  # standard COCO ids go up to 90; index 0 unused
LAYOUT_HELP = (
    "expected layout: <coco_path>/{train2017,val2017}/ with the images and "
    "<coco_path>/annotations/instances_{train,val}2017.json"
)


def load_coco_quietly(ann_file: str | Path) -> COCO:
    """``pycocotools.coco.COCO(ann_file)`` with its progress prints sent to the debug log."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        coco = COCO(str(ann_file))
    logger.debug("pycocotools: %s", buffer.getvalue().strip())
    return coco


def _num_classes_for_ids(category_ids: Iterable[int]) -> int:
    ids = list(category_ids)
    if not ids or max(ids) <= COCO_NUM_CLASSES - 1:
        return COCO_NUM_CLASSES
    return max(ids) + 1


def _all_category_ids(dataset: dict) -> set[int]:
    """Category ids declared in ``categories`` or used by any annotation."""
    ids = {int(c["id"]) for c in dataset.get("categories", [])}
    ids.update(int(a["category_id"]) for a in dataset.get("annotations", []))
    return ids


def default_num_classes(ann_file: str | Path) -> int:
    """``num_classes`` suited to an annotation file.

    91 (the COCO convention) when every category id is <= 90, else ``max id + 1``.
    """
    with open(ann_file) as f:
        dataset = json.load(f)
    return _num_classes_for_ids(_all_category_ids(dataset))


def check_num_classes(dataset: dict, num_classes: int, ann_file: str | Path) -> None:
    """Raise ``ValueError`` if some category id cannot be predicted by ``num_classes`` logits."""
    ids = _all_category_ids(dataset)
    bad = sorted(i for i in ids if i >= num_classes)
    if bad:
        raise ValueError(
            f"category id {bad[-1]} in {ann_file} is >= num_classes={num_classes} "
            f"(all offending ids: {bad[:10]}{' ...' if len(bad) > 10 else ''}); the classifier has no "
            f"output for it. Pass --num_classes {_num_classes_for_ids(ids)} (max category id + 1, "
            "or 91 for standard COCO ids) or fix the annotation file."
        )


def coco_annotations_to_target(
    annotations: Sequence[dict], image_id: int, width: int, height: int
) -> dict[str, torch.Tensor]:
    """COCO annotations of one image -> target dict with absolute xyxy boxes.

    Crowd annotations (``iscrowd == 1``) are dropped, ``[x, y, w, h]`` becomes ``[x0, y0, x1, y1]``
    clamped to the image, and boxes with ``x1 <= x0`` or ``y1 <= y0`` are removed.
    Returns boxes ``[N, 4]`` float32, labels ``[N]`` int64, area ``[N]`` float32,
    iscrowd ``[N]`` int64, image_id ``[1]``, orig_size and size ``[2]`` as ``(h, w)``.
    """
    anns = [a for a in annotations if not a.get("iscrowd", 0)]
    boxes = torch.as_tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2].clamp_(min=0, max=width)
    boxes[:, 1::2].clamp_(min=0, max=height)
    labels = torch.as_tensor([a["category_id"] for a in anns], dtype=torch.int64)
    area = torch.as_tensor(
        [a.get("area", a["bbox"][2] * a["bbox"][3]) for a in anns], dtype=torch.float32
    )
    iscrowd = torch.zeros(len(anns), dtype=torch.int64)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    hw = torch.as_tensor([int(height), int(width)], dtype=torch.int64)
    return {
        "boxes": boxes[keep],
        "labels": labels[keep],
        "image_id": torch.tensor([image_id], dtype=torch.int64),
        "area": area[keep],
        "iscrowd": iscrowd[keep],
        "orig_size": hw,
        "size": hw.clone(),
    }


class CocoDetection(Dataset):
    """Images of ``img_folder`` with the COCO annotations of ``ann_file``.

    ``cache_mode=True`` reads every image file's (encoded) bytes into memory once at
    construction; decoding still happens per access. ``num_classes`` (if given) is checked
    against every category id in the file. ``self.coco`` is the pycocotools ground truth and
    ``self.ids`` the sorted image ids (index ``i`` -> ``self.ids[i]``).
    """

    def __init__(
        self,
        img_folder: str | Path,
        ann_file: str | Path,
        transforms: Optional[Callable] = None,
        cache_mode: bool = False,
        num_classes: Optional[int] = None,
    ):
        self.img_folder = Path(img_folder)
        self.ann_file = Path(ann_file)
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"annotation file not found: {self.ann_file} ({LAYOUT_HELP})")
        if not self.img_folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.img_folder} ({LAYOUT_HELP})")
        self.coco = load_coco_quietly(self.ann_file)
        if num_classes is not None:
            check_num_classes(self.coco.dataset, num_classes, self.ann_file)
        self.num_classes = num_classes
        self.ids: list[int] = sorted(self.coco.imgs.keys())
        self.transforms = transforms
        self.cache_mode = cache_mode
        self._cache: dict[int, bytes] = {}
        if cache_mode:
            for image_id in self.ids:
                self._cache[image_id] = self._path(image_id).read_bytes()
            logger.info("cached %d images (%.1f MiB) from %s", len(self._cache),
                        sum(map(len, self._cache.values())) / 2**20, self.img_folder)

    def _path(self, image_id: int) -> Path:
        return self.img_folder / self.coco.imgs[image_id]["file_name"]

    def load_image(self, image_id: int) -> PIL.Image.Image:
        """The RGB image of ``image_id`` (from the cache in cache mode)."""
        if image_id in self._cache:
            return PIL.Image.open(io.BytesIO(self._cache[image_id])).convert("RGB")
        path = self._path(image_id)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path} (listed in {self.ann_file})")
        with PIL.Image.open(path) as img:
            return img.convert("RGB")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Any, dict[str, torch.Tensor]]:
        image_id = self.ids[index]
        image = self.load_image(image_id)
        width, height = image.size
        target = coco_annotations_to_target(self.coco.imgToAnns.get(image_id, []), image_id, width, height)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def split_paths(coco_path: str | Path, image_set: str) -> tuple[Path, Path]:
    """``(image folder, annotation file)`` of ``image_set`` ('train' or 'val') under ``coco_path``."""
    if image_set not in ("train", "val"):
        raise ValueError(f"unknown image_set {image_set!r}; expected 'train' or 'val'")
    root = Path(coco_path)
    if not root.is_dir():
        raise FileNotFoundError(f"--coco_path {root} is not a directory ({LAYOUT_HELP})")
    return root / f"{image_set}2017", root / "annotations" / f"instances_{image_set}2017.json"


def build(image_set: str, args) -> CocoDetection:
    """Dataset of ``image_set`` from ``args``.

    Reads ``args.coco_path`` (required) and, optionally, ``args.cache_mode`` (False),
    ``args.num_classes`` (None: no check), ``args.scales`` (None: reference 480..800),
    ``args.max_size`` (1333) and ``args.val_size`` (800).
    """
    coco_path = getattr(args, "coco_path", None)
    if not coco_path:
        raise ValueError(f"--coco_path is required ({LAYOUT_HELP})")
    img_folder, ann_file = split_paths(coco_path, image_set)
    transforms = T.make_coco_transforms(
        image_set,
        scales=getattr(args, "scales", None),
        max_size=getattr(args, "max_size", None) or 1333,
        val_size=getattr(args, "val_size", None) or 800,
    )
    return CocoDetection(
        img_folder,
        ann_file,
        transforms=transforms,
        cache_mode=bool(getattr(args, "cache_mode", False)),
        num_classes=getattr(args, "num_classes", None),
    )

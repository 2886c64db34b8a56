"""Joint image/target augmentations for detection (DETR / Deformable DETR recipe).

Every transform is called as ``image, target = t(image, target)``.

``image`` is a PIL image until :class:`ToTensor`, then a ``[3, H, W]`` float tensor.
``target`` is a dict (or ``None``) with

* ``boxes``    ``[N, 4]`` float32, absolute **xyxy** pixels of the current image; after
  :class:`Normalize` they become **cxcywh normalised** by the image width/height (in [0, 1]).
* ``labels``   ``[N]`` int64 category ids.
* ``area``     ``[N]`` float32, ``iscrowd`` ``[N]`` int64 (kept aligned with ``boxes``).
* ``image_id`` ``[1]`` int64, ``orig_size`` ``[2]`` int64 ``(h, w)`` of the file on disk.
* ``size``     ``[2]`` int64 ``(h, w)`` of the current image, updated by resize and crop.

Targets are never modified in place: each geometric transform returns a shallow copy.
Randomness comes from Python's :mod:`random` module alone: training seeds it per sample from
(seed, epoch, index) (see :mod:`datasets.resumable`), which makes resumed runs exact.
"""
from __future__ import annotations

import logging
import random
from typing import Any, Callable, Optional, Sequence, Union

import PIL.Image
import torch
import torchvision.transforms.functional as F
from torch import Tensor

from util.box_ops import box_xyxy_to_cxcywh

from .counted_log import CountedWarnings

logger = logging.getLogger(__name__)
_resize_warnings = CountedWarnings(logger)

Target = Optional[dict[str, Any]]
Size = Union[int, Sequence[int]]

# Per-box fields that must be filtered together with ``boxes`` when boxes are dropped.
PER_BOX_FIELDS = ("labels", "area", "iscrowd")

# Resized sides: the shorter at least MIN_SIDE px (1 px at stride 64, the deepest feature map with an extra
# level), the longer at most MAX_SIDE px when no max_size bounds it; only extreme aspect ratios reach them.
MIN_SIDE = 64
MAX_SIDE = 16384

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# Functional helpers


def crop(image: PIL.Image.Image, target: Target, region: tuple[int, int, int, int]):
    """Crop ``region = (top, left, height, width)``.

    Boxes (absolute xyxy) are shifted, clamped to the crop, their ``area`` recomputed, and
    boxes left with zero width or height are removed together with their per-box fields.
    """
    top, left, height, width = region
    image = F.crop(image, top, left, height, width)
    if target is None:
        return image, None
    target = target.copy()
    target["size"] = torch.tensor([height, width], dtype=torch.int64)
    if "boxes" in target:
        boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
        # clamp x to [0, width] and y to [0, height]
        upper = torch.tensor([width, height, width, height], dtype=torch.float32)
        boxes = torch.minimum(boxes.clamp(min=0), upper)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target["boxes"] = boxes
        target["area"] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        for field in ("boxes",) + PER_BOX_FIELDS:
            if field in target:
                target[field] = target[field][keep]
    return image, target


def hflip(image: PIL.Image.Image, target: Target):
    """Mirror left-right; absolute xyxy boxes map to ``(w - x1, y0, w - x0, y1)``."""
    width, _ = image.size
    image = F.hflip(image)
    if target is None:
        return image, None
    target = target.copy()
    if "boxes" in target:
        x0, y0, x1, y1 = target["boxes"].unbind(-1)
        target["boxes"] = torch.stack([width - x1, y0, width - x0, y1], dim=-1)
    return image, target


def _reference_resize_hw(image_wh: tuple[int, int], size: int, max_size: Optional[int]) -> tuple[int, int]:
    """The reference implementation's output ``(h, w)``: shorter side ``size`` (reduced to
    ``round(max_size * short / long)`` when the longer would exceed ``max_size``), longer ``int(size * long /
    short)`` (truncation: it may end up slightly above ``max_size``). A side may be 0 px for extreme shapes."""
    w, h = image_wh
    if max_size is not None:
        short, long = float(min(w, h)), float(max(w, h))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def resize_hw_and_reason(image_wh: tuple[int, int], size: int,
                         max_size: Optional[int] = None) -> tuple[tuple[int, int], Optional[str]]:
    """``((h, w), why the aspect ratio was not kept or None)``: :func:`_reference_resize_hw`, with the sides
    clamped for extreme aspect ratios (about 21:1 and beyond at the default sizes).

    The shorter side is at least ``min(size, MIN_SIDE, max_size)`` (the model needs 1 px of its stride-64
    feature map; the reference would give 0 px from about 2666:1 on, a crash), the longer side then at most
    ``max_size``; without ``max_size`` the longer side is at most ``MAX_SIDE`` (the reference would allocate a
    400 x 1,000,000 image). Boxes follow the image in :func:`resize`.
    """
    w, h = image_wh
    out_h, out_w = _reference_resize_hw(image_wh, size, max_size)
    short, long = (out_w, out_h) if w < h else (out_h, out_w)
    min_short = min(size, MIN_SIDE, max_size if max_size is not None else size)
    if short < min_short:
        reason = (f"keeping it would leave the short side {short} px, under the {min_short} px the model needs "
                  f"(its deepest feature map has a stride of {MIN_SIDE})")
        short = min_short
        long = max(short, min(int(short * max(w, h) / min(w, h)), max_size if max_size is not None else MAX_SIDE))
    elif max_size is None and long > MAX_SIDE:
        reason = f"keeping it would make the long side {long} px, over {MAX_SIDE} px"
        long = MAX_SIDE
    else:
        return (out_h, out_w), None
    return ((long, short) if w < h else (short, long)), reason


def get_resize_hw(image_wh: tuple[int, int], size: int, max_size: Optional[int] = None) -> tuple[int, int]:
    """Output ``(h, w)`` so the shorter side is ``size`` (aspect ratio kept), the longer <= ``max_size``.

    When the longer side would exceed ``max_size``, ``size`` is reduced to
    ``round(max_size * short / long)``. The longer output side is ``int(size * long / short)``
    (truncation), as in the reference implementation. Extreme aspect ratios are clamped, see
    :func:`resize_hw_and_reason`: no side is ever 0 px.
    """
    return resize_hw_and_reason(image_wh, size, max_size)[0]


def resize(image: PIL.Image.Image, target: Target, size: Size, max_size: Optional[int] = None):
    """Resize to ``size``: an int (shorter side, see :func:`get_resize_hw`) or an ``(h, w)`` pair (each side at
    least 1 px).

    Absolute xyxy boxes are scaled by ``(w'/w, h'/h)``, ``area`` by their product. A change of aspect ratio
    forced by an extreme shape is logged (the 1st, 10th, 100th, ... time per process).
    """
    if isinstance(size, int):
        out_hw, reason = resize_hw_and_reason(image.size, size, max_size)
        if reason:
            _resize_warnings.warn("aspect", f"a {image.width}x{image.height} image is resized to {out_hw[1]}x"
                                            f"{out_hw[0]}, not keeping its aspect ratio: {reason}; its boxes are "
                                            "scaled with it")
    else:
        out_hw = (max(1, int(size[0])), max(1, int(size[1])))
    old_w, old_h = image.size
    image = F.resize(image, list(out_hw))
    if target is None:
        return image, None
    new_w, new_h = image.size
    ratio_w, ratio_h = new_w / old_w, new_h / old_h
    target = target.copy()
    if "boxes" in target:
        scale = torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h], dtype=torch.float32)
        target["boxes"] = target["boxes"] * scale
    if "area" in target:
        target["area"] = target["area"] * (ratio_w * ratio_h)
    target["size"] = torch.tensor([new_h, new_w], dtype=torch.int64)
    return image, target


# ----------------------------------------------------------------------------------------------
# Transform classes


class RandomHorizontalFlip:
    """Flip image and boxes (absolute xyxy) with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target: Target):
        if random.random() < self.p:
            return hflip(image, target)
        return image, target


class RandomResize:
    """Resize so the shorter side is a random choice of ``sizes`` and the longer <= ``max_size``."""

    def __init__(self, sizes: Sequence[Size], max_size: Optional[int] = None):
        if len(sizes) == 0:
            raise ValueError("RandomResize needs at least one size")
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image, target: Target = None):
        return resize(image, target, random.choice(self.sizes), self.max_size)


class RandomSizeCrop:
    """Crop a random ``h x w`` window, each side uniform in ``[min_size, min(side, max_size)]``.

    If the image side is shorter than ``min_size`` the lower bound drops to the side length
    (the reference would raise there). Boxes are handled by :func:`crop`.
    """

    def __init__(self, min_size: int, max_size: int):
        if min_size > max_size:
            raise ValueError(f"RandomSizeCrop: min_size {min_size} > max_size {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def _side(self, length: int) -> int:
        upper = min(length, self.max_size)
        return random.randint(min(self.min_size, upper), upper)

    def __call__(self, image: PIL.Image.Image, target: Target):
        img_w, img_h = image.size
        crop_w, crop_h = self._side(img_w), self._side(img_h)
        top = random.randint(0, img_h - crop_h)
        left = random.randint(0, img_w - crop_w)
        return crop(image, target, (top, left, crop_h, crop_w))


class RandomSelect:
    """Apply ``transforms1`` with probability ``p``, otherwise ``transforms2``."""

    def __init__(self, transforms1: Callable, transforms2: Callable, p: float = 0.5):
        self.transforms1 = transforms1
        self.transforms2 = transforms2
        self.p = p

    def __call__(self, image, target: Target):
        if random.random() < self.p:
            return self.transforms1(image, target)
        return self.transforms2(image, target)


class ToTensor:
    """PIL image -> ``[3, H, W]`` float tensor in [0, 1]; target unchanged."""

    def __call__(self, image, target: Target):
        return F.to_tensor(image), target


class Normalize:
    """Normalise a ``[3, H, W]`` tensor by ``mean``/``std``; boxes xyxy absolute -> cxcywh in [0, 1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = list(mean)
        self.std = list(std)

    def __call__(self, image: Tensor, target: Target = None):
        image = F.normalize(image, mean=self.mean, std=self.std)
        if target is None:
            return image, None
        target = target.copy()
        if "boxes" in target:
            h, w = image.shape[-2:]
            scale = torch.tensor([w, h, w, h], dtype=torch.float32)
            target["boxes"] = box_xyxy_to_cxcywh(target["boxes"]) / scale
        return image, target


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image, target: Target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t!r}" for t in self.transforms)
        return f"{type(self).__name__}({inner}\n)"


# ----------------------------------------------------------------------------------------------
# The COCO recipe

DEFAULT_SCALES = tuple(range(480, 801, 32))  # 480, 512, ..., 800
# Reference crop branch, defined for scales up to 800: resize to one of these, then crop.
_REF_CROP_RESIZE = (400, 500, 600)
_REF_CROP_RANGE = (384, 600)


def make_coco_transforms(
    image_set: str,
    scales: Optional[Sequence[int]] = None,
    max_size: int = 1333,
    val_size: int = 800,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """The DETR/Deformable-DETR augmentation pipeline.

    train: random flip, then either a multi-scale resize (shorter side in ``scales``) or
    resize-to-{400,500,600} + random crop in [384, 600] + multi-scale resize; then
    ToTensor + ImageNet normalisation (boxes become normalised cxcywh).
    val: resize shorter side to ``val_size`` (longer <= ``max_size``) + normalisation.
    Normalisation: RGB values in [0, 1], minus ``mean``, divided by ``std`` (ImageNet's by default).

    With the defaults this is exactly the reference recipe. For small images pass smaller
    ``scales`` (e.g. ``range(96, 161, 16)``): the crop branch sizes are then scaled by
    ``max(scales) / 800``.
    """
    normalize = Compose([ToTensor(), Normalize(mean, std)])
    if image_set == "val":
        return Compose([RandomResize([val_size], max_size=max_size), normalize])
    if image_set != "train":
        raise ValueError(f"unknown image_set {image_set!r}; expected 'train' or 'val'")

    scales = list(DEFAULT_SCALES if scales is None else scales)
    factor = max(scales) / 800.0
    crop_resize = [max(1, int(round(s * factor))) for s in _REF_CROP_RESIZE]
    crop_min, crop_max = (max(1, int(round(s * factor))) for s in _REF_CROP_RANGE)
    return Compose(
        [
            RandomHorizontalFlip(),
            RandomSelect(
                RandomResize(scales, max_size=max_size),
                Compose(
                    [
                        RandomResize(crop_resize),
                        RandomSizeCrop(crop_min, crop_max),
                        RandomResize(scales, max_size=max_size),
                    ]
                ),
            ),
            normalize,
        ]
    )

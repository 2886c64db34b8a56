"""COCO-format detection dataset: :class:`CocoDetection` and :func:`build` of a split.

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

Bad data never gives a traceback or silently wrong numbers: the annotation file is checked and cleaned
up front by :mod:`datasets.coco_checks` (InputError if it is not COCO, one warning per kind of fixable
problem), and unreadable image files are found when loaded (:class:`CocoDetection`).
Images are decoded by :mod:`datasets.images`: the stored pixels, **without** applying the EXIF orientation (as
COCO, whose boxes and "width"/"height" describe the stored pixels), 16-bit and float pixels scaled to 8 bits.
``tools/check_dataset.py`` runs the same checks and decodes every image.
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import PIL.Image
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from util.errors import InputError

from . import transforms as T
from .coco_checks import MAX_EXAMPLES, check_category_ids, clean_annotations, read_annotation_file, report_findings
from .counted_log import CountedWarnings
from .samplers import in_cache_share
from .images import (  # noqa: F401 (open_rgb_image, UNREADABLE_IMAGE_ERRORS: this module's API before images.py)
    UNREADABLE_IMAGE_ERRORS, DecodedImage, apply_pixel_limit_from_env, decode_image, exif_rotation, open_rgb_image,
    size_mismatch,
)

logger = logging.getLogger(__name__)
apply_pixel_limit_from_env()

LAYOUT_HELP = (
    "expected layout: <coco_path>/{train2017,val2017}/ with the images and "
    "<coco_path>/annotations/instances_{train,val}2017.json"
)


def coco_from_dict(dataset: dict) -> COCO:
    """pycocotools ``COCO`` over an already parsed and checked ``dataset``; its prints go to the debug log."""
    coco = COCO()
    coco.dataset = dataset
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        coco.createIndex()
    logger.debug("pycocotools: %s", buffer.getvalue().strip())
    return coco


def coco_annotations_to_target(
    annotations: Sequence[dict], image_id: int, width: int, height: int
) -> dict[str, torch.Tensor]:
    """COCO annotations of one image -> target dict with absolute xyxy boxes.

    Crowd annotations (``iscrowd == 1``) are dropped, ``[x, y, w, h]`` becomes ``[x0, y0, x1, y1]``
    clamped to the image, and boxes with ``x1 <= x0`` or ``y1 <= y0`` (or not finite) are removed.
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
    # NaN compares False, so the size test alone drops NaN boxes; isfinite states it: no NaN reaches the loss.
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & torch.isfinite(boxes).all(dim=1)
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

    At construction the annotation file is checked (InputError if it is not COCO) and cleaned
    (:func:`~datasets.coco_checks.clean_annotations`: one warning per kind of problem; with ``strict_data``
    missing images and malformed boxes raise InputError). ``num_classes`` (if given) is checked against
    every category id.
    An image file that cannot be decoded is found when loaded: with ``strict_data`` InputError, else a
    warning and the next readable image (index + 1, wrapping) takes its place. A file whose size differs from
    the JSON's or with an EXIF rotation (never applied) is warned about, an error with ``strict_data``; 16-bit
    and float files are scaled to 8 bits with a warning (:mod:`datasets.images`). Negative category ids are an
    InputError.
    ``cache_mode=True`` reads the (encoded) bytes of the image files of ``cache_share`` into memory once at
    construction; decoding still happens per access, and an image outside the share is read from disk.
    ``cache_share=(local_rank, local_size)`` is this process's share of a node's cache, the images whose index
    ``i`` has ``i % local_size == local_rank`` (see datasets/samplers.py); (0, 1), every image, by default.
    ``self.coco`` is the pycocotools ground truth and ``self.ids`` the sorted image ids (index ``i`` ->
    ``self.ids[i]``). ``images_only``: a split without ground truth (COCO test-dev's image-info file, whose
    "annotations" may be absent): its images are only detected on, never scored.
    """

    def __init__(
        self,
        img_folder: str | Path,
        ann_file: str | Path,
        *,
        transforms: Optional[Callable] = None,
        cache_mode: bool = False,
        cache_share: tuple[int, int] = (0, 1),
        num_classes: Optional[int] = None,
        strict_data: bool = False,
        images_only: bool = False,
    ):
        self.img_folder = Path(img_folder)
        self.ann_file = Path(ann_file)
        self.images_only = images_only
        check_split_paths(self.img_folder, self.ann_file)
        dataset = read_annotation_file(self.ann_file, images_only=images_only)
        num_listed = len(dataset["images"])
        report_findings(clean_annotations(dataset, self.img_folder, images_only=images_only), self.ann_file,
                        strict_data)
        problem = no_images_problem(dataset, num_listed, self.ann_file, self.img_folder)
        if problem:
            raise InputError(problem)
        check_category_ids(dataset, num_classes, self.ann_file)
        self.coco = coco_from_dict(dataset)
        self.num_classes = num_classes
        self.strict_data = strict_data
        self.ids: list[int] = sorted(self.coco.imgs.keys())
        self.transforms = transforms
        self.cache_mode = cache_mode
        # Per process (each DataLoader worker has its own copy): images found unreadable, size mismatches seen,
        # images with more than 8 bits or an EXIF rotation (counts in self.image_notes.counts).
        self.unreadable: set[int] = set()
        self.size_mismatches = 0
        self.image_notes = CountedWarnings(logger)
        self._cache: dict[int, bytes] = {}
        if cache_mode:
            local_rank, local_size = cache_share
            for index, image_id in enumerate(self.ids):
                if in_cache_share(index, local_rank, local_size):
                    self._cache[image_id] = self._path(image_id).read_bytes()
            share = f" (this process's share: local rank {local_rank} of {local_size})" if local_size > 1 else ""
            logger.info("cached %d of %d images (%.1f MiB) from %s%s", len(self._cache), len(self.ids),
                        sum(map(len, self._cache.values())) / 2**20, self.img_folder, share)

    def _path(self, image_id: int) -> Path:
        return self.img_folder / self.coco.imgs[image_id]["file_name"]

    def decode(self, image_id: int) -> DecodedImage:
        """The decoded file of ``image_id`` (from the cache in cache mode); one of UNREADABLE_IMAGE_ERRORS if it
        cannot be decoded."""
        return decode_image(self._cache[image_id] if image_id in self._cache else self._path(image_id))

    def load_image(self, image_id: int) -> PIL.Image.Image:
        """The RGB 8-bit image of ``image_id``, its stored pixels (see :meth:`decode`)."""
        return self.decode(image_id).image

    def _first_readable(self, index: int) -> tuple[int, DecodedImage]:
        """``(image id, decoded file)`` of the first readable image from ``index`` on (wrapping around)."""
        for offset in range(len(self.ids)):
            image_id = self.ids[(index + offset) % len(self.ids)]
            try:
                return image_id, self.decode(image_id)
            except UNREADABLE_IMAGE_ERRORS as err:
                self._unreadable(image_id, err)
        raise InputError(f"none of the {len(self.ids)} images of {self.ann_file} in {self.img_folder} can be "
                         "decoded: check the files (tools/check_dataset.py lists them)")

    def _unreadable(self, image_id: int, err: Exception) -> None:
        path = self._path(image_id)
        if self.strict_data:
            raise InputError(f"cannot read image {path} ({err}): replace the file or remove image {image_id} from "
                             f"{self.ann_file} (without --strict_data unreadable images are skipped)")
        self.unreadable.add(image_id)
        logger.warning("cannot read image %s (%s): using the next image instead (%d unreadable so far in this "
                       "process; --strict_data makes this an error)", path, err, len(self.unreadable))

    def _check_decoded(self, image_id: int, decoded: DecodedImage) -> None:
        """Warn about (``strict_data``: raise InputError for) a size that differs from the JSON's and an EXIF
        rotation; note 16-bit and float files, scaled to 8 bits."""
        path = self._path(image_id)
        mismatch = size_mismatch(self.coco.imgs[image_id], decoded.image)
        rotation = exif_rotation(str(path), decoded.orientation)
        if self.strict_data and mismatch:
            raise InputError(f"{self.ann_file}: image {mismatch}: its boxes may not fit the picture; fix "
                             '"width"/"height" and the boxes or restore the original file (without --strict_data '
                             "this is a warning)")
        if self.strict_data and rotation:
            raise InputError(f"image {rotation}, which training ignores (as COCO: boxes and \"width\"/\"height\" "
                             "describe the stored pixels): if the boxes were drawn on the rotated view, save the "
                             "pixels rotated (PIL.ImageOps.exif_transpose) and update the boxes and "
                             "\"width\"/\"height\", else remove the orientation tag (without --strict_data the "
                             "rotation is ignored with a warning)")
        if mismatch:
            self._warn_size_mismatch(mismatch)
        if rotation:
            self.image_notes.warn("exif", f"image {rotation}: ignored, the stored pixels are used as COCO does (its "
                                          "boxes must be drawn on them; --strict_data makes this an error)")
        if decoded.scaling:
            self.image_notes.warn("bits", f"image {path}: {decoded.scaling} to get 8 bits per channel")

    def _warn_size_mismatch(self, mismatch: str) -> None:
        """Warn about the first few images whose size differs from the JSON's (per process)."""
        self.size_mismatches += 1
        if self.size_mismatches <= MAX_EXAMPLES:
            more = " (further ones not logged)" if self.size_mismatches == MAX_EXAMPLES else ""
            logger.warning("%s: image %s: its boxes may not fit the picture (a resized or rotated file?); fix "
                           "\"width\"/\"height\" and the boxes or restore the original file (tools/check_dataset.py "
                           "lists all such images; --strict_data makes this an error)%s", self.ann_file, mismatch, more)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Any, dict[str, torch.Tensor]]:
        index = range(len(self.ids))[index]  # IndexError past the end: plain iteration must stop
        image_id, decoded = self._first_readable(index)
        self._check_decoded(image_id, decoded)
        image = decoded.image
        width, height = image.size
        target = coco_annotations_to_target(self.coco.imgToAnns.get(image_id, []), image_id, width, height)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def no_images_problem(dataset: dict, num_listed: int, ann_file: Path, img_folder: Path) -> Optional[str]:
    """Why a cleaned ``dataset`` (which listed ``num_listed`` images) leaves no image to train on or evaluate, or
    None (shared with tools/check_dataset.py, so that both refuse the same splits)."""
    if dataset["images"]:
        return None
    if num_listed == 0:
        return (f'no images to use: {ann_file} lists none (its "images" list is empty); every split, val too, '
                "needs at least one image")
    return f"no images to use: {ann_file} lists {num_listed} images and none of them is in {img_folder} ({LAYOUT_HELP})"


def split_paths(coco_path: str | Path, image_set: str) -> tuple[Path, Path]:
    """``(image folder, annotation file)`` of ``image_set`` under ``coco_path``: 'train' and 'val'
    (``{train,val}2017/``, ``annotations/instances_{train,val}2017.json``) or 'test-dev' (COCO's download
    layout: ``test2017/``, ``annotations/image_info_test-dev2017.json``)."""
    if image_set not in ("train", "val", "test-dev"):
        raise ValueError(f"unknown image_set {image_set!r}; expected 'train', 'val' or 'test-dev'")
    root = Path(coco_path)
    if not root.is_dir():
        raise FileNotFoundError(f"--coco_path {root} is not a directory ({LAYOUT_HELP})")
    if image_set == "test-dev":
        return root / "test2017", root / "annotations" / "image_info_test-dev2017.json"
    return root / f"{image_set}2017", root / "annotations" / f"instances_{image_set}2017.json"


def check_split_paths(img_folder: Path, ann_file: Path) -> None:
    """Raise FileNotFoundError, with the expected layout, if the annotation file or the image folder is missing."""
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file not found: {ann_file} ({LAYOUT_HELP})")
    if not img_folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {img_folder} ({LAYOUT_HELP})")


def build(image_set: str, args, cache_share: tuple[int, int] = (0, 1)) -> CocoDetection:
    """Dataset of ``image_set`` ('train', 'val' or 'test-dev': images without ground truth, with the val
    transforms) from main.py's options: ``args.coco_path``,
    ``args.scales`` (None: the reference 480..800), ``args.max_size``, ``args.val_size``, ``args.cache_mode``,
    ``args.num_classes`` (None: no check) and ``args.strict_data``; ``cache_share``: see :class:`CocoDetection`."""
    if not args.coco_path:
        raise InputError(f"--coco_path is required ({LAYOUT_HELP})")
    img_folder, ann_file = split_paths(args.coco_path, image_set)
    transforms = T.make_coco_transforms(
        "val" if image_set == "test-dev" else image_set,
        scales=args.scales,
        max_size=args.max_size,
        val_size=args.val_size,
    )
    return CocoDetection(
        img_folder,
        ann_file,
        transforms=transforms,
        cache_mode=args.cache_mode,
        cache_share=cache_share,
        num_classes=args.num_classes,
        strict_data=args.strict_data,
        images_only=image_set == "test-dev",
    )

"""Dataset construction: ``build_dataset`` and access to the pycocotools ground truth."""
from __future__ import annotations

from pycocotools.coco import COCO
from torch.utils.data import Dataset, Subset

from .coco import CocoDetection, build as build_coco
from .coco_checks import default_num_classes

__all__ = ["build_dataset", "get_coco_api_from_dataset", "CocoDetection", "default_num_classes"]


def get_coco_api_from_dataset(dataset: Dataset) -> COCO:
    """The pycocotools ``COCO`` ground truth behind ``dataset`` (unwrapping ``torch.utils.data.Subset``)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    coco = getattr(dataset, "coco", None)
    if not isinstance(coco, COCO):
        raise TypeError(f"{type(dataset).__name__} has no pycocotools ground truth (.coco)")
    return coco


# --dataset_file -> the builder of that format; COCO is the format every reference config uses.
BUILDERS = {"coco": build_coco}


def build_dataset(image_set: str, args, cache_share: tuple[int, int] = (0, 1)) -> CocoDetection:
    """Build the ``image_set`` ('train', 'val' or 'test-dev') split of the ``args.dataset_file`` format; see
    :func:`datasets.coco.build` for the other ``args`` and ``cache_share`` (``--cache_mode``: this process's
    ``(local rank, processes per node)``)."""
    if args.dataset_file not in BUILDERS:
        raise ValueError(f"unknown --dataset_file {args.dataset_file!r}; choose one of {sorted(BUILDERS)}")
    return BUILDERS[args.dataset_file](image_set, args, cache_share)

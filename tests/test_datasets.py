"""Tests of the data side: synthetic generator, CocoDetection, transforms, CocoEvaluator."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from datasets import build_dataset, get_coco_api_from_dataset  # noqa: E402
from datasets import transforms as T  # noqa: E402
from datasets.coco import CocoDetection  # noqa: E402
from datasets.coco_checks import default_num_classes  # noqa: E402
from datasets.coco_eval import CocoEvaluator  # noqa: E402
from tools.make_synthetic_coco import make_synthetic_coco  # noqa: E402
from util.box_ops import box_cxcywh_to_xyxy  # noqa: E402
from util.errors import InputError  # noqa: E402

SMALL = dict(scales=[96, 112, 128, 144, 160], max_size=267, val_size=128)


def make_args(coco_path, **overrides) -> SimpleNamespace:
    values = dict(dataset_file="coco", coco_path=str(coco_path), cache_mode=False, num_classes=None, strict_data=False,
                  **SMALL)
    values.update(overrides)
    return SimpleNamespace(**values)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_coco(root, num_train=12, num_val=6, seed=0, size=128)
    return root


def write_hand_made(root: Path, annotations: list[dict], categories=None, image_sizes=((64, 48), (32, 32))) -> Path:
    """A val split with images of the given (w, h) sizes; ids 1, 2, ...; returns the annotation file."""
    (root / "val2017").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    images = []
    for image_id, (w, h) in enumerate(image_sizes, start=1):
        name = f"{image_id:012d}.png"
        Image.new("RGB", (w, h), (90, 120, 30)).save(root / "val2017" / name)
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
    for ann_id, ann in enumerate(annotations, start=1):
        ann.setdefault("id", ann_id)
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
    categories = categories or [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    ann_file = root / "annotations" / "instances_val2017.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann_file


def target_with(boxes, labels=None) -> dict:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    n = boxes.shape[0]
    return {
        "boxes": boxes,
        "labels": torch.tensor(labels if labels is not None else list(range(1, n + 1)), dtype=torch.int64),
        "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
        "iscrowd": torch.zeros(n, dtype=torch.int64),
    }


# ----------------------------------------------------------------------------------------------
# Synthetic generator


def test_synthetic_generator_is_deterministic(tmp_path):
    make_synthetic_coco(tmp_path / "a", 6, 3, seed=7, size=64)
    make_synthetic_coco(tmp_path / "b", 6, 3, seed=7, size=64)
    make_synthetic_coco(tmp_path / "c", 6, 3, seed=8, size=64)
    for split in ("train", "val"):
        rel = f"annotations/instances_{split}2017.json"
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    rel = "annotations/instances_train2017.json"
    assert (tmp_path / "a" / rel).read_bytes() != (tmp_path / "c" / rel).read_bytes()


def test_synthetic_layout_and_annotations(synthetic_root):
    data = json.loads((synthetic_root / "annotations/instances_train2017.json").read_text())
    assert [c["id"] for c in data["categories"]] == [1, 2, 3]
    assert len(data["images"]) == 12 and data["annotations"]
    for img in data["images"]:
        assert (synthetic_root / "train2017" / img["file_name"]).is_file()
        assert (img["width"], img["height"]) == (128, 128)
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        assert ann["iscrowd"] == 0 and ann["category_id"] in (1, 2, 3)
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 128 and y + h <= 128
        assert 0 < ann["area"] <= w * h
    assert default_num_classes(synthetic_root / "annotations/instances_train2017.json") == 91


# ----------------------------------------------------------------------------------------------
# CocoDetection


@pytest.mark.parametrize("image_set", ["train", "val"])
def test_dataset_returns_normalised_cxcywh(synthetic_root, image_set):
    random.seed(0)
    dataset = build_dataset(image_set, make_args(synthetic_root, cache_mode=True, num_classes=4))
    assert len(dataset) == (12 if image_set == "train" else 6)
    for image, target in dataset:
        assert image.ndim == 3 and image.shape[0] == 3
        assert tuple(target["size"].tolist()) == tuple(image.shape[1:])
        assert target["orig_size"].tolist() == [128, 128]
        boxes = target["boxes"]
        assert boxes.dtype == torch.float32 and boxes.shape == (len(target["labels"]), 4)
        assert target["labels"].dtype == torch.int64
        assert ((boxes >= 0) & (boxes <= 1)).all()
        assert (boxes[:, 2:] > 0).all()
        if image_set == "val":
            assert min(image.shape[1:]) == 128


@pytest.mark.parametrize("image_set", ["train", "val"])
def test_max_size_bounds_the_longer_side(synthetic_root, image_set):
    random.seed(0)
    dataset = build_dataset(image_set, make_args(synthetic_root, scales=[128], val_size=128, max_size=100))
    for image, target in dataset:
        assert max(image.shape[1:]) <= 100 and tuple(target["size"].tolist()) == tuple(image.shape[1:])


def test_crowd_and_degenerate_boxes_dropped(tmp_path):
    anns = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 5, 20, 10]},  # kept
        {"image_id": 1, "category_id": 2, "bbox": [0, 0, 30, 30], "iscrowd": 1},  # crowd
        {"image_id": 1, "category_id": 2, "bbox": [40, 5, 0, 10]},  # zero width
        {"image_id": 1, "category_id": 2, "bbox": [70, 5, 10, 10]},  # right of the image
        {"image_id": 1, "category_id": 2, "bbox": [50, 40, 30, 30]},  # clamped to (50, 40, 64, 48)
    ]
    ann_file = write_hand_made(tmp_path, anns)
    dataset = CocoDetection(tmp_path / "val2017", ann_file)
    _, target = dataset[0]
    assert target["boxes"].tolist() == [[10, 5, 30, 15], [50, 40, 64, 48]]
    assert target["labels"].tolist() == [1, 2]
    assert target["iscrowd"].tolist() == [0, 0] and target["area"].shape == (2,)
    assert target["image_id"].tolist() == [1] and target["orig_size"].tolist() == [48, 64]


def test_image_without_annotations_gives_empty_boxes(tmp_path):
    write_hand_made(tmp_path, [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}])
    dataset = build_dataset("val", make_args(tmp_path))
    image, target = dataset[1]  # image id 2 has no annotation
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert tuple(image.shape[1:]) == (128, 128)


def test_category_id_above_num_classes_raises(tmp_path):
    ann_file = write_hand_made(
        tmp_path, [{"image_id": 1, "category_id": 150, "bbox": [1, 1, 5, 5]}],
        categories=[{"id": 1, "name": "a"}, {"id": 150, "name": "b"}],
    )
    with pytest.raises(InputError) as err:
        build_dataset("val", make_args(tmp_path, num_classes=91))
    message = str(err.value)
    assert "150" in message and str(ann_file) in message and "--num_classes 151" in message
    assert default_num_classes(ann_file) == 151
    assert len(build_dataset("val", make_args(tmp_path, num_classes=151))) == 2


def test_missing_files_raise_file_not_found(tmp_path):
    (tmp_path / "val2017").mkdir()
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        build_dataset("val", make_args(tmp_path))
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        build_dataset("val", make_args(tmp_path / "does_not_exist"))


# ----------------------------------------------------------------------------------------------
# Transforms


def test_flip_twice_is_identity():
    image = Image.new("RGB", (50, 30))
    target = target_with([[2, 3, 10, 20], [30, 0, 50, 30]])
    flipped_image, flipped = T.hflip(image, target)
    assert flipped["boxes"].tolist() == [[40, 3, 48, 20], [0, 0, 20, 30]]
    _, back = T.hflip(flipped_image, flipped)
    assert torch.equal(back["boxes"], target["boxes"])


def test_resize_scales_boxes_and_size():
    image = Image.new("RGB", (64, 48))
    target = target_with([[8, 4, 16, 12]])
    target["size"] = torch.tensor([48, 64])
    out_image, out = T.resize(image, target, 96)
    assert out_image.size == (128, 96)
    assert out["boxes"].tolist() == [[16, 8, 32, 24]]
    assert out["area"].tolist() == [256.0] and out["size"].tolist() == [96, 128]
    # reference rounding rule, including its max_size quirk (long side may end up > max_size)
    assert T.get_resize_hw((640, 480), 800, 1333) == (800, 1066)
    assert T.get_resize_hw((500, 100), 800, 1333) == (267, 1335)
    assert T.get_resize_hw((480, 640), 480, 1333) == (640, 480)


def test_crop_drops_boxes_outside():
    image = Image.new("RGB", (100, 100))
    target = target_with([[10, 10, 30, 30], [60, 60, 90, 90], [45, 45, 70, 70]], labels=[1, 2, 3])
    out_image, out = T.crop(image, target, (0, 0, 50, 50))  # top, left, h, w
    assert out_image.size == (50, 50) and out["size"].tolist() == [50, 50]
    assert out["boxes"].tolist() == [[10, 10, 30, 30], [45, 45, 50, 50]]
    assert out["labels"].tolist() == [1, 3] and out["area"].tolist() == [400, 25]
    assert out["iscrowd"].tolist() == [0, 0]


def test_random_size_crop_keeps_boxes_inside():
    random.seed(1)
    crop = T.RandomSizeCrop(20, 60)
    for _ in range(20):
        target = target_with([[10, 10, 30, 30], [60, 60, 90, 90]])
        image, out = crop(Image.new("RGB", (100, 80)), target)
        w, h = image.size
        assert 20 <= w <= 60 and 20 <= h <= 60 and out["size"].tolist() == [h, w]
        boxes = out["boxes"]
        assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
        assert (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all() and (boxes >= 0).all()
        assert len(out["labels"]) == len(boxes) == len(out["area"])


def test_normalize_gives_cxcywh():
    image = torch.zeros(3, 40, 80)
    _, out = T.Normalize(T.IMAGENET_MEAN, T.IMAGENET_STD)(image, target_with([[0, 0, 40, 20]]))
    assert torch.allclose(out["boxes"], torch.tensor([[0.25, 0.25, 0.5, 0.5]]))
    _, empty = T.Normalize(T.IMAGENET_MEAN, T.IMAGENET_STD)(image, target_with([]))
    assert empty["boxes"].shape == (0, 4)


def test_val_transform_of_a_constant_colour_is_the_imagenet_normalisation_by_hand():
    """Catches the mean or std in BGR order (or another channel order, or constants of another dataset): a
    constant (R, G, B) = (10, 200, 30) image gives (c / 255 - mean_c) / std_c per channel, written out here with
    ImageNet's RGB mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225)."""
    image = Image.new("RGB", (40, 24), (10, 200, 30))
    tensor, _ = T.make_coco_transforms("val", val_size=24, max_size=40)(image, None)
    assert tensor.shape == (3, 24, 40)
    expected = [(10 / 255 - 0.485) / 0.229, (200 / 255 - 0.456) / 0.224, (30 / 255 - 0.406) / 0.225]
    for channel, value in enumerate(expected):
        torch.testing.assert_close(tensor[channel], torch.full((24, 40), value), rtol=0, atol=1e-6)


def test_default_recipe_matches_reference():
    train = T.make_coco_transforms("train")
    flip, select, _ = train.transforms
    assert isinstance(flip, T.RandomHorizontalFlip)
    assert select.transforms1.sizes == list(range(480, 801, 32)) and select.transforms1.max_size == 1333
    resize1, crop, resize2 = select.transforms2.transforms
    assert resize1.sizes == [400, 500, 600] and (crop.min_size, crop.max_size) == (384, 600)
    assert resize2.sizes == list(range(480, 801, 32)) and resize2.max_size == 1333
    val_resize = T.make_coco_transforms("val").transforms[0]
    assert val_resize.sizes == [800] and val_resize.max_size == 1333


# ----------------------------------------------------------------------------------------------
# Evaluation


def test_evaluator_perfect_predictions(synthetic_root):
    dataset = build_dataset("val", make_args(synthetic_root))
    subset = Subset(dataset, list(range(len(dataset))))
    evaluator = CocoEvaluator(get_coco_api_from_dataset(subset), ("bbox",))
    for _, target in subset:
        h, w = target["orig_size"].tolist()
        boxes = box_cxcywh_to_xyxy(target["boxes"]) * torch.tensor([w, h, w, h])
        scores = torch.ones(len(boxes))
        evaluator.update({int(target["image_id"]): {"scores": scores, "labels": target["labels"], "boxes": boxes}})
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    evaluator.summarize()
    stats = evaluator.stats
    assert len(stats) == 12
    assert stats[0] == pytest.approx(1.0) and stats[1] == pytest.approx(1.0)
    assert evaluator.coco_eval["bbox"].stats[0] == pytest.approx(1.0)


def test_evaluator_without_predictions(synthetic_root):
    coco_gt = CocoDetection(synthetic_root / "val2017", synthetic_root / "annotations/instances_val2017.json").coco
    never_updated = CocoEvaluator(coco_gt)
    never_updated.synchronize_between_processes()
    never_updated.accumulate()
    never_updated.summarize()
    assert never_updated.stats == [-1.0] * 12

    empty = CocoEvaluator(coco_gt)
    empty.update({i: {"scores": [], "labels": [], "boxes": torch.zeros(0, 4)} for i in coco_gt.getImgIds()})
    empty.accumulate()
    assert all(s in (0.0, -1.0) for s in empty.stats) and empty.stats[0] == 0.0


def _subset_stats(coco_gt, detections: dict) -> list[float]:
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update(detections)
    return evaluator.stats


def test_evaluating_a_subset_equals_evaluating_that_subset_alone(tmp_path):
    """Only the images given detections are scored: a subset of a 3-image ground truth gives the stats of a
    ground truth that holds that subset alone (the other images' objects are not counted as missed)."""
    annotations = [{"image_id": 1, "category_id": 1, "bbox": [10, 5, 20, 10]},
                   {"image_id": 2, "category_id": 2, "bbox": [2, 2, 12, 12]},
                   {"image_id": 3, "category_id": 1, "bbox": [4, 4, 8, 8]}]
    full = tmp_path / "full"
    write_hand_made(full, [dict(a) for a in annotations], image_sizes=((64, 48), (32, 32), (40, 40)))
    alone = tmp_path / "alone"
    write_hand_made(alone, [dict(annotations[0]), dict(annotations[1])], image_sizes=((64, 48), (32, 32)))
    detections = {1: {"scores": torch.tensor([0.9, 0.4]), "labels": torch.tensor([1, 1]),
                      "boxes": torch.tensor([[11.0, 5, 30, 16], [40, 30, 60, 45]])},
                  2: {"scores": torch.tensor([0.8]), "labels": torch.tensor([2]),
                      "boxes": torch.tensor([[2.0, 3, 13, 14]])}}
    subset = _subset_stats(get_coco_api_from_dataset(build_dataset("val", make_args(full))), detections)
    assert subset == _subset_stats(get_coco_api_from_dataset(build_dataset("val", make_args(alone))), detections)
    assert subset[0] > 0.5


def test_evaluator_with_image_without_annotations(tmp_path):
    write_hand_made(tmp_path, [{"image_id": 1, "category_id": 1, "bbox": [10, 5, 20, 10]}])
    coco_gt = get_coco_api_from_dataset(build_dataset("val", make_args(tmp_path)))
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update({
        1: {"scores": torch.tensor([0.9]), "labels": torch.tensor([1]), "boxes": torch.tensor([[10.0, 5, 30, 15]])},
        2: {"scores": torch.tensor([]), "labels": torch.tensor([], dtype=torch.int64), "boxes": torch.zeros(0, 4)},
    })
    assert evaluator.stats[0] == pytest.approx(1.0)

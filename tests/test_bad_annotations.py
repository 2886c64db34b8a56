"""Bad annotations get a clear answer: boxes, category ids, images without annotations
(datasets/coco_checks.py), and tools/check_dataset.py's report of every problem."""
from __future__ import annotations

import json
import logging
import math

import PIL.Image
import pytest
import torch

import main
from datasets import build_dataset
from datasets.coco import CocoDetection, coco_annotations_to_target
from datasets.coco_eval import CocoEvaluator
from models import build_model
from test_models_tiny import TINY as MODEL_TINY
from tools.check_dataset import main as check_dataset
from tools.make_synthetic_coco import make_synthetic_coco
from util.errors import InputError
from util.misc import collate_fn
from bad_data_helpers import box, image, make_args, pil_error, warnings, write_split

# ----------------------------------------------------------------------------------------------
# 4. Boxes


def test_bad_boxes_are_counted_per_kind_and_never_reach_the_targets(tmp_path, caplog):
    annotations = [
        box(1, [1, 1, 5, 5]),  # 1: fine
        box(1, [1, 1, 0, 5]),  # 2: zero width
        box(1, [1, 1, 5, -2]),  # 3: negative height
        box(1, [50, 1, 5, 5]),  # 4: right of the 40x30 image
        box(1, [35, 25, 10, 10]),  # 5: partly outside, clipped to [35, 25, 40, 30]
        box(1, [1, 1, math.nan, 5]),  # 6
        box(1, [1, 1, math.inf, 5]),  # 7
        box(1, ["1", 1, 5, 5]),  # 8
        box(1, [1, 1, 5]),  # 9
        {"image_id": 1, "category_id": 1, "area": 1, "iscrowd": 0},  # 10: no bbox
    ]
    ann_file = write_split(tmp_path, "val", [image(1)], annotations)
    caplog.set_level(logging.WARNING)
    dataset = CocoDetection(tmp_path / "val2017", ann_file)
    assert warnings(caplog) == [
        f'{ann_file}: annotations whose "bbox" is not 4 finite numbers [x, y, width, height]: 5 (e.g. annotation 6: '
        '[1, 1, NaN, 5], annotation 7: [1, 1, Infinity, 5], annotation 8: ["1", 1, 5, 5]); dropped; --strict_data '
        "makes this an error",
        f"{ann_file}: boxes with zero or negative width or height: 2 (e.g. annotation 2: [1, 1, 0, 5] in a 40x30 "
        "image, annotation 3: [1, 1, 5, -2] in a 40x30 image); left out of the training targets (kept in the "
        "evaluation ground truth, as in the reference)",
        f"{ann_file}: boxes entirely outside their image: 1 (e.g. annotation 4: [50, 1, 5, 5] in a 40x30 image); "
        "left out of the training targets",
        f"{ann_file}: boxes partly outside their image: 1 (e.g. annotation 5: [35, 25, 10, 10] in a 40x30 image); "
        "clipped to the image for training",
    ]
    assert sorted(dataset.coco.anns) == [1, 2, 3, 4, 5]  # the evaluation ground truth of the reference
    _, target = dataset[0]
    assert target["boxes"].tolist() == [[1, 1, 6, 6], [35, 25, 40, 30]]

    with pytest.raises(InputError) as info:
        CocoDetection(tmp_path / "val2017", ann_file, strict_data=True)
    assert str(info.value) == (
        f'{ann_file}: annotations whose "bbox" is not 4 finite numbers [x, y, width, height]: 5 (e.g. annotation 6: '
        '[1, 1, NaN, 5], annotation 7: [1, 1, Infinity, 5], annotation 8: ["1", 1, 5, 5]): correct or remove these '
        "annotations (without --strict_data they are dropped)")


@pytest.mark.parametrize("side,bbox", [("left", [-2, 5, 10, 10]), ("top", [5, -2, 10, 10]),
                                       ("right", [35, 5, 10, 10]), ("bottom", [5, 25, 10, 10])])
def test_a_box_partly_outside_any_side_of_its_image_is_reported(tmp_path, caplog, side, bbox):
    ann_file = write_split(tmp_path, "val", [image(1)], [box(1, bbox)])
    caplog.set_level(logging.WARNING)
    CocoDetection(tmp_path / "val2017", ann_file)
    assert warnings(caplog) == [f"{ann_file}: boxes partly outside their image: 1 (e.g. annotation 1: "
                                f"{json.dumps(bbox)} in a 40x30 image); clipped to the image for training"]


def test_non_finite_boxes_are_dropped_from_targets():
    anns = [box(1, [1, 1, 5, 5]), box(1, [math.nan, 1, 5, 5]), box(1, [-math.inf, 1, math.inf, 5])]
    target = coco_annotations_to_target(anns, 1, width=40, height=30)
    assert target["boxes"].tolist() == [[1, 1, 6, 6]] and target["labels"].tolist() == [1]


def test_missing_area_and_iscrowd_are_filled_in_and_evaluation_works(tmp_path, caplog):
    annotations = [{"image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 5]},
                   {"image_id": 1, "category_id": 2, "bbox": [20, 10, 8, 8], "area": "big", "iscrowd": 0}]
    ann_file = write_split(tmp_path, "val", [image(1)], annotations)
    caplog.set_level(logging.WARNING)
    dataset = CocoDetection(tmp_path / "val2017", ann_file)
    assert warnings(caplog) == [
        f'{ann_file}: annotations without a valid "area": 2 (e.g. annotation 1, annotation 2); using the box\'s '
        "width x height (COCO evaluation uses it for small/medium/large)",
        f'{ann_file}: annotations without a valid "iscrowd" (0 or 1): 1 (e.g. annotation 1); treated as 0 '
        "(not crowd)",
    ]
    assert [(a["area"], a["iscrowd"]) for a in dataset.coco.dataset["annotations"]] == [(50, 0), (64, 0)]
    evaluator = CocoEvaluator(dataset.coco)
    evaluator.update({1: {"scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2]),
                          "boxes": torch.tensor([[2.0, 3, 12, 8], [20, 10, 28, 18]])}})
    evaluator.accumulate()
    assert evaluator.stats[0] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# 5. Category ids


def test_category_ids_beyond_num_classes_or_undeclared(tmp_path, caplog):
    ann_file = write_split(tmp_path, "val", [image(1)],
                           [box(1, [1, 1, 5, 5], category_id=7), box(1, [1, 1, 5, 5], category_id=150)],
                           categories=[{"id": 1, "name": "a"}, {"id": 150, "name": "b"}])
    with pytest.raises(InputError) as info:
        build_dataset("val", make_args(tmp_path, num_classes=91))
    assert str(info.value) == (
        f"category id 150 in {ann_file} is >= num_classes=91 (all offending ids: [150]); the classifier has no "
        "output for it. Pass --num_classes 151 (max category id + 1, or 91 for standard COCO ids) or fix the "
        "annotation file.")
    caplog.set_level(logging.WARNING)
    build_dataset("val", make_args(tmp_path, num_classes=151))
    assert warnings(caplog)[-1] == (
        f'{ann_file}: annotations whose "category_id" is not declared in "categories": 1 (e.g. annotation 1: '
        'category_id 7); trained on, but COCO evaluation ignores them; declare the category in "categories"')


# ----------------------------------------------------------------------------------------------
# 6. Images without annotations: negatives, kept


def test_a_batch_of_images_without_annotations_trains(tmp_path):
    write_split(tmp_path, "train", [image(1), image(2)], [])
    dataset = build_dataset("train", make_args(tmp_path, num_classes=5))
    samples, targets = collate_fn([dataset[0], dataset[1]])
    assert [t["boxes"].shape for t in targets] == [(0, 4), (0, 4)]
    torch.manual_seed(0)
    model, criterion, _ = build_model(main.parse_args(MODEL_TINY))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    losses = criterion(model(samples), targets)
    loss = sum(losses[k] * w for k, w in criterion.weight_dict.items())
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# 8. tools/check_dataset.py


def test_check_dataset_summary_and_problems(tmp_path, capsys):
    make_synthetic_coco(tmp_path, num_train=6, num_val=2, seed=0, size=32)
    ann_file = tmp_path / "annotations" / "instances_train2017.json"
    data = json.loads(ann_file.read_text())
    folder = tmp_path / "train2017"
    (folder / data["images"][0]["file_name"]).unlink()
    (folder / data["images"][1]["file_name"]).write_bytes(b"not an image")
    PIL.Image.new("RGB", (16, 32)).save(folder / data["images"][2]["file_name"], "JPEG")
    image_5, image_6 = data["images"][4]["id"], data["images"][5]["id"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] not in (image_5, image_6)]
    data["annotations"] += [box(image_5, [1, 1, math.nan, 4], id=1001), box(image_5, [1, 1, 4, 4], id=1002,
                                                                            category_id=9)]
    ann_file.write_text(json.dumps(data))

    assert check_dataset(["--coco_path", str(tmp_path), "--num_classes", "4"]) == 1
    lines = capsys.readouterr().out.splitlines()
    per_category = {}
    for a in data["annotations"]:
        per_category[a["category_id"]] = per_category.get(a["category_id"], 0) + 1
    names = {1: "square", 2: "circle", 3: "triangle", 9: "(undeclared)"}
    annotated = {a["image_id"] for a in data["annotations"]}
    assert image_6 not in annotated  # a negative: counted, not a problem
    train_end = lines.index("  problems:")
    assert lines[:train_end] == [
        f"train: {ann_file} (images in {folder})",
        f"  images: 6, without annotations: {6 - len(annotated)}",
        f"  annotations: {len(data['annotations'])}",
        "  boxes per category:",
        *(f"    {cid} {names[cid]}: {n}" for cid, n in sorted(per_category.items())),
        "  suggested --num_classes: 91",
    ]
    name = [image["file_name"] for image in data["images"]]
    assert lines[train_end + 1:train_end + 8] == [
        f"    images missing from {folder}: 1 (e.g. {name[0]}); skipped with their annotations",
        '    annotations whose "bbox" is not 4 finite numbers [x, y, width, height]: 1 (e.g. annotation 1001: '
        "[1, 1, NaN, 4]); dropped",
        '    annotations whose "category_id" is not declared in "categories": 1 (e.g. annotation 1002: '
        "category_id 9); trained on, but COCO evaluation ignores them; declare the category in \"categories\"",
        f"    images that cannot be decoded: 1 (e.g. {name[1]}: {pil_error(folder / name[1])}); skipped when loaded "
        "(the next image is used)",
        f'    images whose size differs from their "width"/"height": 1 (e.g. {name[2]}: 16x32 on disk, 32x32 in the '
        "JSON); boxes are clipped to the real size and may not fit the picture (--strict_data: an error)",
        f"    category id 9 in {ann_file} is >= num_classes=4 (all offending ids: [9]); the classifier has no output "
        "for it. Pass --num_classes 91 (max category id + 1, or 91 for standard COCO ids) or fix the annotation "
        "file.",
        f"val: {tmp_path / 'annotations/instances_val2017.json'} (images in {tmp_path / 'val2017'})",
    ]
    assert lines[-2:] == ["  problems: none", "6 kinds of problems found"]

    assert check_dataset(["--coco_path", str(tmp_path), "--splits", "val"]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == ["  problems: none", "no problems found"]

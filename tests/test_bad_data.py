"""Bad data gets a clear answer: an InputError naming the problem and the fix, or one warning per kind of
problem with a count (datasets/coco.py, runner.build_data_loader, main.py, tools/check_dataset.py)."""
from __future__ import annotations

import io
import json
import logging
import math
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import PIL.Image
import pytest
import torch
from torch.utils.data import DataLoader

import main
from datasets import build_dataset
from datasets.coco import LAYOUT_HELP, CocoDetection, coco_annotations_to_target
from datasets.coco_checks import COCO_FORMAT_HELP
from datasets.coco_eval import CocoEvaluator
from models import build_model
from test_engine import TINY as ENGINE_TINY
from test_models_tiny import TINY as MODEL_TINY
from tools.check_dataset import main as check_dataset
from tools.make_synthetic_coco import make_synthetic_coco
from util.errors import InputError
from util.misc import collate_fn

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


# ----------------------------------------------------------------------------------------------
# 1. Missing folder and files


def test_missing_paths_name_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        build_dataset("val", make_args(tmp_path / "nowhere"))
    assert str(info.value) == f"--coco_path {tmp_path / 'nowhere'} is not a directory ({LAYOUT_HELP})"
    (tmp_path / "val2017").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        build_dataset("val", make_args(tmp_path))
    ann_file = tmp_path / "annotations" / "instances_val2017.json"
    assert str(info.value) == f"annotation file not found: {ann_file} ({LAYOUT_HELP})"
    write_split(tmp_path, "val", [image(1)], [])
    shutil.rmtree(tmp_path / "val2017")
    with pytest.raises(FileNotFoundError) as info:
        build_dataset("val", make_args(tmp_path))
    assert str(info.value) == f"image folder not found: {tmp_path / 'val2017'} ({LAYOUT_HELP})"
    assert LAYOUT_HELP == ("expected layout: <coco_path>/{train2017,val2017}/ with the images and "
                           "<coco_path>/annotations/instances_{train,val}2017.json")


# ----------------------------------------------------------------------------------------------
# 2. Files that are not COCO


NOT_COCO = {
    "not_json": ('{"images": [,]}', "it is not valid JSON (Expecting value at line 1, column 13)"),
    "binary": (b"\xff\xd8\xff\xe0 a JPEG", "it is not valid JSON (not UTF-8 text)"),
    "array": ("[1, 2]", "the file holds an array, not a JSON object"),
    "no_annotations": ({"images": [], "categories": []}, 'it has no "annotations" list'),
    "no_categories": ({"images": [], "annotations": []}, 'it has no "categories" list'),
    "images_not_list": ({"images": {}, "annotations": [], "categories": []}, '"images" is an object, not a list'),
    "record_not_object": ({"images": [], "annotations": [5], "categories": []},
                          '"annotations"[0] is a number, not an object'),
    "string_id": ({"images": [image(1, id="1")], "annotations": [], "categories": []},
                  '"images"[0]["id"] must be an integer, found "1"'),
    "no_file_name": ({"images": [{"id": 1, "width": 4, "height": 4}], "annotations": [], "categories": []},
                     '"images"[0]["file_name"] must be a non-empty string, but it is missing'),
    "float_category": ({"images": [image(1)], "annotations": [box(1, [1, 1, 2, 2], id=1, category_id=1.5)],
                        "categories": []}, '"annotations"[0]["category_id"] must be an integer, found 1.5'),
    "duplicate_image_ids": ({"images": [image(1), image(1), image(2), image(2)], "annotations": [],
                             "categories": []},
                            '2 ids appear more than once in "images" (e.g. 1, 2); each entry needs its own id '
                            "(pycocotools indexes them by id)"),
    "duplicate_annotation_ids": ({"images": [image(1)], "annotations": [box(1, [1, 1, 2, 2], id=7),
                                                                      box(1, [2, 2, 2, 2], id=7)], "categories": []},
                                 '1 ids appear more than once in "annotations" (e.g. 7); each entry needs its own id '
                                 "(pycocotools indexes them by id)"),
    "unknown_image_id": ({"images": [image(1)], "annotations": [box(1, [1, 1, 2, 2], id=1),
                                                                box(99, [1, 1, 2, 2], id=2)], "categories": []},
                         '1 annotations refer to image ids missing from "images" (e.g. annotation 2 -> image_id 99); '
                         "list those images or remove the annotations"),
}


@pytest.mark.parametrize("case", NOT_COCO)
def test_annotation_file_that_is_not_coco(tmp_path, case, capsys):
    content, problem = NOT_COCO[case]
    write_split(tmp_path, "val", [image(1)], [])
    ann_file = tmp_path / "annotations" / "instances_val2017.json"
    if isinstance(content, bytes):
        ann_file.write_bytes(content)
    else:
        ann_file.write_text(content if isinstance(content, str) else json.dumps(content))
    expected = f"{ann_file} is not a usable COCO annotation file: {problem}. {COCO_FORMAT_HELP}"
    with pytest.raises(InputError) as info:
        build_dataset("val", make_args(tmp_path))
    assert str(info.value) == expected
    assert check_dataset(["--coco_path", str(tmp_path), "--splits", "val"]) == 2
    assert capsys.readouterr().err == f"error: {expected}\n"


def test_coco_format_help_text():
    assert COCO_FORMAT_HELP == (
        'A COCO annotation file is a JSON object with the lists "images" (each {"id": int, "file_name": str, '
        '"width": int, "height": int}), "annotations" (each {"id": int, "image_id": int, "category_id": int, '
        '"bbox": [x, y, width, height], "area": number, "iscrowd": 0 or 1}) and "categories" (each {"id": int, '
        '"name": str}).')


# ----------------------------------------------------------------------------------------------
# 3. Images missing on disk or unreadable


def test_missing_images_are_skipped_with_one_warning_or_fail_with_strict_data(tmp_path, caplog):
    ann_file = write_split(tmp_path, "val", [image(1), image(2, pixels=None), image(3, pixels=None)],
                           [box(1, [1, 1, 5, 5]), box(2, [1, 1, 5, 5]), box(3, [1, 1, 5, 5])])
    folder = tmp_path / "val2017"
    caplog.set_level(logging.WARNING)
    dataset = build_dataset("val", make_args(tmp_path))
    assert warnings(caplog) == [
        f"{ann_file}: images missing from {folder}: 2 (e.g. 000000000002.png, 000000000003.png); skipped with "
        "their annotations; --strict_data makes this an error"]
    assert dataset.ids == [1] and sorted(dataset.coco.anns) == [1]

    with pytest.raises(InputError) as info:
        build_dataset("val", make_args(tmp_path, strict_data=True))
    assert str(info.value) == (
        f"{ann_file}: images missing from {folder}: 2 (e.g. 000000000002.png, 000000000003.png): restore the files "
        "or remove these images from the annotation file (without --strict_data they are skipped with their "
        "annotations)")

    (folder / "000000000001.png").unlink()
    with pytest.raises(InputError) as info:
        build_dataset("val", make_args(tmp_path))
    assert str(info.value) == (f"no images to use: {ann_file} lists 3 images and none of them is in {folder} "
                               f"({LAYOUT_HELP})")


@pytest.fixture
def unreadable_split(tmp_path) -> Path:
    """val: image 1 fine, 2 a text file, 3 zero bytes, 4 a truncated JPEG; one box per image."""
    write_split(tmp_path, "val", [image(1), image(2, pixels=b"not an image"), image(3, pixels=b""),
                                  image(4, pixels=truncated_jpeg())],
                [box(i, [1, 1, 5, 5], category_id=1 + i % 2) for i in (1, 2, 3, 4)])
    return tmp_path


def test_unreadable_image_is_replaced_by_the_next_readable_one(unreadable_split, caplog):
    caplog.set_level(logging.WARNING)
    dataset = CocoDetection(unreadable_split / "val2017", unreadable_split / "annotations/instances_val2017.json")
    image, target = dataset[1]  # images 2, 3 and 4 are unreadable: wraps around to image 1
    assert target["image_id"].tolist() == [1] and image.size == (40, 30)
    paths = [unreadable_split / "val2017" / f"{i:012d}.png" for i in (2, 3, 4)]
    assert warnings(caplog) == [
        f"cannot read image {path} ({pil_error(path)}): using the next image instead ({n} unreadable so far in "
        "this process; --strict_data makes this an error)" for n, path in enumerate(paths, start=1)]
    assert dataset.unreadable == {2, 3, 4}
    assert [dataset[i][1]["image_id"].item() for i in range(4)] == [1, 1, 1, 1]
    with pytest.raises(IndexError):
        dataset[4]


def test_unreadable_image_with_strict_data_fails_cleanly_through_dataloader_workers(unreadable_split):
    dataset = CocoDetection(unreadable_split / "val2017", unreadable_split / "annotations/instances_val2017.json",
                            strict_data=True)
    path = unreadable_split / "val2017" / "000000000002.png"
    expected = (f"cannot read image {path} ({pil_error(path)}): replace the file or remove image 2 from "
                f"{dataset.ann_file} (without --strict_data unreadable images are skipped)")
    with pytest.raises(InputError) as info:
        dataset[1]
    assert str(info.value) == expected
    loader = DataLoader(torch.utils.data.Subset(dataset, [1]), num_workers=1, collate_fn=collate_fn)
    try:
        next(iter(loader))
    except InputError as err:
        err.__traceback__ = None  # frees the loader's iterator: its worker stops now, not at garbage collection
        message = str(err)
    assert message == expected  # not "Caught InputError in DataLoader worker process 0 ..."


def test_no_readable_image_at_all(tmp_path):
    ann_file = write_split(tmp_path, "val", [image(1, pixels=b""), image(2, pixels=b"")], [])
    dataset = CocoDetection(tmp_path / "val2017", ann_file)
    with pytest.raises(InputError) as info:
        dataset[0]
    assert str(info.value) == (f"none of the 2 images of {ann_file} in {tmp_path / 'val2017'} can be decoded: check "
                               "the files (tools/check_dataset.py lists them)")


def test_image_size_differing_from_the_json_is_warned(tmp_path, caplog):
    ann_file = write_split(tmp_path, "val", [image(1, width=30, height=40), image(2)], [box(2, [1, 1, 5, 5])])
    caplog.set_level(logging.WARNING)
    dataset = CocoDetection(tmp_path / "val2017", ann_file)
    dataset[0], dataset[1]
    assert warnings(caplog) == [
        f"{ann_file}: image 000000000001.png: 40x30 on disk, 30x40 in the JSON: its boxes may not fit the picture "
        '(a resized or rotated file?); fix "width"/"height" and the boxes or restore the original file '
        "(tools/check_dataset.py lists all such images; --strict_data makes this an error)"]


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
# 7. Through main.py: one clean line


@pytest.fixture
def tiny_coco(tmp_path) -> Path:
    """train: 2 images (3 with --batch_size 4 would still be too few), val: 1 image; 32-pixel images."""
    make_synthetic_coco(tmp_path, num_train=2, num_val=1, seed=0, size=32)
    return tmp_path


def run_main(*flags: str) -> str:
    with pytest.raises(SystemExit) as info:
        main.main(main.parse_args([*ENGINE_TINY, *flags]))
    return str(info.value.code)


def test_batch_larger_than_the_training_set(tiny_coco):
    assert run_main("--coco_path", str(tiny_coco), "--batch_size", "4") == (
        "error: the training set has 2 images, fewer than one batch of 4 per process x 1 processes: lower "
        "--batch_size")


def test_unreadable_training_image_in_a_worker_with_strict_data(tiny_coco):
    path = tiny_coco / "train2017" / "000000000002.jpg"
    path.write_bytes(b"")
    message = run_main("--coco_path", str(tiny_coco), "--strict_data", "--num_workers", "1", "--epochs", "1")
    assert message == (f"error: cannot read image {path} ({pil_error(path)}): replace the file or remove image 2 "
                       f"from {tiny_coco / 'annotations/instances_train2017.json'} (without --strict_data unreadable "
                       "images are skipped)")


def test_missing_coco_path_through_main(tmp_path):
    assert run_main("--coco_path", str(tmp_path / "nowhere")) == (
        f"error: --coco_path {tmp_path / 'nowhere'} is not a directory ({LAYOUT_HELP})")


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

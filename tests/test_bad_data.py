"""Bad data files get a clear answer: an InputError naming the problem and the fix, or one warning per kind of
problem with a count (datasets/coco.py, runner.build_data_loader, main.py). Bad annotations: test_bad_annotations.py."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import main
from datasets import build_dataset
from datasets.coco import LAYOUT_HELP, CocoDetection
from datasets.coco_checks import COCO_FORMAT_HELP
from test_engine import TINY as ENGINE_TINY
from tools.check_dataset import main as check_dataset
from tools.make_synthetic_coco import make_synthetic_coco
from util.errors import InputError
from util.misc import collate_fn
from bad_data_helpers import box, image, make_args, pil_error, truncated_jpeg, warnings, write_split

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

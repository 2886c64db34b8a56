"""Bad data, round 2: crowd-only data, 16-bit and float images, EXIF rotations, negative category ids, extreme
aspect ratios, PIL's pixel limit and file names in another Unicode normalisation (datasets/, tools/check_dataset.py).
Each case gets a clear error, a counted warning, or correct numbers."""
from __future__ import annotations

import io
import json
import logging
import os
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import main
from datasets import build_dataset
from datasets import transforms as T
from datasets.coco import CocoDetection, coco_annotations_to_target
from datasets.coco_eval import CocoEvaluator
from datasets.counted_log import CountedWarnings
from datasets.images import apply_pixel_limit_from_env, decode_image
from models import build_model
from bad_data_helpers import box, image, make_args, warnings, write_split
from test_models_tiny import TINY as MODEL_TINY
from tools.check_dataset import main as check_dataset
from util.errors import InputError
from util.misc import collate_fn

ROOT = Path(__file__).resolve().parents[1]


def encoded(picture: PIL.Image.Image, file_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, file_format, **options)
    return buffer.getvalue()


def check_dataset_lines(root: Path, capsys, *flags: str) -> tuple[int, list[str]]:
    status = check_dataset(["--coco_path", str(root), "--splits", "val", *flags])
    return status, capsys.readouterr().out.splitlines()


# ----------------------------------------------------------------------------------------------
# Item 4: crowd-only images and a file without a single non-crowd box


def test_crowd_only_images_are_counted_at_build_and_by_check_dataset(tmp_path, caplog, capsys):
    ann_file = write_split(tmp_path, "val", [image(1), image(2), image(3)],
                           [box(1, [1, 1, 5, 5], iscrowd=1), box(1, [8, 8, 5, 5], iscrowd=1), box(2, [1, 1, 5, 5]),
                            box(3, [2, 2, 5, 5], iscrowd=1), box(3, [3, 3, 5, 5])])
    expected = ("images whose every annotation is a crowd region (iscrowd 1): 1 (e.g. 000000000001.png (crowd boxes: 2)); "
                "trained on as images without objects (2 crowd boxes on them in all: crowd regions are no training "
                "target and COCO evaluation ignores them)")
    caplog.set_level(logging.WARNING)
    build_dataset("val", make_args(tmp_path))
    assert warnings(caplog) == [f"{ann_file}: {expected}"]
    status, lines = check_dataset_lines(tmp_path, capsys)
    assert status == 1 and f"    {expected}" in lines


@pytest.mark.parametrize("crowd", [True, False], ids=["all_crowd", "no_annotations"])
def test_a_file_without_one_non_crowd_box_is_warned(tmp_path, caplog, crowd):
    annotations = [box(1, [1, 1, 5, 5], iscrowd=1), box(2, [1, 1, 5, 5], iscrowd=1)] if crowd else []
    ann_file = write_split(tmp_path, "val", [image(1), image(2)], annotations)
    caplog.set_level(logging.WARNING)
    build_dataset("val", make_args(tmp_path))
    held = "2 annotations, all crowd regions" if crowd else "no annotation"
    assert warnings(caplog)[-1] == (
        f"{ann_file}: images in a file without one non-crowd box to learn from or evaluate: 2 (e.g. 000000000001.png, "
        "000000000002.png); training sees no object and COCO evaluation has no ground truth (its stats are -1): the "
        f'file has {held}. Check that this is the right annotation file and its "iscrowd" values')


def test_evaluation_without_ground_truth_says_why_the_stats_are_minus_one(tmp_path, caplog):
    write_split(tmp_path, "val", [image(1), image(2)], [box(1, [1, 1, 5, 5], iscrowd=1), box(2, [1, 1, 5, 5],
                                                                                             iscrowd=1)])
    evaluator = CocoEvaluator(build_dataset("val", make_args(tmp_path)).coco)
    evaluator.update({i: {"scores": torch.tensor([0.9]), "labels": torch.tensor([1]),
                          "boxes": torch.tensor([[1.0, 1, 6, 6]])} for i in (1, 2)})
    evaluator.accumulate()
    caplog.set_level(logging.WARNING)
    caplog.clear()
    summary = evaluator.summarize()
    note = ("no ground-truth boxes to evaluate: the 2 evaluated images have 2 annotations (2 crowd regions, 0 of "
            "undeclared categories) and not one non-crowd box of a declared category, so every COCO stat is -1 "
            '(undefined, not a score). Check the val annotation file: its "annotations", their "iscrowd" and '
            '"category_id" values and its "categories" (tools/check_dataset.py reports crowd-only images)')
    assert warnings(caplog) == [f"CocoEvaluator: {note}"]
    assert summary.endswith(note) and evaluator.stats == [-1.0] * 12


# ----------------------------------------------------------------------------------------------
# Item 5: 16-bit and float images


def test_16_bit_and_float_pixels_are_scaled_to_8_bits():
    ramp16 = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    cases = {
        "I;16 png": (encoded(PIL.Image.fromarray(ramp16), "PNG"), [0, 100, 255], "mode I;16 (more than 8 bits): "
                                                                                 "divided by 257"),
        "I 16-bit values": (encoded(PIL.Image.fromarray(ramp16.astype(np.int32)), "TIFF"), [0, 100, 255],
                            "mode I (more than 8 bits): values in 0..65535 divided by 257"),
        "I 8-bit values": (encoded(PIL.Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32)), "TIFF"),
                           [0, 100, 255], None),
        "I any values": (encoded(PIL.Image.fromarray(np.array([[-100, 400, 900]], dtype=np.int32)), "TIFF"),
                         [0, 128, 255], "mode I (more than 8 bits): values -100..900 stretched to 0..255"),
        "F in [0, 1]": (encoded(PIL.Image.fromarray(np.array([[0, 0.5, 1]], dtype=np.float32)), "TIFF"),
                        [0, 128, 255], "mode F (float): values in [0, 1] multiplied by 255"),
        "F with NaN": (encoded(PIL.Image.fromarray(np.array([[np.nan, 2.0, 4.0]], dtype=np.float32)), "TIFF"),
                       [0, 2, 4], "mode F (float): values in [0, 255] taken as they are"),
    }
    for name, (data, values, scaling) in cases.items():
        decoded = decode_image(data)
        pixels = np.asarray(decoded.image)
        assert decoded.image.mode == "RGB" and pixels.shape == (1, 3, 3), name
        assert pixels[0, :, 0].tolist() == values and (pixels == pixels[..., :1]).all(), name
        assert decoded.scaling == scaling, name


def test_16_bit_images_are_warned_once_with_a_count_and_counted_by_check_dataset(tmp_path, caplog, capsys):
    gray = PIL.Image.fromarray(np.full((30, 40), 257 * 90, dtype=np.uint16))
    write_split(tmp_path, "val", [image(i, pixels=encoded(gray, "PNG")) for i in (1, 2, 3)],
                [box(i, [1, 1, 5, 5]) for i in (1, 2, 3)])
    dataset = CocoDetection(tmp_path / "val2017", tmp_path / "annotations/instances_val2017.json")
    caplog.set_level(logging.WARNING)
    images = [dataset[i][0] for i in range(3)]
    assert all(np.asarray(picture).tolist() == [[[90] * 3] * 40] * 30 for picture in images)  # not white
    assert warnings(caplog) == [f"image {tmp_path / 'val2017' / '000000000001.png'}: mode I;16 (more than 8 bits): "
                                "divided by 257 to get 8 bits per channel (1 such image so far in this process)"]
    assert dataset.image_notes.counts["bits"] == 3
    status, lines = check_dataset_lines(tmp_path, capsys)
    assert status == 1 and lines[-2] == (
        "    images with 16-bit or float pixels: 3 (e.g. 000000000001.png: mode I;16 (more than 8 bits): divided by "
        "257, 000000000002.png: mode I;16 (more than 8 bits): divided by 257, 000000000003.png: mode I;16 (more than "
        "8 bits): divided by 257); scaled to 8 bits per channel by the rule shown (datasets/images.py)")


# ----------------------------------------------------------------------------------------------
# Item 6: EXIF orientation: the stored pixels are used, as in COCO


def rotated_jpeg(orientation: int = 6) -> bytes:
    exif = PIL.Image.Exif()
    exif[274] = orientation
    return encoded(PIL.Image.new("RGB", (40, 30), (10, 200, 10)), "JPEG", exif=exif)


def test_exif_rotation_is_ignored_reported_and_an_error_with_strict_data(tmp_path, caplog, capsys):
    ann_file = write_split(tmp_path, "val", [image(1, pixels=rotated_jpeg())], [box(1, [1, 1, 5, 5])])
    path = tmp_path / "val2017" / "000000000001.png"
    caplog.set_level(logging.WARNING)
    picture, target = CocoDetection(tmp_path / "val2017", ann_file)[0]
    assert picture.size == (40, 30) and target["boxes"].tolist() == [[1, 1, 6, 6]]  # not rotated to 30x40
    assert warnings(caplog) == [
        f"image {path}: EXIF orientation 6 (rotated 90 degrees clockwise): ignored, the stored pixels are used as "
        "COCO does (its boxes must be drawn on them; --strict_data makes this an error) (1 such image so far in this "
        "process)"]
    with pytest.raises(InputError) as info:
        CocoDetection(tmp_path / "val2017", ann_file, strict_data=True)[0]
    assert str(info.value) == (
        f'image {path}: EXIF orientation 6 (rotated 90 degrees clockwise), which training ignores (as COCO: boxes and '
        '"width"/"height" describe the stored pixels): if the boxes were drawn on the rotated view, save the pixels '
        'rotated (PIL.ImageOps.exif_transpose) and update the boxes and "width"/"height", else remove the orientation '
        "tag (without --strict_data the rotation is ignored with a warning)")
    status, lines = check_dataset_lines(tmp_path, capsys)
    assert status == 1 and lines[-2] == (
        "    images with an EXIF rotation (orientation tag 274 not 1): 1 (e.g. 000000000001.png: EXIF orientation 6 "
        "(rotated 90 degrees clockwise)); the stored pixels are used, the rotation ignored, as COCO does: the boxes "
        "must be drawn on the stored pixels (--strict_data: an error)")


def test_size_differing_from_the_json_is_an_error_with_strict_data(tmp_path):
    ann_file = write_split(tmp_path, "val", [image(1, width=30, height=40)], [box(1, [1, 1, 5, 5])])
    with pytest.raises(InputError) as info:
        CocoDetection(tmp_path / "val2017", ann_file, strict_data=True)[0]
    assert str(info.value) == (
        f'{ann_file}: image 000000000001.png: 40x30 on disk, 30x40 in the JSON: its boxes may not fit the picture; fix '
        '"width"/"height" and the boxes or restore the original file (without --strict_data this is a warning)')


# ----------------------------------------------------------------------------------------------
# Item 11: negative category ids


def test_negative_category_ids_are_rejected_at_load_and_reported(tmp_path, capsys):
    ann_file = write_split(tmp_path, "val", [image(1)], [box(1, [1, 1, 5, 5]), box(1, [2, 2, 5, 5], category_id=-1)],
                           categories=[{"id": 1, "name": "a"}, {"id": -1, "name": "other"}])
    expected = (f'{ann_file} has 1 annotations with a negative "category_id" and 1 categories with a negative "id" '
                "(e.g. annotation 2: category_id -1, category -1 (other)); category ids must be >= 0: the classifier "
                "has one output per id 0 .. num_classes - 1 and a negative id would wrap around to the last one. "
                'Renumber these categories to unused ids >= 0 in "categories" and in the annotations\' "category_id".')
    for num_classes in (None, 91):
        with pytest.raises(InputError) as info:
            build_dataset("val", make_args(tmp_path, num_classes=num_classes))
        assert str(info.value) == expected
    status, lines = check_dataset_lines(tmp_path, capsys)
    assert status == 1 and f"    {expected}" in lines


# ----------------------------------------------------------------------------------------------
# Item 13: extreme aspect ratios never give a 0-px side


def sliver(width: int, height: int) -> tuple[PIL.Image.Image, dict]:
    bbox = [10, 0, 100, 1] if width > height else [0, 10, 1, 100]
    target = coco_annotations_to_target([box(1, bbox)], 1, width, height)
    return PIL.Image.new("RGB", (width, height), (200, 200, 200)), target


@pytest.mark.parametrize("width,height", [(2700, 1), (1, 3000)])
def test_extreme_aspect_ratios_through_the_default_transforms(width, height, caplog, monkeypatch):
    monkeypatch.setattr(T, "_resize_warnings", CountedWarnings(T.logger))  # logs its 1st, 10th, ... case
    caplog.set_level(logging.WARNING)
    for image_set in ("val", "train"):
        transform = T.make_coco_transforms(image_set)
        for seed in range(6):  # both train branches: multi-scale resize and resize + crop + resize
            random.seed(seed)
            picture, target = transform(*sliver(width, height))
            assert min(picture.shape[1:]) >= T.MIN_SIDE and max(picture.shape[1:]) <= 1333
            assert target["size"].tolist() == list(picture.shape[1:])
            assert torch.isfinite(target["boxes"]).all() and ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
            assert len(target["boxes"]) == 1 or image_set == "train"  # a random crop may leave the box out
    assert T.get_resize_hw((width, height), 800, 1333) == ((64, 1333) if width > height else (1333, 64))
    resized = (1333, 64) if width > height else (64, 1333)
    expected = (f"a {width}x{height} image is resized to {resized[0]}x{resized[1]}, not keeping its aspect ratio: "
                "keeping it would leave the short side 0 px, under the 64 px the model needs (its deepest feature map "
                "has a stride of 64); its boxes are scaled with it (")
    assert any(w.startswith(expected) for w in warnings(caplog)), warnings(caplog)


def test_extreme_aspect_ratios_through_the_dataset_and_the_model(tmp_path):
    images = [image(1, width=2700, height=1, pixels=encoded(sliver(2700, 1)[0], "PNG")),
              image(2, width=1, height=3000, pixels=encoded(sliver(1, 3000)[0], "PNG"))]
    write_split(tmp_path, "train", [dict(i) for i in images], [box(1, [10, 0, 100, 1]), box(2, [0, 10, 1, 100])])
    write_split(tmp_path, "val", images, [box(1, [10, 0, 100, 1]), box(2, [0, 10, 1, 100])])
    torch.manual_seed(0)
    model, criterion, _ = build_model(main.parse_args(MODEL_TINY))
    for image_set in ("train", "val"):
        dataset = build_dataset(image_set, make_args(tmp_path, num_classes=5))
        random.seed(0)
        samples, targets = collate_fn([dataset[0], dataset[1]])
        assert [min(t["size"].tolist()) >= 1 for t in targets] == [True, True]
        losses = criterion(model(samples), targets)
        assert torch.isfinite(sum(losses[k] * w for k, w in criterion.weight_dict.items()))


# ----------------------------------------------------------------------------------------------
# PIL's pixel limit: named, with the way to raise it


def test_an_image_over_pils_pixel_limit_names_the_limit_and_the_environment_variable(tmp_path, monkeypatch, caplog):
    ann_file = write_split(tmp_path, "val", [image(1), image(2, width=4, height=4, pixels=encoded(
        PIL.Image.new("RGB", (4, 4)), "PNG"))], [box(1, [1, 1, 5, 5])])
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 500)
    path = tmp_path / "val2017" / "000000000001.png"
    with pytest.raises(PIL.Image.DecompressionBombError) as info:
        decode_image(path)
    message = ("Image size (1200 pixels) exceeds limit of 1000 pixels, could be decompression bomb DOS attack. PIL "
               "refuses images over twice PIL.Image.MAX_IMAGE_PIXELS (500 here); if the file is trusted, raise the "
               "limit with the environment variable PIL_MAX_IMAGE_PIXELS=1200")
    assert str(info.value) == message
    caplog.set_level(logging.WARNING)
    assert CocoDetection(tmp_path / "val2017", ann_file)[0][1]["image_id"].tolist() == [2]
    assert warnings(caplog)[-1].startswith(f"cannot read image {path} ({message}): using the next image instead")

    monkeypatch.setenv("PIL_MAX_IMAGE_PIXELS", "1200")
    apply_pixel_limit_from_env()
    assert PIL.Image.MAX_IMAGE_PIXELS == 1200 and decode_image(path).image.size == (40, 30)
    monkeypatch.setenv("PIL_MAX_IMAGE_PIXELS", "lots")
    apply_pixel_limit_from_env()
    assert PIL.Image.MAX_IMAGE_PIXELS == 1200
    assert warnings(caplog)[-1] == "PIL_MAX_IMAGE_PIXELS='lots' is not a positive integer: ignored, PIL's limit stays " \
                                   "1200 pixels"


def test_the_pixel_limit_variable_is_read_when_datasets_coco_is_imported():
    env = {**os.environ, "PIL_MAX_IMAGE_PIXELS": "123456"}
    out = subprocess.run([sys.executable, "-c", "import datasets.coco, PIL.Image; print(PIL.Image.MAX_IMAGE_PIXELS)"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "123456"


# ----------------------------------------------------------------------------------------------
# File names under another Unicode normalisation


@pytest.mark.parametrize("json_form,disk_form", [("NFC", "NFD"), ("NFD", "NFC")])
def test_file_name_in_another_unicode_normalisation_is_found(tmp_path, caplog, json_form, disk_form):
    name = "caf\u00e9.png"
    ann_file = write_split(tmp_path, "val", [image(1, file_name=unicodedata.normalize(json_form, name), pixels=None)],
                           [box(1, [1, 1, 5, 5])])
    folder = tmp_path / "val2017"
    PIL.Image.new("RGB", (40, 30), (1, 2, 3)).save(folder / unicodedata.normalize(disk_form, name))
    if (folder / unicodedata.normalize(json_form, name)).exists():
        pytest.skip("this file system does not tell the two normalisations apart")
    caplog.set_level(logging.WARNING)
    dataset = CocoDetection(folder, ann_file)
    assert dataset[0][0].getpixel((0, 0)) == (1, 2, 3)
    assert warnings(caplog) == [
        f"{ann_file}: file names written under another Unicode normalisation on disk: 1 (e.g. "
        f"{unicodedata.normalize(json_form, name)!r} ({json_form} in the JSON, {disk_form} on disk)); the files on "
        'disk are used; rename them (or the JSON\'s "file_name") to the same form for other tools']
    assert json.loads(ann_file.read_text())["images"][0]["file_name"] == unicodedata.normalize(json_form, name)

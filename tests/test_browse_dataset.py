"""tools/browse_dataset.py: transformed boxes drawn on the transformed image, the grid, one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from datasets import transforms as T
from datasets.coco import CocoDetection
from tools import browse_dataset
from tools.make_synthetic_coco import make_synthetic_coco
from util.draw import category_color

GRAY = (128, 128, 128)


@pytest.fixture
def one_box_dataset(tmp_path) -> Path:
    """A 64x48 gray PNG with one box, x 8..24 and y 10..30 (category 1, "square")."""
    (tmp_path / "train2017").mkdir()
    (tmp_path / "annotations").mkdir()
    PIL.Image.new("RGB", (64, 48), GRAY).save(tmp_path / "train2017" / "a.png")
    (tmp_path / "annotations" / "instances_train2017.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [8, 10, 16, 20], "area": 320,
                         "iscrowd": 0}],
        "categories": [{"id": 1, "name": "square"}]}))
    return tmp_path


def flipped_and_doubled(root: Path) -> CocoDetection:
    """The dataset through a flip that always happens, a resize to 96 px (x2), and the normalisation."""
    transforms = T.Compose([T.RandomHorizontalFlip(p=1.0), T.RandomResize([96]), T.ToTensor(),
                            T.Normalize(T.IMAGENET_MEAN, T.IMAGENET_STD)])
    return CocoDetection(root / "train2017", root / "annotations" / "instances_train2017.json", transforms=transforms)


def column_colours(picture: PIL.Image.Image, x: int, rows: range) -> set[tuple[int, ...]]:
    pixels = np.asarray(picture)
    return {tuple(int(c) for c in pixels[y, x]) for y in rows}


@pytest.mark.parametrize("max_side, scale", [(None, 1.0), (64, 0.5)])
def test_the_box_is_drawn_where_the_flip_and_resize_put_it(one_box_dataset, max_side, scale):
    """Catches boxes drawn at their place before the flip, in the original image's pixels (not the resized
    one's), with height and width swapped, not scaled with a picture made smaller for the grid, and a picture
    left normalised."""
    image, target = flipped_and_doubled(one_box_dataset)[0]
    assert image.shape[-2:] == (96, 128)
    picture = browse_dataset.draw_sample(image, target, {1: "square"}, max_side=max_side)
    assert picture.size == (round(128 * scale), round(96 * scale))
    # Flipped in the 64x48 image: x 40..56, y 10..30; doubled: x 80..112, y 20..60.
    left, right = round(80 * scale), round(112 * scale)
    rows = range(round(35 * scale), round(45 * scale))  # the middle of the vertical edges, clear of the label
    green = category_color(1)
    assert column_colours(picture, left, rows) == {green}
    assert column_colours(picture, right, rows) == {green}
    assert column_colours(picture, left + 3, rows) != {green}  # an outline, not a filled box
    for x in (round(16 * scale), round(48 * scale)):  # where the box would be without the flip
        assert green not in column_colours(picture, x, rows)
    assert green not in column_colours(picture, left, range(round(62 * scale), round(90 * scale)))  # below it
    background = np.asarray(picture)[round(90 * scale), 2]
    assert np.abs(background.astype(int) - GRAY).max() <= 2  # denormalised back to the file's gray


def test_the_grid_is_reproducible_and_follows_the_epoch(tmp_path):
    """Catches augmentations that ignore --seed / --epoch (not training's), and a grid of the wrong layout."""
    make_synthetic_coco(tmp_path / "coco", num_train=8, num_val=2, seed=0, size=64)
    flags = ["--coco_path", str(tmp_path / "coco"), "--n", "4", "--scales", "64", "--max_size", "64"]
    first = browse_dataset.main([*flags, "--out", str(tmp_path / "a" / "grid.png")])
    again = browse_dataset.main([*flags, "--out", str(tmp_path / "b.png")])
    other_epoch = browse_dataset.main([*flags, "--out", str(tmp_path / "c.png"), "--epoch", "1"])
    assert first.read_bytes() == again.read_bytes()
    assert first.read_bytes() != other_epoch.read_bytes()
    with PIL.Image.open(first) as sheet:
        # 2 x 2 cells of a 64x64 image with its title strip, gaps between cells.
        cell_w, cell_h = 64 + browse_dataset.GAP, 64 + browse_dataset.TITLE_HEIGHT + browse_dataset.GAP
        assert sheet.format == "PNG" and sheet.size == (2 * cell_w - browse_dataset.GAP,
                                                        2 * cell_h - browse_dataset.GAP)


@pytest.mark.parametrize("flags, message", [
    (["--coco_path", "{tmp}/missing"], "error: --coco_path {tmp}/missing is not a directory"),
    (["--coco_path", "{tmp}"], "error: annotation file not found: {tmp}/annotations/instances_train2017.json"),
    (["--coco_path", "{tmp}", "--n", "0"], "error: --n must be at least 1, got 0"),
    (["--coco_path", "{tmp}", "--scales", "0"], "error: --scales must be positive sizes in pixels"),
])
def test_bad_input_is_a_one_line_error(tmp_path, flags, message):
    with pytest.raises(SystemExit) as info:
        browse_dataset.main([f.format(tmp=tmp_path) for f in flags])
    text = str(info.value)
    assert text.startswith(message.format(tmp=tmp_path)) and "\n" not in text


def test_an_output_folder_is_refused(one_box_dataset, tmp_path):
    with pytest.raises(SystemExit, match="error: --out .* is a folder: give a file name"):
        browse_dataset.main(["--coco_path", str(one_box_dataset), "--out", str(tmp_path)])

"""Issue 27 (reliability, round 3), data: annotation ids from 0, areas of 0, image files listed twice,
categories declared twice, an empty split. Each test names the bug it catches."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from datasets.coco import CocoDetection
from datasets.coco_checks import fill_missing_areas
from datasets.coco_eval import CocoEvaluator
from tools.check_dataset import main as check_dataset
from util.errors import InputError
from bad_data_helpers import box, image, warnings, write_split


def perfect_stats(dataset: CocoDetection) -> list[float]:
    """The 12 COCO stats of detections equal to the ground truth (score 0.9, 0.8, ... in annotation order)."""
    evaluator = CocoEvaluator(dataset.coco)
    for image_id in dataset.ids:
        anns = dataset.coco.imgToAnns[image_id]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=torch.float32)
        evaluator.update({image_id: {"scores": torch.linspace(0.9, 0.5, len(anns)),
                                     "labels": torch.tensor([a["category_id"] for a in anns]), "boxes": boxes}})
    evaluator.accumulate()
    return list(evaluator.stats)


def test_annotation_ids_from_0_are_renumbered_so_perfect_detections_score_ap_1(tmp_path, caplog):
    """BAD 4: catches annotation id 0 passed to pycocotools, which reads a match to id 0 as "no match": the
    perfect detection of that object counts as a false positive and AP drops below 1 silently."""
    annotations = [box(1, [2, 3, 10, 8], id=0), box(1, [20, 10, 12, 9], id=1), box(2, [5, 5, 20, 20], id=2)]
    ann_file = write_split(tmp_path, "val", [image(1), image(2)], annotations)
    caplog.set_level(logging.WARNING)
    dataset = CocoDetection(tmp_path / "val2017", ann_file)
    assert warnings(caplog) == [
        f'{ann_file}: annotations whose "id" is 0 or negative: 1 (e.g. annotation 0); all 3 annotations renumbered '
        '1..N for COCO evaluation, which reads id 0 as "no match" (the file is unchanged; ids from 1 avoid this)']
    assert [a["id"] for a in dataset.coco.dataset["annotations"]] == [1, 2, 3]
    assert json.loads(ann_file.read_text())["annotations"][0]["id"] == 0  # the file is left alone
    assert perfect_stats(dataset)[:2] == [pytest.approx(1.0), pytest.approx(1.0)]


def test_area_0_on_a_box_that_is_not_empty_is_computed_from_the_box(tmp_path, caplog):
    """BAD 5: catches "area": 0 kept on non-empty boxes, which makes COCO evaluation count every object as small
    (APs 1, APm -1 for medium objects). A 36x29 box (1044 px) is medium (32^2 to 96^2)."""
    annotations = [box(1, [1, 0, 36, 29], area=0), box(2, [0, 1, 36, 29], area=0)]
    ann_file = write_split(tmp_path, "val", [image(1), image(2)], annotations)
    caplog.set_level(logging.WARNING)
    dataset = CocoDetection(tmp_path / "val2017", ann_file)
    assert f'{ann_file}: annotations with "area" 0 on a box that is not empty: 2 (e.g. annotation 1: bbox ' \
           "[1, 0, 36, 29], annotation 2: bbox [0, 1, 36, 29]); using the box's width x height" in warnings(caplog)[0]
    assert [a["area"] for a in dataset.coco.dataset["annotations"]] == [1044, 1044]
    empty = {"annotations": [box(1, [0, 0, 0, 5], area=0, id=1)]}
    assert fill_missing_areas(empty) == [] and empty["annotations"][0]["area"] == 0  # an empty box's area is 0
    stats = perfect_stats(dataset)
    assert stats[3] == -1 and stats[4] == pytest.approx(1.0)  # APs: no small object; APm: both found


def test_repeated_image_files_and_categories_are_reported_and_categories_kept_once(tmp_path, caplog):
    """Data: catches an image file listed under two ids passing silently (its objects count twice), and a
    category declared twice, which COCO evaluation would evaluate, and weigh in the mean AP, twice."""
    images = [image(1), image(2, file_name=image(1)["file_name"], pixels=None), image(3)]
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 1, "name": "again"}]
    ann_file = write_split(tmp_path, "train", images, [box(1, [2, 2, 9, 9]), box(2, [2, 2, 9, 9])], categories)
    caplog.set_level(logging.WARNING)
    dataset = CocoDetection(tmp_path / "train2017", ann_file)
    assert warnings(caplog) == [
        f'{ann_file}: image files listed more than once under different ids (the same "file_name"): 1 (e.g. '
        f'{image(1)["file_name"]} (ids 1, 2)); each listing is trained on and evaluated as an image of its own: its '
        'objects count twice; remove the repeated entries from "images" (and move their annotations)',
        f'{ann_file}: categories declared more than once with the same "id": 1 (e.g. id 1: \'again\' after \'a\'); '
        'the first declaration is used (its name); remove the repeats from "categories"',
    ]
    assert dataset.coco.getCatIds() == [1, 2] and dataset.coco.cats[1]["name"] == "a"


def test_check_dataset_reports_the_new_kinds_of_problems(tmp_path, capsys):
    images = [image(1), image(2, file_name=image(1)["file_name"], pixels=None)]
    categories = [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]
    write_split(tmp_path, "train", images, [box(1, [1, 0, 36, 29], area=0, id=0)], categories)
    assert check_dataset(["--coco_path", str(tmp_path), "--splits", "train"]) == 1
    out = capsys.readouterr().out
    for problem in ('image files listed more than once under different ids', 'categories declared more than once',
                    'annotations with "area" 0 on a box that is not empty: 1', 'annotations whose "id" is 0 or '
                    'negative: 1 (e.g. annotation 0)'):
        assert f"    {problem}" in out
    assert out.endswith("4 kinds of problems found\n")


def test_an_empty_split_is_refused_by_check_dataset_as_by_training(tmp_path, capsys):
    """Data: catches check_dataset calling a split clean that main.py refuses (an empty val set)."""
    write_split(tmp_path, "train", [image(1)], [box(1, [2, 2, 9, 9])])
    ann_file = write_split(tmp_path, "val", [], [])
    with pytest.raises(InputError) as info:
        CocoDetection(tmp_path / "val2017", ann_file)
    expected = (f'no images to use: {ann_file} lists none (its "images" list is empty); every split, val too, needs '
                "at least one image")
    assert str(info.value) == expected
    assert check_dataset(["--coco_path", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {expected}\n"

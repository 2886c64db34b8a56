"""Evaluation a researcher can use (issue 28): eval.json and eval.pth, the COCO results file, an image-info split,
the per-class table, the two backends, 2-process evaluation, and tools/analyze_detections.py.

The tiny model's own AP is 0, which would hide most bugs (every number equal to every other); the tests that
check numbers plant detections built from the ground truth (tests/eval_helpers.py) in its place."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import engine
import runner
from datasets import build_dataset, get_coco_api_from_dataset
from datasets.coco_analysis import coco_from, confusion_matrix, image_errors, results_as_coco
from datasets.coco_eval import CocoEvaluator
from datasets.coco_results import per_class_ap
from eval_helpers import planted_update
from main import parse_args
from models import build_model
from tools import analyze_detections, bench_eval
from tools.make_synthetic_coco import make_synthetic_coco
from util.checkpoint import save_checkpoint
from util.console import COCO_STAT_NAMES, class_ap_table
from util.process import DistContext
from tiny_flags import ENGINE_TINY as TINY

NUM_VAL = 5  # odd: the second of 2 processes gets a padded (repeated) image


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def silent(value: float) -> str:
    return "-" if value < 0 else f"{100 * value:.1f}"


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    make_synthetic_coco(root, num_train=2, num_val=NUM_VAL, seed=3, size=64)
    return root


def tiny_args(coco_root: Path, *extra: str):
    return parse_args([*TINY, "--coco_path", str(coco_root), *extra])


@pytest.fixture(scope="module")
def checkpoint(coco_root, tmp_path_factory) -> Path:
    args = tiny_args(coco_root)
    torch.manual_seed(0)
    model, _, _ = build_model(args)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    save_checkpoint({"model": model.state_dict(), "args": args, "epoch": 0}, path)
    return path


@pytest.fixture(scope="module")
def eval_run(coco_root, checkpoint, tmp_path_factory) -> dict:
    """``--eval --output_dir --save_detections --per_class`` with the planted detections: the returned stats,
    the output folder and the logged lines."""
    out = tmp_path_factory.mktemp("eval")
    handler, root = Lines(), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(CocoEvaluator, "update", planted_update)
            stats = runner.run(tiny_args(coco_root, "--eval", "--resume", str(checkpoint), "--output_dir", str(out),
                                         "--save_detections", "--per_class"))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return {"stats": stats, "out": out, "lines": handler.lines}


def fresh_cocoeval(coco_root: Path, results: Path, cat_ids=None) -> COCOeval:
    """pycocotools on its own: the annotation file and the results file through ``loadRes``."""
    gt = COCO(str(coco_root / "annotations" / "instances_val2017.json"))
    evaluation = COCOeval(gt, gt.loadRes(str(results)), iouType="bbox")
    if cat_ids is not None:
        evaluation.params.catIds = cat_ids
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return evaluation


# ----------------------------------------------------------------------------------------------
# Saved evaluation, results file, per-class AP


def test_eval_writes_eval_pth_and_a_json_whose_stats_equal_the_console(eval_run, checkpoint, coco_root):
    """Catches a JSON of other numbers than the console's (a unit, an order or a run mixed up), an eval.pth
    that is not pycocotools' eval dict, and a JSON the standard library cannot read."""
    out = eval_run["out"]
    with open(out / "eval.json") as f:
        record = json.load(f)
    assert list(record["stats"]) == list(COCO_STAT_NAMES)
    assert list(record["stats"].values()) == eval_run["stats"]["test_coco_eval_bbox"]
    assert 0 < record["stats"]["AP"] < record["stats"]["AP50"] < 1  # planted: neither 0 nor perfect
    lines = eval_run["lines"]
    table = next(i for i, line in enumerate(lines) if line.startswith(f"COCO box AP and AR of {NUM_VAL} images"))
    header, values = lines[table].splitlines()[1:]
    assert header.split() == list(COCO_STAT_NAMES)
    assert values.split() == [silent(v) for v in record["stats"].values()]
    assert not any(line.startswith("evaluation of") and "AP 0." in line for line in lines)  # no fraction line
    assert record["checkpoint"] == str(checkpoint) and record["weights"] == "raw"
    assert record["model"]["model"] == "deformable" and record["model"]["num_classes"] == 4
    assert record["model"]["hidden_dim"] == 64  # from the checkpoint's stored args
    assert record["dataset"]["num_images"] == NUM_VAL
    assert record["dataset"]["annotations"] == str(coco_root / "annotations" / "instances_val2017.json")
    evaluated = torch.load(out / "eval.pth", weights_only=False)
    assert {"params", "counts", "precision", "recall", "scores"} <= set(evaluated)
    assert evaluated["precision"].shape == (10, 101, 3, 4, 3)
    precision = evaluated["precision"][:, :, :, 0, -1]  # how the references' scripts read AP from it
    assert precision[precision > -1].mean() == pytest.approx(record["stats"]["AP"], abs=1e-12)


def test_the_results_file_re_evaluates_to_the_same_numbers(eval_run, coco_root):
    """Catches boxes left in xyxy, scores or ids mixed up, and labels that are no category of the dataset
    (the planted category 0) written out."""
    path = eval_run["out"] / "detections_val.json"
    results = json.loads(path.read_text())
    assert results and {r["category_id"] for r in results} <= {1, 2, 3}
    assert set(results[0]) == {"image_id", "category_id", "bbox", "score"}
    record = json.loads((eval_run["out"] / "eval.json").read_text())
    again = fresh_cocoeval(coco_root, path)
    np.testing.assert_allclose(again.stats, list(record["stats"].values()), rtol=0, atol=1e-12)


def test_the_per_class_table_matches_pycocotools_per_class_precision(eval_run, coco_root):
    """Each class's AP and AP50 equal pycocotools' evaluation of that class alone; catches a wrong precision
    axis (area, max detections, IoU .5) or classes in another order."""
    record = json.loads((eval_run["out"] / "eval.json").read_text())
    rows = record["per_class"]
    assert [r["category_id"] for r in rows] == [1, 2, 3]
    for row in rows:
        alone = fresh_cocoeval(coco_root, eval_run["out"] / "detections_val.json", cat_ids=[row["category_id"]])
        assert row["AP"] == pytest.approx(alone.stats[0], abs=1e-12)
        assert row["AP50"] == pytest.approx(alone.stats[1], abs=1e-12)
    assert np.mean([r["AP"] for r in rows]) == pytest.approx(record["stats"]["AP"], abs=1e-12)
    table = next(line for line in eval_run["lines"] if line.startswith("AP per class of 3 classes"))
    shown = {line.split()[0]: line.split()[1:3] for line in table.splitlines()[2:]}  # --per_class: all of them
    assert shown == {r["name"]: [silent(r["AP"]), silent(r["AP50"])] for r in rows}


def test_the_class_table_shows_the_best_and_worst_few_and_how_many_classes():
    rows = [{"name": f"c{i}", "AP": i / 20, "AP50": i / 10, "num_boxes": i} for i in range(12)]
    rows.append({"name": "empty", "AP": -1.0, "AP50": -1.0, "num_boxes": 0})
    lines = class_ap_table(rows, show_all=False, few=2).splitlines()
    assert lines[0] == "AP per class of 13 classes, in percent: the 2 best and the 2 worst (--per_class lists all):"
    assert [line.split()[0] for line in lines[2:]] == ["c11", "c10", "...", "c1", "c0"]
    assert lines[2].split() == ["c11", "55.0", "110.0", "11"] and "9 classes more" in lines[4]
    everything = class_ap_table(rows, show_all=True).splitlines()
    assert len(everything) == 2 + 13 and everything[-1].split() == ["empty", "-", "-", "0"]


def test_an_image_info_split_gives_a_results_file_and_no_metrics(coco_root, checkpoint, tmp_path, caplog):
    """COCO test-dev: a file with images and no "annotations"; catches an evaluation that fails on it or makes
    up metrics."""
    root = tmp_path / "coco"
    shutil.copytree(coco_root / "val2017", root / "test2017")
    info = json.loads((coco_root / "annotations" / "instances_val2017.json").read_text())
    del info["annotations"]
    (root / "annotations").mkdir()
    (root / "annotations" / "image_info_test-dev2017.json").write_text(json.dumps(info))
    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    stats = runner.run(tiny_args(root, "--eval", "--resume", str(checkpoint), "--eval_split", "test-dev",
                                 "--save_detections", "--output_dir", str(out)))
    assert stats == {}
    assert sorted(p.name for p in out.iterdir()) == ["detections_test-dev.json"]
    results = json.loads((out / "detections_test-dev.json").read_text())
    assert {r["image_id"] for r in results} == {image["id"] for image in info["images"]}
    assert COCO(str(root / "annotations" / "image_info_test-dev2017.json")).loadRes(results)  # the server's reader
    said = [r.getMessage() for r in caplog.records if "no ground truth" in r.getMessage()]
    assert len(said) == 1 and "no metrics" in said[0] and "AP" not in caplog.text.split("no ground truth")[1]


@pytest.mark.parametrize("flags, problem", [
    (["--save_detections"], "--save_detections writes <output_dir>/detections_<split>.json of --eval"),
    (["--eval", "--resume", "x.pth", "--eval_split", "test-dev"], "--eval_split test-dev has no ground truth"),
])
def test_evaluation_flags_that_cannot_work_are_refused(coco_root, flags, problem):
    with pytest.raises(SystemExit, match=problem):
        tiny_args(coco_root, *flags)


# ----------------------------------------------------------------------------------------------
# Backends, processes


def test_the_two_backends_agree_on_the_test_detections():
    """faster-coco-eval against pycocotools on bench_eval's synthetic set (crowd regions, every area range, 80
    non-contiguous category ids) and on the tool's own check."""
    pytest.importorskip("faster_coco_eval")
    ground_truth, predictions = bench_eval.synthetic_set(40, detections_per_image=100, seed=1)
    assert any(a["iscrowd"] for a in ground_truth["annotations"])
    areas = [a["area"] for a in ground_truth["annotations"]]
    assert min(areas) < 32 ** 2 < 96 ** 2 < max(areas)
    _, slow, slow_classes = bench_eval.evaluate_with("pycocotools", ground_truth, predictions)
    _, fast, fast_classes = bench_eval.evaluate_with("faster_coco_eval", ground_truth, predictions)
    assert 0 < slow[0] < 1
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-4)
    np.testing.assert_allclose(fast_classes, slow_classes, rtol=0, atol=1e-4)
    assert bench_eval.main(["--images", "10", "--detections", "20"]) == 0


def _evaluate(rank: int, world_size: int, coco_root: str, init_file: str, out: str) -> None:
    """engine.evaluate of the planted detections over the val set sharded as runner.py shards it."""
    torch.set_num_threads(1)
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        CocoEvaluator.update = planted_update
        args = tiny_args(Path(coco_root), "--batch_size", "1")
        torch.manual_seed(0)
        model, criterion, postprocessors = build_model(args)
        dataset = build_dataset("val", args)
        loader = runner.build_data_loader(dataset, args, DistContext(rank, world_size), train=False,
                                          device=torch.device("cpu"))
        stats, evaluator = engine.evaluate(model, criterion, postprocessors, loader, get_coco_api_from_dataset(dataset),
                                           torch.device("cpu"))
        if rank == 0:
            torch.save({"stats": stats, "images": evaluator.img_ids, "results": evaluator.results,
                        "per_class": per_class_ap(evaluator.coco_eval["bbox"], evaluator.coco_gt)}, out)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_two_process_evaluation_gives_the_one_process_numbers(coco_root, tmp_path):
    """Catches statistics computed before the processes' detections are gathered, and the padded image of the
    odd split (the sampler repeats one) counted twice."""
    mp.spawn(_evaluate, args=(2, str(coco_root), str(tmp_path / "init"), str(tmp_path / "two.pt")), nprocs=2)
    _evaluate(0, 1, str(coco_root), "", str(tmp_path / "one.pt"))
    two, one = torch.load(tmp_path / "two.pt", weights_only=False), torch.load(tmp_path / "one.pt", weights_only=False)
    assert two["images"] == one["images"] and len(one["images"]) == NUM_VAL
    assert two["results"] == one["results"]
    assert two["stats"]["coco_eval_bbox"] == one["stats"]["coco_eval_bbox"]
    assert 0 < one["stats"]["coco_eval_bbox"][0] < 1
    assert two["per_class"] == one["per_class"]


# ----------------------------------------------------------------------------------------------
# Error analysis


def test_the_analysis_tool_writes_its_pictures_from_a_tiny_run(eval_run, coco_root, tmp_path):
    """On the results file of the --eval run: every picture is written, and the strictest curves are the
    evaluation's AP75 and AP50 (catches curves taken at other IoUs, areas or detection limits)."""
    out = tmp_path / "analysis"
    summary = analyze_detections.analyze(eval_run["out"] / "detections_val.json",
                                         coco_root / "annotations" / "instances_val2017.json", out,
                                         images=coco_root / "val2017", score_threshold=0.3, worst=4)
    for name in ("breakdown.png", "confusion.png", "worst_images.png"):
        with PIL.Image.open(out / name) as image:
            assert min(image.size) > 200, name
    stats = json.loads((eval_run["out"] / "eval.json").read_text())["stats"]
    overall = summary["breakdown"]["overall"]
    assert overall["C75"] == pytest.approx(stats["AP75"], abs=1e-9)
    assert overall["C50"] == pytest.approx(stats["AP50"], abs=1e-9)
    curve = [overall[e] for e in ("C75", "C50", "Loc", "Sim", "Oth", "BG", "FN")]
    assert curve == sorted(curve) and curve[-1] == 1.0
    assert overall["Loc"] > overall["C50"]  # the planted boxes at IoU 0.47 count from IoU 0.1 on
    assert json.loads((out / "analysis.json").read_text())["confusion"]["classes"] == ["square", "circle", "triangle"]


def test_confusion_matrix_and_image_errors_by_hand():
    """One image: a square found as a circle, a triangle missed, a circle on the background, a detection on a
    crowd region (ignored) and one under the score threshold (not counted)."""
    gt = coco_from({
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 100}],
        "categories": [{"id": c, "name": n, "supercategory": "shape"} for c, n in ((1, "square"), (2, "circle"),
                                                                                   (3, "triangle"))],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [60, 60, 30, 30], "area": 900, "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 2, "bbox": [0, 60, 40, 40], "area": 1600, "iscrowd": 1}]})
    dt = results_as_coco(gt, [
        {"image_id": 1, "category_id": 2, "bbox": [11, 10, 20, 20], "score": 0.9},   # square found as a circle
        {"image_id": 1, "category_id": 2, "bbox": [40, 5, 10, 10], "score": 0.8},    # background
        {"image_id": 1, "category_id": 1, "bbox": [5, 65, 10, 10], "score": 0.7},    # inside the crowd region
        {"image_id": 1, "category_id": 3, "bbox": [60, 60, 30, 30], "score": 0.1}])  # under the threshold
    errors = image_errors(gt, dt, 1, score_threshold=0.5)
    assert [(g["id"], d["score"]) for g, d in errors.matches] == [(1, 0.9)]
    assert [d["score"] for d in errors.background] == [0.8]
    assert [g["id"] for g in errors.missed] == [2]
    assert errors.num_errors == 4  # background, missed, and the wrong class: a false positive and a miss
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, 1] = 1  # square box, circle detected
    expected[3, 1] = 1  # background, circle detected
    expected[2, 3] = 1  # triangle box, missed
    np.testing.assert_array_equal(confusion_matrix([errors], [1, 2, 3]), expected)

"""--tensorboard (util/tensorboard.py): the event files of a tiny run, read back with tensorboard's own reader; the
tags of a log record; the flag checks; rank 0 alone writes; --overwrite moves the old tb/ aside. (That a run
without the flag never imports tensorboard: tests/test_console.py.)"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

import runner
from main import parse_args
from tiny_flags import ENGINE_SPARSE_DETR, ENGINE_TINY
from tools.make_synthetic_coco import make_synthetic_coco
from util import tensorboard as tb
from util.errors import InputError
from util.run_dir import claim_output_dir

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    make_synthetic_coco(root, num_train=8, num_val=4, seed=0, size=64)
    return root


def tiny_args(coco_root: Path, *extra: str) -> argparse.Namespace:
    return parse_args([*ENGINE_TINY, "--coco_path", str(coco_root), *extra])


@pytest.fixture(scope="module")
def tensorboard_run(coco_root, tmp_path_factory) -> tuple[Path, dict]:
    """A tiny Sparse DETR run: 1 epoch of 4 steps, a progress line every 2, 2 val images drawn."""
    out = tmp_path_factory.mktemp("run")
    runner.run(tiny_args(coco_root, *ENGINE_SPARSE_DETR, "--epochs", "1", "--output_dir", str(out), "--tensorboard",
                         "--tensorboard_images", "2"))
    (line,) = (out / "log.txt").read_text().splitlines()
    return out, json.loads(line)


def read_events(folder: Path):
    events = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_event_files_hold_the_step_and_epoch_scalars(tensorboard_run):
    """Catches a missing console metric, loss, COCO stat or corr_* metric, a step axis that is not the steps
    done, and epoch values that differ from log.txt's."""
    out, record = tensorboard_run
    events = read_events(out / "tb")
    scalars = set(events.Tags()["scalars"])
    step_tags = {f"train_step/{name}" for name in ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_mask_prediction",
                                                   "lr", "images_per_s", "peak_mem_mib")}
    assert step_tags <= scalars
    assert [e.step for e in events.Scalars("train_step/loss")] == [1, 3, 4]  # after steps 1, 3 and 4 of 4
    stats = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
    for position, name in enumerate(stats):
        (event,) = events.Scalars(f"test/{name}")
        assert event.step == 0 and event.value == pytest.approx(record["test_coco_eval_bbox"][position], abs=1e-6)
    numbers = {k: v for k, v in record.items() if isinstance(v, float) and k.split("_")[0] in ("train", "test")}
    assert any(k.startswith("train_corr_mask_attn_map_dec") for k in numbers)
    assert any(k.startswith("train_loss_ce_enc") for k in numbers)
    for key, value in numbers.items():
        split, _, name = key.partition("_")
        (event,) = events.Scalars(f"{split}/{name}")
        assert event.value == pytest.approx(value, rel=1e-6, abs=1e-30), key


def test_event_files_hold_the_val_images_with_their_ground_truth(tensorboard_run, coco_root):
    """Catches images of the wrong count or size (transformed, not original pixels) and ground truth drawn
    elsewhere than its box."""
    import io

    import numpy as np
    import PIL.Image

    out, _ = tensorboard_run
    events = read_events(out / "tb")
    assert sorted(events.Tags()["images"]) == ["val_images/1", "val_images/2"]  # the first 2 val images by id
    annotations = json.loads((coco_root / "annotations" / "instances_val2017.json").read_text())
    for image_id in (1, 2):
        (event,) = events.Images(f"val_images/{image_id}")
        assert (event.step, event.width, event.height) == (0, 64, 64)
        pixels = np.asarray(PIL.Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        boxes = [a["bbox"] for a in annotations["annotations"] if a["image_id"] == image_id]
        assert boxes
        for x, y, w, h in boxes:  # the left edge's middle pixel is ground-truth white (unless a detection covers it)
            assert tuple(pixels[int(y + h // 2), int(x)]) == (255, 255, 255)


def test_a_resumed_run_replaces_the_steps_a_killed_run_logged_after_its_checkpoint(tensorboard_run, coco_root,
                                                                                    tmp_path):
    """Catches the steps between the checkpoint and the kill drawn twice (once per process) after --resume."""
    import shutil

    from torch.utils.tensorboard import SummaryWriter

    out = tmp_path / "run"
    shutil.copytree(tensorboard_run[0], out)
    killed = SummaryWriter(str(out / "tb"))  # a process that went on after the epoch-0 checkpoint, then was killed
    killed.add_scalar("train_step/loss", 999.0, 6)
    killed.close()
    runner.run(tiny_args(coco_root, *ENGINE_SPARSE_DETR, "--epochs", "2", "--output_dir", str(out), "--resume", "auto",
                         "--tensorboard"))
    events = read_events(out / "tb")
    steps = [e.step for e in events.Scalars("train_step/loss")]
    assert steps == [1, 3, 4, 5, 7, 8]  # epoch 0's (before the checkpoint) kept, the killed process's dropped
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1]


class FixedDetections(torch.nn.Module):
    """A 'model' whose post-processed output is one box at x, y 10..30 of each image (score 0.9, category 2) and
    one at 40..60 scoring under the threshold."""

    def forward(self, samples, orig_sizes=None):
        if orig_sizes is None:  # the model
            return {"pred_logits": samples.tensors.mean()}
        return [{"scores": torch.tensor([0.9, tb.DETECTION_THRESHOLD - 0.01]), "labels": torch.tensor([2, 3]),
                 "boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0], [40.0, 40.0, 60.0, 60.0]])} for _ in orig_sizes]


def test_detection_images_draw_the_detections_above_the_threshold_in_original_pixels(coco_root):
    """Catches detections drawn in the transformed image's pixels, low-scoring ones drawn, and a model left in
    evaluation mode for the next training epoch."""
    import numpy as np

    from datasets import build_dataset
    from util.draw import category_color

    dataset = build_dataset("val", tiny_args(coco_root, "--val_size", "128", "--max_size", "128"))  # 64 -> 128 px
    model = FixedDetections().train()
    images = tb.detection_images(model, FixedDetections(), dataset, 2, torch.device("cpu"), {2: "circle"})
    assert model.training and list(images) == [1, 2]
    for pixels in images.values():
        assert pixels.shape == (3, 64, 64) and pixels.dtype == np.uint8
        assert tuple(pixels[:, 20, 10]) == category_color(2)  # the left edge, in the file's 64x64 pixels
        assert tuple(pixels[:, 50, 40]) != category_color(3)  # under the threshold: not drawn


def test_epoch_scalars_name_every_number_of_a_record():
    """Catches the COCO stats written as one unnamed list, an EMA evaluation's stats mixed with the plain ones,
    and non-numbers or bookkeeping fields written as scalars."""
    record = {"train_loss": 2.5, "train_nonfinite_steps": 0, "test_loss": 3.0, "epoch": 4, "n_parameters": 10,
              "test_coco_eval_bbox": [0.1 * i for i in range(12)], "test_ema_coco_eval_bbox": [0.5] * 12,
              "train_flag": True, "test_note": "text"}
    scalars = tb.epoch_scalars(record)
    assert scalars["train/loss"] == 2.5 and scalars["train/nonfinite_steps"] == 0 and scalars["test/loss"] == 3.0
    assert scalars["test/AP50"] == pytest.approx(0.1) and scalars["test/ARl"] == pytest.approx(1.1)
    assert scalars["test/ema_AP"] == 0.5 and scalars["test/ema_ARl"] == 0.5
    assert len(scalars) == 3 + 12 + 12


@pytest.mark.parametrize("flags, message", [
    (["--tensorboard"], "--tensorboard writes into <output_dir>/tb: add --output_dir"),
    (["--tensorboard", "--output_dir", "x", "--eval", "--resume", "c.pth"], "--tensorboard logs training runs: drop "
                                                                          "it with --eval"),
    (["--tensorboard_images", "2", "--output_dir", "x"], "--tensorboard_images draws detections into TensorBoard: "
                                                           "add --tensorboard"),
    (["--tensorboard", "--tensorboard_images", "-1", "--output_dir", "x"], "--tensorboard_images must be >= 0"),
])
def test_flag_checks_name_the_fix(flags, message, coco_root):
    with pytest.raises(SystemExit) as info:
        tiny_args(coco_root, *flags)
    assert message in str(info.value)


def test_missing_package_is_a_one_line_error_and_other_ranks_write_nothing(coco_root, tmp_path, monkeypatch):
    """Catches a deep ImportError traceback (the package is optional) and a writer on every torchrun process."""
    args = tiny_args(coco_root, "--tensorboard", "--output_dir", str(tmp_path))
    monkeypatch.setattr(tb, "is_main_process", lambda: False)
    assert tb.build_tensorboard(args, tmp_path) is None
    assert not (tmp_path / "tb").exists()
    real_find_spec = tb.importlib.util.find_spec
    monkeypatch.setattr(tb.importlib.util, "find_spec", lambda name: None if name == "tensorboard" else
                        real_find_spec(name))
    with pytest.raises(InputError, match="--tensorboard needs the tensorboard package: pip install tensorboard"):
        tb.build_tensorboard(args, tmp_path)


def test_overwrite_moves_the_old_tensorboard_folder_aside(tmp_path):
    """Catches a fresh run's curves drawn over those of the run it replaced."""
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "events.out.tfevents.1").write_bytes(b"old")
    with pytest.raises(InputError, match="already holds a run"):
        claim_output_dir(tmp_path, resume_from=None, overwrite=False)
    claim_output_dir(tmp_path, resume_from=None, overwrite=True).release()
    assert not (tmp_path / "tb").exists()
    (moved,) = tmp_path.glob("overwritten-*/tb/events.out.tfevents.1")
    assert moved.read_bytes() == b"old"


def test_drawn_detections_are_labelled_with_the_dataset_category_names(coco_root, tmp_path, monkeypatch):
    """Catches the runner not handing the val set's category names to TensorBoard (labels would be bare ids)."""
    seen = []

    def fake_detection_images(model, postprocessor, dataset, count, device, names):
        seen.append(dict(names))
        return {}

    monkeypatch.setattr(tb, "detection_images", fake_detection_images)
    runner.run(tiny_args(coco_root, *ENGINE_SPARSE_DETR, "--epochs", "1", "--output_dir", str(tmp_path),
                         "--tensorboard", "--tensorboard_images", "1"))
    categories = json.loads((coco_root / "annotations" / "instances_val2017.json").read_text())["categories"]
    assert seen == [{c["id"]: c["name"] for c in categories}] and seen[0]

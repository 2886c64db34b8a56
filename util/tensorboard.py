"""``--tensorboard``: scalars and detection images in ``<output_dir>/tb``, written by rank 0.

    train_step/<name>   every --log_every steps, the console line's numbers (util/console.py: lr, loss, loss_ce,
                        loss_bbox, loss_giou, the token-selection rule's losses with --rho, images_per_s,
                        peak_mem_mib);
                        x: training steps done since epoch 0
    train/<key>         every epoch, each number of log.txt's train_<key> (all averaged losses, unscaled ones,
                        Sparse DETR's corr_* coverage metrics, lr, grad_norm, ...); x: the epoch
    test/<key>          after each evaluation, each number of log.txt's test_<key>, and the 12 COCO stats by
                        name (test/AP, test/AP50, ..., test/ARl; a test_<p>coco_eval_bbox list gives test/<p>AP...)
    val_images/<id>     with --tensorboard_images N: the first N val images (by image id) with their ground truth
                        (white) and the detections scoring at least DETECTION_THRESHOLD (coloured, with class
                        name and score), at each evaluation

The tensorboard package is imported by :func:`build_tensorboard` alone: runs without --tensorboard never need it.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import nn

from util.console import COCO_STAT_NAMES, TrainReport
from util.draw import category_color, draw_boxes
from util.errors import InputError
from util.misc import collate_fn, is_main_process
from util.process import preserved_rng_state

logger = logging.getLogger(__name__)

DETECTION_THRESHOLD = 0.3  # low enough that an early model shows some detections
COCO_STATS_KEY = "coco_eval_bbox"
GROUND_TRUTH_COLOR = (255, 255, 255)


def epoch_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The TensorBoard tags and values of a log.txt record (see the module docstring): ``train_x`` -> ``train/x``,
    ``test_x`` -> ``test/x``, a ``<split>_<p>coco_eval_bbox`` list -> ``<split>/<p>AP``, ..., ``<split>/<p>ARl``;
    values that are not numbers are left out, as are ``epoch`` and ``n_parameters``."""
    scalars = {}
    for key, value in record.items():
        split, _, name = key.partition("_")
        if split not in ("train", "test") or not name:
            continue
        if name.endswith(COCO_STATS_KEY) and isinstance(value, (list, tuple)):
            prefix = name[:-len(COCO_STATS_KEY)]
            scalars.update({f"{split}/{prefix}{stat}": float(v) for stat, v in zip(COCO_STAT_NAMES, value)})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            scalars[f"{split}/{name}"] = float(value)
    return scalars


@torch.no_grad()
def detection_images(model: nn.Module, postprocessor: nn.Module, dataset, count: int, device: torch.device,
                     names: Mapping[int, str]) -> dict[int, np.ndarray]:
    """``{image id: [3, H, W] uint8}``: the first ``count`` images of ``dataset`` (a ``datasets.coco.CocoDetection``
    with the validation transforms), in their original pixels, with their ground truth and ``model``'s
    detections scoring at least :data:`DETECTION_THRESHOLD`. Leaves the random streams and the model's mode as
    they were."""
    was_training = model.training
    model.eval()
    pictures = {}
    for index in range(min(count, len(dataset))):  # one at a time: N large images need no more memory than one
        with preserved_rng_state():  # the val transform draws its (single) size from Python's random
            samples, (target,) = collate_fn([dataset[index]])
        outputs = model(samples.to(device))
        (result,) = postprocessor(outputs, target["orig_size"].view(1, 2).to(device))
        result = {k: v.cpu() for k, v in result.items()}
        image_id = int(target["image_id"])
        canvas = dataset.load_image(image_id).convert("RGB")
        truth = [a["bbox"] for a in dataset.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        draw_boxes(canvas, [(x, y, x + w, y + h) for x, y, w, h in truth], [GROUND_TRUTH_COLOR] * len(truth))
        keep = result["scores"] >= DETECTION_THRESHOLD
        order = result["scores"][keep].argsort()  # the best drawn last, on top
        scores, labels = result["scores"][keep][order].tolist(), result["labels"][keep][order].tolist()
        draw_boxes(canvas, result["boxes"][keep][order].tolist(), [category_color(c) for c in labels],
                   [f"{names.get(c, str(c))} {s:.2f}" for c, s in zip(labels, scores)])
        pictures[image_id] = np.asarray(canvas).transpose(2, 0, 1).copy()
    model.train(was_training)
    return pictures


class TensorBoardLog:
    """Writes the run's scalars and detection images with ``writer`` (a ``SummaryWriter``); see the module
    docstring. ``num_images`` val images get their detections drawn at each evaluation, labelled with
    ``category_names`` (by category id; an id without a name is shown as it is)."""

    def __init__(self, writer, *, num_images: int = 0, category_names: Optional[Mapping[int, str]] = None):
        self.writer = writer
        self.num_images = num_images
        self.category_names = dict(category_names or {})

    def step(self, global_step: int, report: TrainReport) -> None:
        """The numbers of a training progress line, at ``global_step`` (steps done since epoch 0)."""
        for name, value in report.scalars().items():
            self.writer.add_scalar(f"train_step/{name}", value, global_step)

    def epoch(self, record: Mapping[str, Any], *, model: nn.Module, postprocessor: nn.Module, dataset_val,
              device: torch.device) -> None:
        """The scalars of an epoch's log.txt ``record`` and, when it holds an evaluation, the detection images of
        ``model`` (unwrapped from DDP) on the first val images."""
        epoch = int(record["epoch"])
        for tag, value in epoch_scalars(record).items():
            self.writer.add_scalar(tag, value, epoch)
        if self.num_images and any(key.startswith("test_") for key in record):
            images = detection_images(model, postprocessor, dataset_val, self.num_images, device,
                                      self.category_names)
            for image_id, pixels in images.items():
                self.writer.add_image(f"val_images/{image_id}", pixels, epoch, dataformats="CHW")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def build_tensorboard(args: argparse.Namespace, output_dir: Optional[Path], *, steps_done: int = 0,
                      category_names: Optional[Mapping[int, str]] = None) -> Optional[TensorBoardLog]:
    """The run's :class:`TensorBoardLog` in ``output_dir``/tb with ``--tensorboard`` on rank 0, else None.
    InputError on every process, naming the fix, when the tensorboard package is missing.

    ``steps_done``: the training steps behind the run (since epoch 0; a resumed run's). TensorBoard drops the
    step scalars that an earlier process wrote past them (after the checkpoint this run resumes, before it was
    killed), so that a resumed run's curves have no second copy of those steps. ``category_names``: the labels
    of the drawn detections (see :class:`TensorBoardLog`)."""
    if not args.tensorboard or output_dir is None:
        return None
    if importlib.util.find_spec("tensorboard") is None:
        raise InputError("--tensorboard needs the tensorboard package: pip install tensorboard, or drop --tensorboard")
    if not is_main_process():
        return None
    from torch.utils.tensorboard import SummaryWriter
    log_dir = output_dir / "tb"
    logger.info("TensorBoard: writing to %s (tensorboard --logdir %s)", log_dir, log_dir)
    # Progress lines come after a step: the first this run writes is at steps_done + 1 or later.
    return TensorBoardLog(SummaryWriter(str(log_dir), purge_step=steps_done + 1), num_images=args.tensorboard_images,
                          category_names=category_names)

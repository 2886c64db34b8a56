"""``main.py --eval``: evaluate a checkpoint and keep what a researcher needs (``runner.run`` calls it).

    evaluate_checkpoint   load the weights, evaluate, write eval.json, eval.pth and the results file

Files go to ``--output_dir`` (rank 0 alone writes): ``eval.json`` (the 12 stats by name, the AP per class,
checkpoint, model, dataset; ``datasets/coco_results.py``), the references' ``eval.pth`` and, with
``--save_detections``, ``detections_<split>.json`` in the COCO results format.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from datasets.coco_results import save_detections, save_evaluation
from engine import evaluate
from models import load_weights_strict
from models.description import ModelDescription
from util.checkpoint import load_checkpoint, model_state
from util.misc import is_main_process

logger = logging.getLogger(__name__)


def evaluate_checkpoint(args: argparse.Namespace, model: nn.Module, criterion: nn.Module,
                        postprocessors: Mapping[str, nn.Module], loader_val: DataLoader, base_ds, resume_path: Path,
                        device: torch.device, amp_dtype: Optional[torch.dtype], *,
                        description: ModelDescription) -> dict[str, Any]:
    """``--eval``: load ``resume_path``'s weights (``--eval_weights``), evaluate them, and with ``--output_dir``
    write eval.json (with ``description``, the model evaluated) and eval.pth (``--save_detections``: the results
    file too). Returns the ``test_*``
    (``test_ema_*``) stats; none for a split without ground truth (``--eval_split test-dev``)."""
    checkpoint = load_checkpoint(resume_path, trust=args.trust_checkpoint)
    weights = model_state(checkpoint, args.eval_weights, source=resume_path, flag="--eval_weights")
    load_weights_strict(model, {**checkpoint, "model": weights}, resume_path, current_flags=vars(args),
                        built_as=f"--model {args.model}")
    scored = args.eval_split == "val"
    test_stats, evaluator = evaluate(model, criterion, postprocessors, loader_val, base_ds, device, amp_dtype,
                                     args.log_every, backend=args.eval_backend, per_class=args.per_class,
                                     with_ground_truth=scored)
    out = Path(args.output_dir) if args.output_dir and is_main_process() else None
    if out is not None and args.save_detections:
        path = out / f"detections_{args.eval_split}.json"
        count = save_detections(path, evaluator)
        if scored:
            logger.info("wrote %d detections of %d images to %s (the COCO results format)", count,
                        len(evaluator.img_ids), path)
        else:  # --eval_split needs --save_detections (main.py)
            logger.info("--eval_split %s has no ground truth, so no metrics: wrote the %d detections of its %d "
                        "images to %s, for the COCO evaluation server", args.eval_split, count,
                        len(evaluator.img_ids), path)
    if not scored:
        return {}
    what = "the moving average of the weights" if args.eval_weights == "ema" else "the weights"
    logger.info("evaluation of %s of %s: AP %.1f, AP50 %.1f, AP75 %.1f (percent)", what, resume_path,
                *(100 * v for v in test_stats["coco_eval_bbox"][:3]))
    if out is not None:
        path = save_evaluation(out, evaluator, name="eval", checkpoint=resume_path, weights=args.eval_weights,
                               model=description.to_dict(), dataset=loader_val.dataset, eval_pth=True)
        logger.info("wrote %s and %s", path, out / "eval.pth")
    prefix = "test_ema" if args.eval_weights == "ema" else "test"  # the keys of log.txt
    return {f"{prefix}_{k}": v for k, v in test_stats.items()}

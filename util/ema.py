"""Exponential moving average of the weights (``--ema_decay D``).

After every optimiser step that was applied (a step skipped for a non-finite loss or gradient, or by the fp16
gradient scaler, leaves it as it was), each floating-point parameter of the average becomes
``D * average + (1 - D) * weight``. Buffers are copied, not averaged: here they are frozen BatchNorm
statistics and indices derived from the configuration, which the model never learns, so the average keeps
exactly the model's.

No warm-up: the average starts as the weights it is created from (the initial, fine-tuned or resumed ones)
and moves from there. A warm-up (a smaller decay in the first steps) would make the first epochs' average
closer to the current weights, at the price of a step count to save and restore; with the decays used for
detection (0.9998: the initial weights' share falls below 2% after 20k steps, an eighth of a 50-epoch COCO
run at batch 32) the plain average is good enough, and the resume stays a restore of one state dict.

Under DistributedDataParallel the average follows the unwrapped model: every process holds the same one,
since the processes' weights are equal after every step.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from util.checkpoint import strip_ddp_prefix
from util.errors import InputError

logger = logging.getLogger(__name__)


class ModelEMA:
    """The moving average of ``model``'s weights with ``decay``, held in ``module``, a copy of ``model`` (eval
    mode, no gradients) that evaluates like the model itself. ``model`` must be the unwrapped model (not its
    DistributedDataParallel wrapper); :meth:`update` averages its current weights in."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.source = model
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        averaged = dict(self.module.named_parameters())
        self._pairs = [(averaged[name], param) for name, param in model.named_parameters()
                       if param.is_floating_point()]
        own_buffers = dict(self.module.named_buffers())
        self._buffers = [(own_buffers[name], buffer) for name, buffer in model.named_buffers()]

    @torch.no_grad()
    def update(self) -> None:
        """``average = decay * average + (1 - decay) * weight`` for every floating-point parameter (a weight
        equal to its average, e.g. a frozen one, keeps it bitwise); buffers copied."""
        if self._pairs:
            torch._foreach_lerp_([average for average, _ in self._pairs], [param.detach() for _, param in self._pairs],
                                 1.0 - self.decay)
        for own, buffer in self._buffers:
            own.copy_(buffer)

    def state_dict(self) -> dict[str, Tensor]:
        """The average as a state dict with the model's keys, in its order (a checkpoint's ``model_ema``)."""
        return self.module.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Restore an average saved by :meth:`state_dict` (strictly: the same keys and shapes)."""
        self.module.load_state_dict(state_dict, strict=True)


def start_ema(model: nn.Module, decay: Optional[float], checkpoint: Optional[Mapping[str, Any]],
              source: Optional[str | Path] = None) -> Optional[ModelEMA]:
    """The moving average of a run with ``--ema_decay decay`` (None without it): restored from the resumed
    ``checkpoint``'s ``model_ema`` when it holds one, otherwise started from ``model``'s weights as loaded (logged
    when the checkpoint, e.g. an official one or a run without --ema_decay, holds none).

    Resuming a checkpoint that holds an average without ``--ema_decay`` raises InputError naming the decay it was
    trained with: the run's next checkpoint would silently lose the average and log.txt its ``test_ema_*``."""
    saved = None if checkpoint is None else checkpoint.get("model_ema")
    if decay is None:
        if saved is not None:
            stored = getattr(checkpoint.get("args"), "ema_decay", None)
            flag = f"--ema_decay {stored:g}" if isinstance(stored, float) else "--ema_decay with its decay"
            raise InputError(f"{source} holds a moving average of the weights (model_ema) that this run, without "
                             f"--ema_decay, would drop from its next checkpoint: resume with {flag} to keep it. To "
                             f"continue without it, start a new run from its weights: --finetune {source} with a new "
                             "--output_dir.")
        return None
    ema = ModelEMA(model, decay)
    if saved is not None:
        ema.load_state_dict(strip_ddp_prefix(saved))
        logger.info("--ema_decay %g: continuing the moving average of the weights saved in %s", decay, source)
    elif checkpoint is not None:
        logger.info("--ema_decay %g: %s holds no moving average of the weights (model_ema); it starts from the "
                    "weights loaded from it", decay, source)
    else:
        logger.info("--ema_decay %g: the moving average of the weights starts from the initial weights", decay)
    return ema

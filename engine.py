"""The training and evaluation loops (what ``runner.run`` calls each epoch).

    train_step        one batch: forward (autocast), weighted loss, backward, clipping, optimiser step
    train_one_epoch   the batches of one epoch, with the stop checks after each step
    evaluate          losses and COCO box AP on the validation data

A step with a non-finite loss or gradient norm is skipped and counted; the caller decides when too many in a
row end training (see ``runner.py``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from datasets.coco_eval import CocoEvaluator
from datasets.coco_results import per_class_ap
from util.checkpoint import EpochProgress
from util.console import Progress, RunPace, TrainReport, ap_table, class_ap_table, eval_line, log_progress
from util.ema import ModelEMA
from util.logger import MetricLogger, SmoothedValue
from util.misc import get_world_size, reduce_dict
from util.process import StopRequest

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# One step's pieces


def to_device(samples, targets: Sequence[dict], device: torch.device):
    """Move a collated batch (NestedTensor, target dicts) to ``device``."""
    non_blocking = device.type == "cuda"
    samples = samples.to(device, non_blocking=non_blocking)
    targets = [{k: v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v for k, v in t.items()}
               for t in targets]
    return samples, targets


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """``torch.autocast`` to ``amp_dtype`` on ``device``, or a no-op context when ``amp_dtype`` is None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def outputs_to_float32(outputs: Any) -> Any:
    """Cast every half-precision tensor of a (nested) model output to float32, for the losses."""
    if isinstance(outputs, Tensor):
        return outputs.float() if outputs.is_floating_point() and outputs.dtype != torch.float32 else outputs
    if isinstance(outputs, Mapping):
        return {k: outputs_to_float32(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(outputs_to_float32(v) for v in outputs)
    return outputs


def weighted_loss(loss_dict: Mapping[str, Tensor], weight_dict: Mapping[str, float]) -> Tensor:
    """``sum(loss_dict[k] * weight_dict[k] for k in weight_dict)``."""
    missing = [k for k in weight_dict if k not in loss_dict]
    if missing:
        raise KeyError(f"the criterion returned no {missing} although its weight_dict weights them")
    return sum(loss_dict[k] * weight_dict[k] for k in weight_dict)


def reduced_loss_stats(loss_dict: Mapping[str, Tensor], weight_dict: Mapping[str, float]) -> dict[str, float]:
    """Losses averaged over processes, for logging: ``loss`` (the weighted total), every weighted loss under
    its name, every criterion output as ``<name>_unscaled``, and ``class_error``."""
    reduced = reduce_dict({k: v.detach().float().reshape(()) for k, v in loss_dict.items()})
    names = list(reduced)
    values = dict(zip(names, torch.stack([reduced[k] for k in names]).tolist())) if names else {}
    stats = {"loss": sum(values[k] * w for k, w in weight_dict.items())}
    stats.update({k: values[k] * w for k, w in weight_dict.items()})
    stats.update({f"{k}_unscaled": v for k, v in values.items()})
    if "class_error" in values:
        stats["class_error"] = values["class_error"]
    return stats


def nonfinite_loss_problem(stats: Mapping[str, float], weight_dict: Mapping[str, float]) -> str:
    """What is wrong with a non-finite weighted total ``stats["loss"]``: the losses that are not finite."""
    bad = [f"{k}={stats[k + '_unscaled']}" for k in weight_dict if not math.isfinite(stats[k + "_unscaled"])]
    culprits = ", ".join(bad) if bad else "no loss alone: their weighted sum overflowed"
    return f"non-finite loss {stats['loss']} ({culprits})"


def grad_norm_and_clip(parameters: Iterable[Tensor], max_norm: float) -> float:
    """Total L2 norm of the gradients; clips them to ``max_norm`` when it is > 0."""
    grads = [p for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach()) for p in grads])))


# ----------------------------------------------------------------------------------------------
# Training and evaluation loops


@contextlib.contextmanager
def shut_down_workers_after(data_loader: Iterable) -> Iterator[Iterator]:
    """``iter(data_loader)``, whose worker processes are shut down when the block ends, also on an exception.

    The workers ignore SIGTERM (see ``util.process.ignore_stop_signals``); left to the interpreter's exit,
    which ends them with SIGTERM and waits, they would hang a run that failed."""
    iterator = iter(data_loader)
    try:
        yield iterator
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # DataLoader's; absent for plain iterables
        if shutdown is not None:
            shutdown()


@dataclass
class StepResult:
    """One training step: its losses averaged over processes (see :func:`reduced_loss_stats`), the gradient
    norm (None when no backward ran), and ``problem``: why the step was skipped (None when it was applied)."""
    stats: dict[str, float]
    grad_norm: Optional[float] = None
    problem: Optional[str] = None


def train_step(model: nn.Module, criterion: nn.Module, samples, targets: Sequence[dict],
               optimizer: torch.optim.Optimizer, device: torch.device, clip_max_norm: float = 0.0,
               scaler: Optional[torch.amp.GradScaler] = None,
               amp_dtype: Optional[torch.dtype] = None) -> StepResult:
    """Forward (under autocast with ``amp_dtype``), losses in float32, total = sum(loss * weight) over
    ``criterion.weight_dict``, backward (scaled when ``scaler`` is enabled), gradient clipping to
    ``clip_max_norm`` (0 disables), optimiser step.

    A non-finite total skips the backward and the update; a non-finite gradient norm with a finite total
    skips the update, except with the fp16 scaler, which skips such steps itself and lowers its scale (the
    usual way it finds its scale). Every process decides alike: the losses are averaged over processes and
    the gradients already are.
    """
    samples, targets = to_device(samples, targets, device)
    with autocast(device, amp_dtype):
        outputs = model(samples)
    loss_dict = criterion(outputs_to_float32(outputs), targets)
    total = weighted_loss(loss_dict, criterion.weight_dict)
    stats = reduced_loss_stats(loss_dict, criterion.weight_dict)
    if not math.isfinite(stats["loss"]):
        return StepResult(stats, problem=nonfinite_loss_problem(stats, criterion.weight_dict))

    optimizer.zero_grad(set_to_none=True)
    use_scaler = scaler is not None and scaler.is_enabled()
    if use_scaler:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
    else:
        total.backward()
    grad_norm = grad_norm_and_clip(model.parameters(), clip_max_norm)
    if use_scaler:
        scaler.step(optimizer)
        scaler.update()
    elif math.isfinite(grad_norm):
        optimizer.step()
    else:
        return StepResult(stats, grad_norm, f"non-finite gradient norm {grad_norm} with a finite loss "
                                            f"{stats['loss']:.4g}")
    return StepResult(stats, grad_norm)


@dataclass
class EpochResult:
    """A pass over training batches: whether the epoch is ``complete`` (then ``stats`` holds its averages),
    where it stands (``progress``), and ``stopped``: None, ``"signal"`` (a stop signal reached some process) or
    ``"nonfinite"`` (too many skipped steps in a row, the last one for ``problem``)."""
    complete: bool
    stats: dict[str, float]
    progress: EpochProgress
    stopped: Optional[str] = None
    problem: str = ""


def train_one_epoch(model: nn.Module, criterion: nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, clip_max_norm: float = 0.0,
                    scaler: Optional[torch.amp.GradScaler] = None, amp_dtype: Optional[torch.dtype] = None,
                    log_every: int = 50, *, progress: Optional[EpochProgress] = None,
                    stop: Optional[StopRequest] = None, max_nonfinite: int = 10,
                    on_report: Optional[Callable[[int, TrainReport], None]] = None,
                    ema: Optional[ModelEMA] = None, run_pace: Optional[RunPace] = None) -> EpochResult:
    """Train ``model`` on the batches of ``data_loader`` (see :func:`train_step`): those of epoch ``epoch``
    after the ``progress.step`` already done, whose averages ``progress`` carries on.

    After each step it stops when ``stop`` reports a signal on any process, or when ``max_nonfinite`` steps
    in a row were skipped (each is logged as a warning). A complete epoch's ``stats`` are the averages
    of ``loss``, every weighted loss, every ``*_unscaled`` criterion output, ``class_error``, ``lr`` (of the
    first parameter group) and ``grad_norm`` over the applied steps, plus ``nonfinite_steps`` (the skipped
    steps) and, with the fp16 scaler, ``skipped_steps`` (the steps it skipped). ``ema`` (``--ema_decay``) averages
    the weights in after every step the optimiser applied.

    Every ``log_every`` steps it logs a progress line (util/console.py) and hands its report to ``on_report``
    with the number of steps done since epoch 0 (e.g. to TensorBoard); with ``run_pace`` the line shows the whole
    run's ETA too.
    """
    model.train()
    criterion.train()
    progress = dataclasses.replace(progress or EpochProgress())
    metrics = MetricLogger()
    metrics.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    metrics.add_meter("class_error", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    metrics.add_meter("grad_norm", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    metrics.add_totals(progress.totals)
    num_steps = progress.step + len(data_loader)  # type: ignore[arg-type]
    stopped, problem = None, ""

    def report_line(at: Progress) -> str:
        run_eta = None if run_pace is None else run_pace.eta_s(epoch * num_steps + at.step)
        report = TrainReport.now(epoch, at, lr=optimizer.param_groups[0]["lr"], smoothed=metrics.medians(),
                                 run_eta_s=run_eta)
        if on_report is not None:
            on_report(epoch * num_steps + at.step, report)
        return report.line()

    with shut_down_workers_after(data_loader) as loader_iter:
        batches = log_progress(loader_iter, name=f"epoch {epoch}", total=num_steps, every=log_every,
                               line=report_line, done=progress.step, world_size=get_world_size(), log=logger)
        for step, (samples, targets) in enumerate(batches, progress.step):
            result = train_step(model, criterion, samples, targets, optimizer, device, clip_max_norm, scaler,
                                amp_dtype)
            progress.step = step + 1
            if result.problem is None:
                progress.nonfinite_streak = 0
                metrics.update(**result.stats, lr=optimizer.param_groups[0]["lr"])
                if math.isfinite(result.grad_norm):
                    metrics.update(grad_norm=result.grad_norm)
                    if ema is not None:  # a step the optimiser applied (the fp16 scaler skips the others)
                        ema.update()
                else:
                    progress.scaler_skipped += 1
            else:
                progress.nonfinite += 1
                progress.nonfinite_streak += 1
                logger.warning("epoch %d, iteration %d (batch %d of %d): %s; step skipped (%d in a row; training "
                               "stops at %d, see --max_nonfinite)", epoch, step, step + 1, num_steps,
                               result.problem, progress.nonfinite_streak, max_nonfinite)
            signalled = stop is not None and stop.agreed()
            if progress.nonfinite_streak >= max_nonfinite or signalled:
                stopped = "nonfinite" if progress.nonfinite_streak >= max_nonfinite else "signal"
                problem = result.problem or ""
                break
    if progress.step < num_steps:
        progress.totals = metrics.totals()
        return EpochResult(False, {}, progress, stopped, problem)
    metrics.synchronize_between_processes()
    logger.debug("Epoch %d averaged stats: %s", epoch, metrics)
    stats = metrics.global_averages()
    stats["nonfinite_steps"] = progress.nonfinite
    if progress.nonfinite:
        logger.warning("Epoch %d: %d of %d steps skipped for non-finite values", epoch, progress.nonfinite, num_steps)
    if scaler is not None and scaler.is_enabled():
        stats["skipped_steps"] = progress.scaler_skipped
        logger.info("Epoch %d: the fp16 gradient scaler skipped %d of %d steps", epoch, progress.scaler_skipped,
                    num_steps)
    return EpochResult(True, stats, progress, stopped, problem)


class EvaluationStopped(Exception):
    """A stop signal reached some process during :func:`evaluate`: every process stopped after the same batch."""


@torch.no_grad()
def evaluate(model: nn.Module, criterion: nn.Module, postprocessors: Mapping[str, nn.Module], data_loader: Iterable,
             base_ds, device: torch.device, amp_dtype: Optional[torch.dtype] = None,
             log_every: int = 50, stop: Optional[StopRequest] = None, *, backend: str = "pycocotools",
             per_class: bool = False, with_ground_truth: bool = True) -> tuple[dict[str, Any], CocoEvaluator]:
    """Losses and COCO box evaluation of ``model`` on ``data_loader`` (``base_ds``: its pycocotools ground truth).

    Returns the averaged losses (as in :func:`train_one_epoch`) plus ``coco_eval_bbox`` (the 12 COCO stats:
    AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl), and the evaluator, which holds every
    detection (``evaluator.results``). Logs the 12 stats and the AP per class (every class with ``per_class``,
    else the best and worst few), in percent. ``backend``: see ``datasets.coco_eval.BACKENDS``.
    ``with_ground_truth=False`` (a split of images without annotations, as COCO test-dev) only collects the
    detections: no loss, no stat (an empty dict). Raises :class:`EvaluationStopped` after the batch in which
    ``stop`` reports a signal on any process.
    """
    model.eval()
    criterion.eval()
    weight_dict = criterion.weight_dict
    metrics = MetricLogger()
    metrics.add_meter("class_error", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    evaluator = CocoEvaluator(base_ds, ("bbox",), backend=backend)
    with shut_down_workers_after(data_loader) as loader_iter:
        for samples, targets in log_progress(loader_iter, name="eval", total=len(data_loader),  # type: ignore[arg-type]
                                             every=log_every, line=eval_line, world_size=get_world_size(),
                                             log=logger):
            samples, targets = to_device(samples, targets, device)
            with autocast(device, amp_dtype):
                outputs = model(samples)
            outputs = outputs_to_float32(outputs)
            if with_ground_truth:
                metrics.update(**reduced_loss_stats(criterion(outputs, targets), weight_dict))
            orig_sizes = torch.stack([t["orig_size"] for t in targets])
            results = postprocessors["bbox"](outputs, orig_sizes)
            evaluator.update({int(t["image_id"].item()): r for t, r in zip(targets, results)})
            if stop is not None and stop.agreed():
                raise EvaluationStopped()
    evaluator.synchronize_between_processes()
    if not with_ground_truth:
        return {}, evaluator
    metrics.synchronize_between_processes()
    logger.debug("Test averaged stats: %s", metrics)
    evaluator.accumulate()
    evaluator.summarize()
    logger.info("%s", ap_table(evaluator.stats, len(evaluator.img_ids)))
    coco_eval = evaluator.coco_eval["bbox"]
    if coco_eval.eval:
        logger.info("%s", class_ap_table(per_class_ap(coco_eval, base_ds), show_all=per_class))
    stats: dict[str, Any] = metrics.global_averages()
    stats["coco_eval_bbox"] = evaluator.stats
    return stats, evaluator

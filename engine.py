"""Training and evaluation loops and the main program (``run``) behind ``main.py``.

    train_one_epoch   one pass over the training data: weighted loss, backward, clipping, step
    evaluate          losses and COCO box AP on the validation data
    run               the whole program: distribution, data, model, optimiser, checkpoints, logs

Single process by default; under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK in the environment)
each process trains on its shard (NCCL on CUDA, gloo on CPU) and rank 0 alone logs and writes files.

Faults: the first SIGTERM / SIGINT makes every process stop after the same step, and rank 0 writes a
mid-epoch checkpoint.pth that ``--resume auto`` continues exactly (then ``TrainingStopped``, exit
status 128 + the signal number). A step with a non-finite loss or gradient norm is skipped; after
``--max_nonfinite`` in a row training stops with a checkpoint and ``NonFiniteLossError`` (exit 1).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from datasets import build_dataset, get_coco_api_from_dataset
from datasets.coco_eval import CocoEvaluator
from datasets.resumable import EpochBatchSampler, SeededSamples
from models import build_model
from util.checkpoint import (
    EpochProgress,
    TrainState,
    load_checkpoint,
    load_finetune_weights,
    load_model_strict,
    remove_unfinished_writes,
    resolve_resume,
    restore_training_state,
    write_checkpoints,
)
from util.errors import InputError
from util.logger import MetricLogger, SmoothedValue
from util.misc import any_process, collate_fn, comm_device, is_main_process, reduce_dict
from util.process import (
    DistContext,
    StopRequest,
    TrainingStopped,
    deterministic_algorithms,
    ignore_stop_signals,
    init_distributed,
    keep_freed_memory,
    preserved_rng_state,
    resolve_device,
    restore_rng_state,
    seed_everything,
    setup_logging,
)

logger = logging.getLogger("engine")

AMP_DTYPES: dict[str, Optional[torch.dtype]] = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}
REFERENCE_BATCH = 16  # --lr_scaling sqrt: the learning rates are the ones of a global batch of 16


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
                    stop: Optional[StopRequest] = None, max_nonfinite: int = 10) -> EpochResult:
    """Train ``model`` on the batches of ``data_loader`` (see :func:`train_step`): those of epoch ``epoch``
    after the ``progress.step`` already done, whose averages ``progress`` carries on.

    After each step it stops when ``stop`` reports a signal on any process, or when ``max_nonfinite`` steps
    in a row were skipped (each is logged as a warning). A complete epoch's ``stats`` are the averages
    of ``loss``, every weighted loss, every ``*_unscaled`` criterion output, ``class_error``, ``lr`` (of the
    first parameter group) and ``grad_norm`` over the applied steps, plus ``nonfinite_steps`` (the skipped
    steps) and, with the fp16 scaler, ``skipped_steps`` (the steps it skipped).
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
    with shut_down_workers_after(data_loader) as loader_iter:
        batches = metrics.log_every(loader_iter, log_every, f"Epoch: [{epoch}]", done=progress.step,
                                    length=len(data_loader))  # type: ignore[arg-type]
        for step, (samples, targets) in enumerate(batches, progress.step):
            result = train_step(model, criterion, samples, targets, optimizer, device, clip_max_norm, scaler,
                                amp_dtype)
            progress.step = step + 1
            if result.problem is None:
                progress.nonfinite_streak = 0
                metrics.update(**result.stats, lr=optimizer.param_groups[0]["lr"])
                if math.isfinite(result.grad_norm):
                    metrics.update(grad_norm=result.grad_norm)
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
    logger.info("Epoch %d averaged stats: %s", epoch, metrics)
    stats = metrics.global_averages()
    stats["nonfinite_steps"] = progress.nonfinite
    if progress.nonfinite:
        logger.warning("Epoch %d: %d of %d steps skipped for non-finite values", epoch, progress.nonfinite, num_steps)
    if scaler is not None and scaler.is_enabled():
        stats["skipped_steps"] = progress.scaler_skipped
        logger.info("Epoch %d: the fp16 gradient scaler skipped %d of %d steps", epoch, progress.scaler_skipped,
                    num_steps)
    return EpochResult(True, stats, progress, stopped, problem)


@torch.no_grad()
def evaluate(model: nn.Module, criterion: nn.Module, postprocessors: Mapping[str, nn.Module], data_loader: Iterable,
             base_ds, device: torch.device, amp_dtype: Optional[torch.dtype] = None,
             log_every: int = 50) -> tuple[dict[str, Any], CocoEvaluator]:
    """Losses and COCO box evaluation of ``model`` on ``data_loader`` (``base_ds``: its pycocotools ground truth).

    Returns the averaged losses (as in :func:`train_one_epoch`) plus ``coco_eval_bbox`` (the 12 COCO stats:
    AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl), and the evaluator.
    """
    model.eval()
    criterion.eval()
    weight_dict = criterion.weight_dict
    metrics = MetricLogger()
    metrics.add_meter("class_error", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    evaluator = CocoEvaluator(base_ds, ("bbox",))
    with shut_down_workers_after(data_loader) as loader_iter:
        for samples, targets in metrics.log_every(loader_iter, log_every, "Test:",
                                                  length=len(data_loader)):  # type: ignore[arg-type]
            samples, targets = to_device(samples, targets, device)
            with autocast(device, amp_dtype):
                outputs = model(samples)
            outputs = outputs_to_float32(outputs)
            metrics.update(**reduced_loss_stats(criterion(outputs, targets), weight_dict))
            orig_sizes = torch.stack([t["orig_size"] for t in targets])
            results = postprocessors["bbox"](outputs, orig_sizes)
            evaluator.update({int(t["image_id"].item()): r for t, r in zip(targets, results)})
    metrics.synchronize_between_processes()
    logger.info("Test averaged stats: %s", metrics)
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    evaluator.summarize()
    stats: dict[str, Any] = metrics.global_averages()
    stats["coco_eval_bbox"] = evaluator.stats
    return stats, evaluator


# ----------------------------------------------------------------------------------------------
# Process setup: distribution, logging, device, seeds
# ----------------------------------------------------------------------------------------------
# Optimiser


def scaled_learning_rates(args: argparse.Namespace, world_size: int) -> tuple[float, float]:
    """``(lr, lr_backbone)`` after ``--lr_scaling``: sqrt multiplies both by sqrt(global batch / 16)."""
    if args.lr_scaling == "none":
        return args.lr, args.lr_backbone
    global_batch = args.batch_size * world_size
    factor = math.sqrt(global_batch / REFERENCE_BATCH)
    logger.info("--lr_scaling sqrt: global batch %d = %d per process x %d processes; learning rates x %.4f "
                "(= sqrt(%d / %d)): lr %.4g -> %.4g, lr_backbone %.4g -> %.4g", global_batch, args.batch_size,
                world_size, factor, global_batch, REFERENCE_BATCH, args.lr, args.lr * factor, args.lr_backbone,
                args.lr_backbone * factor)
    return args.lr * factor, args.lr_backbone * factor


def match_name_keywords(name: str, keywords: Sequence[str]) -> bool:
    """Whether any of ``keywords`` is a substring of the parameter ``name``."""
    return any(keyword in name for keyword in keywords)


def build_param_groups(model: nn.Module, args: argparse.Namespace, lr: float,
                       lr_backbone: float) -> list[dict[str, Any]]:
    """The reference's three parameter groups of the trainable parameters, always in this order:

    0. everything else, at ``lr``;
    1. names matching ``--lr_backbone_names`` but not ``--lr_linear_proj_names``, at ``lr_backbone``;
    2. names matching ``--lr_linear_proj_names`` (sampling offsets, reference points), at
       ``lr * --lr_linear_proj_mult``.
    """
    groups: list[dict[str, Any]] = [{"params": [], "lr": lr}, {"params": [], "lr": lr_backbone},
                                    {"params": [], "lr": lr * args.lr_linear_proj_mult}]
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if match_name_keywords(name, args.lr_linear_proj_names):
            groups[2]["params"].append(param)
        elif match_name_keywords(name, args.lr_backbone_names):
            groups[1]["params"].append(param)
        else:
            groups[0]["params"].append(param)
    return groups


def build_optimizer(model: nn.Module, args: argparse.Namespace, lr: float, lr_backbone: float) -> torch.optim.Optimizer:
    """AdamW (or SGD with momentum 0.9 with ``--sgd``) over :func:`build_param_groups`."""
    groups = build_param_groups(model, args, lr, lr_backbone)
    for label, group in zip(("default", "backbone", "linear projections"), groups):
        logger.info("parameter group %s: %d tensors (%d values) at lr %.4g", label, len(group["params"]),
                    sum(p.numel() for p in group["params"]), group["lr"])
    if args.sgd:
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=args.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=args.weight_decay)


# ----------------------------------------------------------------------------------------------
# Data


def build_data_loader(dataset, args: argparse.Namespace, ctx: DistContext, *, train: bool,
                      device: torch.device) -> DataLoader:
    """Training: an order and augmentations that depend only on ``--seed``, the epoch and the image (sharded
    per process; see datasets/resumable.py), batches of ``--batch_size``, incomplete last batch dropped; set
    the epoch and its first batch with ``loader.batch_sampler.set_epoch``. Evaluation: sequential order
    (sharded per process), every image kept."""
    # Worker seeds come from this generator, not from the global stream that the model's dropout draws from.
    common = dict(collate_fn=collate_fn, num_workers=args.num_workers, pin_memory=device.type == "cuda",
                  worker_init_fn=ignore_stop_signals, generator=torch.Generator().manual_seed(args.seed))
    if not train:
        sampler = DistributedSampler(dataset, shuffle=False) if ctx.distributed else SequentialSampler(dataset)
        return DataLoader(dataset, args.batch_size, sampler=sampler, drop_last=False, **common)
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=args.seed)
    loader = DataLoader(SeededSamples(dataset, args.seed), batch_sampler=EpochBatchSampler(sampler, args.batch_size),
                        **common)
    if len(loader) == 0:
        raise InputError(f"the training set has {len(dataset)} images, fewer than one batch of {args.batch_size} "
                         f"per process x {ctx.world_size} processes: lower --batch_size")
    return loader


def probe_unused_parameters(model: nn.Module, criterion: nn.Module, dataset, batch_size: int,
                            device: torch.device) -> list[str]:
    """Names of the trainable parameters that get no gradient from one training step on the first images
    (e.g. the first decoder layer's heads with --with_box_refine --no_aux_loss). Leaves the random
    streams, the gradients and the modes as they were."""
    was_training = model.training
    with preserved_rng_state():
        samples, targets = collate_fn([dataset[i] for i in range(min(batch_size, len(dataset)))])
        samples, targets = to_device(samples, targets, device)
        model.train()
        criterion.train()
        loss_dict = criterion(model(samples), targets)
        weighted_loss(loss_dict, criterion.weight_dict).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return unused


def wrap_distributed(model: nn.Module, criterion: nn.Module, dataset, args: argparse.Namespace,
                     device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model``, with ``find_unused_parameters`` only when some trainable
    parameter gets no gradient (probed on every process, agreed by all)."""
    unused = probe_unused_parameters(model, criterion, dataset, args.batch_size, device)
    flag = torch.tensor([float(bool(unused))], device=comm_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    find_unused = bool(flag.item())
    if find_unused:
        logger.info("DDP: find_unused_parameters=True (%d trainable tensors get no gradient, e.g. %s)", len(unused),
                    unused[:4])
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused)


# ----------------------------------------------------------------------------------------------
# Epoch records and early stops


class NonFiniteLossError(InputError):
    """Training stopped: too many steps in a row had a non-finite loss or gradient norm."""


@dataclass
class Validation:
    """What evaluating on the validation data takes. Calling it runs :func:`evaluate` without shifting the
    training's random streams and returns its stats."""
    model: nn.Module
    criterion: nn.Module
    postprocessors: Mapping[str, nn.Module]
    loader: Iterable
    base_ds: Any
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    log_every: int

    def __call__(self) -> dict[str, Any]:
        with preserved_rng_state():
            stats, _ = evaluate(self.model, self.criterion, self.postprocessors, self.loader, self.base_ds,
                                self.device, self.amp_dtype, self.log_every)
        return stats


def evaluation_due(epoch: int, eval_every: int, epochs: int) -> bool:
    """Whether epoch ``epoch`` ends with an evaluation: every ``eval_every`` epochs, and after the last."""
    return (epoch + 1) % eval_every == 0 or epoch == epochs - 1


def finish_epoch(epoch: int, train_stats: Mapping[str, Any], validation: Validation, *, evaluate_now: bool,
                 n_parameters: int, output_dir: Optional[Path]) -> dict[str, Any]:
    """Evaluate when ``evaluate_now``, then append the epoch's record (``train_*``, ``test_*``, ``epoch``,
    ``n_parameters``) to ``output_dir``/log.txt; returns the record."""
    test_stats = validation() if evaluate_now else {}
    record = {**{f"train_{k}": v for k, v in train_stats.items()}, **{f"test_{k}": v for k, v in test_stats.items()},
              "epoch": epoch, "n_parameters": n_parameters}
    if output_dir is not None and is_main_process():
        with (output_dir / "log.txt").open("a") as f:
            f.write(json.dumps(record) + "\n")
    return record


def _record_epoch(line: str) -> Optional[int]:
    try:
        return json.loads(line).get("epoch")
    except ValueError:  # a line cut short by a crash
        return None


def log_lacks_epoch(output_dir: Path, epoch: int) -> bool:
    """Whether ``output_dir``/log.txt holds no record of ``epoch``. Rank 0 reads the file (it alone writes
    it); OR-ing over processes hands its answer to all."""
    path = output_dir / "log.txt"
    lacks = is_main_process() and not any(
        _record_epoch(line) == epoch for line in (path.read_text().splitlines() if path.is_file() else []))
    return any_process(lacks)


def record_cut_short_epoch(state: TrainState, resume_path: Optional[Path], output_dir: Optional[Path],
                           validation: Validation, *, eval_every: int, epochs: int,
                           n_parameters: int) -> dict[str, Any]:
    """When training resumes this run's end-of-epoch checkpoint and log.txt lacks that epoch's record (the run
    stopped during the evaluation after the checkpoint), evaluate and write the record now. Returns it, or
    an empty dict when nothing was missing."""
    epoch = state.start_epoch - 1
    if (state.train_stats is None or output_dir is None or resume_path is None
            or resume_path.parent.resolve() != output_dir.resolve() or not log_lacks_epoch(output_dir, epoch)):
        return {}
    logger.info("%s has no record of epoch %d (its evaluation was cut short): redoing it", output_dir / "log.txt",
                epoch)
    return finish_epoch(epoch, state.train_stats, validation, evaluate_now=evaluation_due(epoch, eval_every, epochs),
                        n_parameters=n_parameters, output_dir=output_dir)


def signal_stop(stop: StopRequest, where: str, saved: Optional[Path]) -> TrainingStopped:
    """Log where a stop signal stopped training and how to continue; returns the exception to raise."""
    name = signal.Signals(stop.signum).name if stop.signum else "a stop signal to another process"
    outcome = ("nothing was saved (no --output_dir)" if saved is None else
               f"{saved} holds the run: to continue it, run the same command with --resume auto")
    if is_main_process():
        logger.warning("stopped by %s %s; %s", name, where, outcome)
    return TrainingStopped(stop.signum or signal.SIGTERM)


def stop_error(result: EpochResult, stop: StopRequest, epoch: int, where: str, saved: Optional[Path], *,
               clip_max_norm: float, amp: str, coco_path: str) -> Exception:
    """The exception that ends training after ``result`` stopped (``where``; ``saved``: the checkpoint)."""
    if result.stopped == "signal":
        return signal_stop(stop, where, saved)
    return nonfinite_error(result, epoch, saved, clip_max_norm=clip_max_norm, amp=amp, coco_path=coco_path)


def nonfinite_error(result: EpochResult, epoch: int, saved: Optional[Path], *, clip_max_norm: float, amp: str,
                    coco_path: str) -> NonFiniteLossError:
    """The error that ends training after ``result`` stopped for too many non-finite steps in a row."""
    if saved is None:
        kept = "nothing was saved (no --output_dir)"
    else:
        kept = (f"{saved} holds the weights and optimiser state of the last good step (--resume auto continues "
                "after the skipped batches)")
    tries = ["a lower --lr (a fresh run, or --finetune from the checkpoint: --resume keeps the checkpoint's "
             "learning rates)",
             "--clip_max_norm 0.1 (clipping is off)" if clip_max_norm == 0 else
             f"a lower --clip_max_norm (now {clip_max_norm:g})"]
    if amp != "off":
        tries.append(f"--amp off (now {amp})")
    tries.append(f"checking the data with: python tools/check_dataset.py --coco_path {coco_path}")
    return NonFiniteLossError(
        f"training stopped: {result.progress.nonfinite_streak} steps in a row had non-finite values and were "
        f"skipped, up to epoch {epoch}, iteration {result.progress.step - 1} (the last: {result.problem}); "
        f"{kept}. Try {'; '.join(tries)}.")


# ----------------------------------------------------------------------------------------------
# The main program


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train (or with ``--eval`` evaluate) as ``main.py`` describes; returns the last epoch's log record
    (``train_*``, ``test_*``, ``epoch``, ``n_parameters``), or the ``test_*`` stats with ``--eval``. Raises
    :class:`TrainingStopped` after a stop signal and :class:`NonFiniteLossError` (see the module docstring)."""
    ctx = init_distributed(args.device)
    setup_logging(ctx)
    try:
        with deterministic_algorithms(args.deterministic):
            return _run(args, ctx)
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


def _run(args: argparse.Namespace, ctx: DistContext) -> dict[str, Any]:
    device = resolve_device(args.device, ctx)
    if device.type == "cpu" and keep_freed_memory():
        logger.info("CPU run: freed memory is kept for reuse (faster; the process keeps its peak size)")
    seed_everything(args.seed + ctx.rank)
    logger.info("arguments: %s", vars(args))
    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir is not None and is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)

    resume_path = resolve_resume(args)
    # A resumed checkpoint replaces every weight: no need to fetch the backbone's ImageNet weights.
    model, criterion, postprocessors = build_model(args, load_backbone_weights=resume_path is None)
    model.to(device)
    criterion.to(device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("trainable parameters: %d", n_parameters)
    amp_dtype = AMP_DTYPES[args.amp]

    dataset_val = build_dataset("val", args)
    base_ds = get_coco_api_from_dataset(dataset_val)
    loader_val = build_data_loader(dataset_val, args, ctx, train=False, device=device)

    if args.eval:
        load_model_strict(model, load_checkpoint(resume_path), resume_path, args)
        test_stats, _ = evaluate(model, criterion, postprocessors, loader_val, base_ds, device, amp_dtype,
                                 args.log_every)
        logger.info("evaluation of %s: AP %.4f, AP50 %.4f, AP75 %.4f", resume_path,
                    *test_stats["coco_eval_bbox"][:3])
        return {f"test_{k}": v for k, v in test_stats.items()}

    if output_dir is not None and is_main_process():
        remove_unfinished_writes(output_dir)
    dataset_train = build_dataset("train", args)
    loader_train = build_data_loader(dataset_train, args, ctx, train=True, device=device)
    lr, lr_backbone = scaled_learning_rates(args, ctx.world_size)
    optimizer = build_optimizer(model, args, lr, lr_backbone)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    state = TrainState(args.start_epoch)
    if resume_path is not None:
        checkpoint = load_checkpoint(resume_path)
        load_model_strict(model, checkpoint, resume_path, args)
        state = restore_training_state(checkpoint, optimizer, lr_scheduler, scaler, args, ctx, resume_path)
        del checkpoint
    elif args.finetune:
        load_finetune_weights(model, load_checkpoint(args.finetune), args.finetune)

    model_without_ddp = model
    if ctx.distributed:
        model = wrap_distributed(model, criterion, dataset_train, args, device)
    if state.rng_state is not None:
        restore_rng_state(state.rng_state)

    validation = Validation(model, criterion, postprocessors, loader_val, base_ds, device, amp_dtype, args.log_every)
    start_time = time.time()
    progress = state.progress
    with StopRequest() as stop:
        log_stats = record_cut_short_epoch(state, resume_path, output_dir, validation, eval_every=args.eval_every,
                                           epochs=args.epochs, n_parameters=n_parameters)
        logger.info("training epochs %d to %d", state.start_epoch, args.epochs - 1)
        for epoch in range(state.start_epoch, args.epochs):
            loader_train.batch_sampler.set_epoch(epoch, progress.step)
            result = train_one_epoch(model, criterion, loader_train, optimizer, device, epoch, args.clip_max_norm,
                                     scaler, amp_dtype, args.log_every, progress=progress, stop=stop,
                                     max_nonfinite=args.max_nonfinite)
            if not result.complete:
                saved = None if output_dir is None else write_checkpoints(
                    model_without_ddp, optimizer, lr_scheduler, scaler, epoch, args, output_dir,
                    progress=result.progress)
                where = (f"in epoch {epoch} after {result.progress.step} of "
                         f"{loader_train.batch_sampler.batches_per_epoch()} iterations")
                raise stop_error(result, stop, epoch, where, saved, clip_max_norm=args.clip_max_norm, amp=args.amp,
                                 coco_path=args.coco_path)
            lr_scheduler.step()
            saved = None if output_dir is None else write_checkpoints(
                model_without_ddp, optimizer, lr_scheduler, scaler, epoch, args, output_dir, train_stats=result.stats)
            if result.stopped is not None:  # after the epoch's last step: resuming evaluates it
                raise stop_error(result, stop, epoch, f"after epoch {epoch}", saved, clip_max_norm=args.clip_max_norm,
                                 amp=args.amp, coco_path=args.coco_path)
            log_stats = finish_epoch(epoch, result.stats, validation, n_parameters=n_parameters,
                                     evaluate_now=evaluation_due(epoch, args.eval_every, args.epochs),
                                     output_dir=output_dir)
            progress = EpochProgress(nonfinite_streak=result.progress.nonfinite_streak)

    total_time = datetime.timedelta(seconds=int(time.time() - start_time))
    logger.info("training time %s", total_time)
    return log_stats

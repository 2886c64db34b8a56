"""The program behind ``main.py``: ``run(args)`` trains (or with ``--eval`` evaluates) as the flags say.

    run                   distribution, data, model, optimiser, checkpoints, the epochs, logs
    build_optimizer       the reference's three parameter groups under AdamW (or SGD)
    build_data_loader     seeded, resumable training order; sequential evaluation order
    wrap_distributed      DistributedDataParallel, with find_unused_parameters only when needed

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
import datetime
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from datasets import build_dataset, get_coco_api_from_dataset
from datasets.resumable import EpochBatchSampler, SeededSamples
from datasets.samplers import NodeShareSampler
from epochs import (
    Validation,
    evaluation_due,
    finish_epoch,
    record_cut_short_epoch,
    signal_stop,
    stop_error,
)
from engine import EvaluationStopped, evaluate, to_device, train_one_epoch, weighted_loss
from evaluation import evaluate_checkpoint
from models import build_model, load_weights_strict
from models.description import ModelDescription
from util.checkpoint import (
    EpochProgress,
    TrainState,
    load_checkpoint,
    load_finetune_weights,
    remove_unfinished_writes,
    resolve_resume,
    restore_training_state,
    write_checkpoints,
)
from util.ema import start_ema
from util.errors import InputError
from util.misc import any_process, collate_fn, is_main_process
from util.console import RunPace
from util.run_dir import CONSOLE_LOG, RunLock, claim_output_dir
from util.process import (
    DistContext,
    StopRequest,
    check_same_flags,
    console_copy,
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
from util.tensorboard import build_tensorboard

logger = logging.getLogger(__name__)

AMP_DTYPES: dict[str, Optional[torch.dtype]] = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}
REFERENCE_BATCH = 16  # --lr_scaling sqrt: the learning rates are the ones of a global batch of 16


# ----------------------------------------------------------------------------------------------
# Optimiser


def scaled_learning_rates(lr: float, lr_backbone: float, *, scaling: str, batch_size: int,
                          world_size: int) -> tuple[float, float]:
    """``(lr, lr_backbone)`` after ``--lr_scaling``: "sqrt" multiplies both by sqrt(global batch / 16), "none"
    keeps them."""
    if scaling == "none":
        return lr, lr_backbone
    global_batch = batch_size * world_size
    factor = math.sqrt(global_batch / REFERENCE_BATCH)
    logger.info("--lr_scaling sqrt: global batch %d = %d per process x %d processes; learning rates x %.4f "
                "(= sqrt(%d / %d)): lr %.4g -> %.4g, lr_backbone %.4g -> %.4g", global_batch, batch_size,
                world_size, factor, global_batch, REFERENCE_BATCH, lr, lr * factor, lr_backbone,
                lr_backbone * factor)
    return lr * factor, lr_backbone * factor


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

    Within a group the parameters follow the state dict's (the checkpoints') order, which is the reference's:
    an optimizer state written by the reference then resumes here. Only Swin differs from
    ``named_parameters()``: timm registers each patch merging in the next stage, the official Swin in its own.
    """
    groups: list[dict[str, Any]] = [{"params": [], "lr": lr}, {"params": [], "lr": lr_backbone},
                                    {"params": [], "lr": lr * args.lr_linear_proj_mult}]
    position: dict[int, int] = {}
    for index, tensor in enumerate(model.state_dict(keep_vars=True).values()):
        position.setdefault(id(tensor), index)
    for name, param in sorted(model.named_parameters(), key=lambda item: position[id(item[1])]):
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
    (sharded per process), every image kept. With ``--cache_mode`` each process draws only from the images it
    cached (``datasets.samplers.NodeShareSampler``)."""
    # Worker seeds come from this generator, not from the global stream that the model's dropout draws from.
    common = dict(collate_fn=collate_fn, num_workers=args.num_workers, pin_memory=device.type == "cuda",
                  worker_init_fn=ignore_stop_signals, generator=torch.Generator().manual_seed(args.seed))
    if args.cache_mode:  # each process draws from the images it cached (datasets/samplers.py)
        sampler = NodeShareSampler(len(dataset), world_size=ctx.world_size, rank=ctx.rank,
                                   local_size=ctx.local_size, shuffle=train, seed=args.seed)
    elif train:
        sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=args.seed)
    else:
        sampler = DistributedSampler(dataset, shuffle=False) if ctx.distributed else SequentialSampler(dataset)
    if not train:
        return DataLoader(dataset, args.batch_size, sampler=sampler, drop_last=False, **common)
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


def wrap_distributed(model: nn.Module, criterion: nn.Module, dataset, *, batch_size: int,
                     device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model``, with ``find_unused_parameters`` only when some trainable
    parameter gets no gradient (probed on every process, agreed by all)."""
    unused = probe_unused_parameters(model, criterion, dataset, batch_size, device)
    find_unused = any_process(bool(unused))
    if find_unused:
        logger.info("DDP: find_unused_parameters=True (%d trainable tensors get no gradient, e.g. %s)", len(unused),
                    unused[:4])
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused)


# ----------------------------------------------------------------------------------------------
# The main program


def run(args: argparse.Namespace, warnings: Sequence[str] = ()) -> dict[str, Any]:
    """Train (or with ``--eval`` evaluate) as ``main.py`` describes; returns the last epoch's log record
    (``train_*``, ``test_*``, with ``--ema_decay`` ``test_ema_*``, ``epoch``, ``n_parameters``), or the
    ``test_*`` stats with ``--eval`` (``test_ema_*`` with ``--eval_weights ema``). Raises
    :class:`TrainingStopped` after a stop signal and :class:`NonFiniteLossError` (``epochs.py``; see the module
    docstring). ``warnings`` (``main.start_warnings``) are logged once logging is set up, by rank 0."""
    ctx = init_distributed(args.device)
    setup_logging(ctx, args.log_level)
    for warning in warnings if ctx.rank == 0 else ():
        logger.warning("%s", warning)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(deterministic_algorithms(args.deterministic))
            return _run(args, ctx, stack)
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


def claim_output_dir_on_rank0(output_dir: Path, *, resume_from: Optional[Path], overwrite: bool) -> Optional[RunLock]:
    """``util.run_dir.claim_output_dir`` on rank 0; every process raises its error (the others a short one)."""
    lock, problem = None, None
    if is_main_process():
        try:
            lock = claim_output_dir(output_dir, resume_from=resume_from, overwrite=overwrite)
        except InputError as error:
            problem = error
    if any_process(problem is not None):
        raise problem or InputError(f"rank 0 could not use --output_dir {output_dir} (its log says why)")
    return lock


def dataset_categories(dataset) -> list[tuple[int, str]]:
    """``(id, name)`` of the dataset's categories, from its COCO annotation file."""
    return [(int(c["id"]), str(c.get("name", c["id"]))) for c in dataset.coco.dataset.get("categories", [])]


def write_run_config(path: Path, description: ModelDescription, args: argparse.Namespace) -> None:
    """``config.json``: the model description and every flag of the run (JSON values; others as strings)."""
    config = {"model_description": description.to_dict(), "flags": vars(args)}
    path.write_text(json.dumps(config, indent=1, default=str) + "\n")


def _run(args: argparse.Namespace, ctx: DistContext, stack: contextlib.ExitStack) -> dict[str, Any]:
    """``run`` in the process group ``ctx``; ``stack`` releases what it holds (the output folder's lock)."""
    device = resolve_device(args.device, ctx)
    if device.type == "cpu" and keep_freed_memory():
        logger.info("CPU run: freed memory is kept for reuse (faster; the process keeps its peak size)")
    check_same_flags(vars(args))
    seed_everything(args.seed + ctx.rank)
    output_dir = Path(args.output_dir) if args.output_dir and not args.eval else None
    resume_path = resolve_resume(args.resume, args.output_dir, eval_only=args.eval)
    if output_dir is not None:
        lock = claim_output_dir_on_rank0(output_dir, resume_from=resume_path, overwrite=args.overwrite)
        if lock is not None:
            stack.callback(lock.release)
            stack.enter_context(console_copy(output_dir / CONSOLE_LOG, ctx))
    # A resumed checkpoint replaces every weight: no need to fetch the backbone's ImageNet weights.
    model, criterion, postprocessors = build_model(args, load_backbone_weights=resume_path is None)
    model.to(device)
    criterion.to(device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("trainable parameters: %d", n_parameters)
    amp_dtype = AMP_DTYPES[args.amp]

    cache_share = (ctx.local_rank, ctx.local_size)
    dataset_val = build_dataset(args.eval_split if args.eval else "val", args, cache_share)
    base_ds = get_coco_api_from_dataset(dataset_val)
    loader_val = build_data_loader(dataset_val, args, ctx, train=False, device=device)
    description = ModelDescription.from_flags(vars(args), categories=dataset_categories(dataset_val))
    if output_dir is not None and is_main_process():
        write_run_config(output_dir / "config.json", description, args)
    logger.info("model: %s%s", description.summary(),
                f"; its description and every flag: {output_dir / 'config.json'}" if output_dir is not None else "")

    if args.eval:
        return evaluate_checkpoint(args, model, criterion, postprocessors, loader_val, base_ds, resume_path, device,
                                   amp_dtype, description=description)

    if output_dir is not None and is_main_process():
        remove_unfinished_writes(output_dir)
    dataset_train = build_dataset("train", args, cache_share)
    loader_train = build_data_loader(dataset_train, args, ctx, train=True, device=device)
    lr, lr_backbone = scaled_learning_rates(args.lr, args.lr_backbone, scaling=args.lr_scaling,
                                            batch_size=args.batch_size, world_size=ctx.world_size)
    optimizer = build_optimizer(model, args, lr, lr_backbone)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    state = TrainState(args.start_epoch)
    checkpoint = None
    if resume_path is not None:
        checkpoint = load_checkpoint(resume_path, trust=args.trust_checkpoint)
        load_weights_strict(model, checkpoint, resume_path, current_flags=vars(args),
                            built_as=f"--model {args.model}")
        state = restore_training_state(checkpoint, optimizer, lr_scheduler, scaler, start_epoch=args.start_epoch,
                                       lr_drop=args.lr_drop, batch_size=args.batch_size, ctx=ctx,
                                       source=resume_path)
    elif args.finetune:
        load_finetune_weights(model, load_checkpoint(args.finetune, trust=args.trust_checkpoint), args.finetune)
    # Of the unwrapped model, before DistributedDataParallel wraps it.
    ema = start_ema(model, args.ema_decay, checkpoint, resume_path)
    del checkpoint

    model_without_ddp = model
    if ctx.distributed:
        model = wrap_distributed(model, criterion, dataset_train, batch_size=args.batch_size, device=device)
    if state.rng_state is not None:
        restore_rng_state(state.rng_state)

    def save(epoch: int, **state) -> Optional[Path]:
        """Write the checkpoints of ``epoch`` (see write_checkpoints); None without --output_dir."""
        if output_dir is None:
            return None
        return write_checkpoints(model_without_ddp, optimizer, lr_scheduler, scaler, epoch, output_dir,
                                 run_args=args, lr_drop=args.lr_drop, keep_every=args.checkpoint_every,
                                 model_ema=None if ema is None else ema.state_dict(),
                                 model_description=description.to_dict(), **state)

    steps_done = state.start_epoch * loader_train.batch_sampler.batches_per_epoch() + state.progress.step
    drawn_names = description.class_names() if args.tensorboard_images else None
    tensorboard = build_tensorboard(args, output_dir, steps_done=steps_done,  # None without --tensorboard, off rank 0
                                    category_names=drawn_names)
    if tensorboard is not None:
        stack.callback(tensorboard.close)

    def to_tensorboard(record: Mapping[str, Any]) -> None:
        if tensorboard is not None and record:
            tensorboard.epoch(record, model=model_without_ddp, postprocessor=postprocessors["bbox"],
                              dataset_val=dataset_val, device=device)

    start_time = time.time()
    run_pace = RunPace(args.epochs * loader_train.batch_sampler.batches_per_epoch(), steps_at_start=steps_done)
    progress = state.progress
    with StopRequest() as stop:
        validation = Validation(model, criterion, postprocessors, loader_val, base_ds, device, amp_dtype,
                                args.log_every, stop, ema_model=None if ema is None else ema.module,
                                backend=args.eval_backend, per_class=args.per_class,
                                model_description=description.to_dict())
        try:
            log_stats = record_cut_short_epoch(state, resume_path, output_dir, validation,
                                               eval_every=args.eval_every, epochs=args.epochs,
                                               n_parameters=n_parameters)
        except EvaluationStopped:
            raise signal_stop(stop, f"during the evaluation of epoch {state.start_epoch - 1}", resume_path) from None
        to_tensorboard(log_stats)
        if resume_path is not None and state.start_epoch >= args.epochs and state.progress.step == 0:
            logger.info("%s is a finished run (%d epochs of %d): nothing to train; raise --epochs to train longer",
                        resume_path, state.start_epoch, args.epochs)
            return log_stats
        logger.info("training epochs %d to %d", state.start_epoch, args.epochs - 1)
        for epoch in range(state.start_epoch, args.epochs):
            loader_train.batch_sampler.set_epoch(epoch, progress.step)
            result = train_one_epoch(model, criterion, loader_train, optimizer, device, epoch, args.clip_max_norm,
                                     scaler, amp_dtype, args.log_every, progress=progress, stop=stop,
                                     max_nonfinite=args.max_nonfinite, ema=ema, run_pace=run_pace,
                                     on_report=tensorboard.step if tensorboard is not None else None)
            if not result.complete:
                saved = save(epoch, progress=result.progress)
                where = (f"in epoch {epoch} after {result.progress.step} of "
                         f"{loader_train.batch_sampler.batches_per_epoch()} iterations")
                raise stop_error(result, stop, epoch, where, saved, clip_max_norm=args.clip_max_norm, amp=args.amp,
                                 coco_path=args.coco_path)
            lr_scheduler.step()
            saved = save(epoch, train_stats=result.stats)
            if result.stopped is not None:  # after the epoch's last step: resuming evaluates it
                raise stop_error(result, stop, epoch, f"after epoch {epoch}", saved, clip_max_norm=args.clip_max_norm,
                                 amp=args.amp, coco_path=args.coco_path)
            try:
                log_stats = finish_epoch(epoch, result.stats, validation, n_parameters=n_parameters,
                                         evaluate_now=evaluation_due(epoch, args.eval_every, args.epochs),
                                         output_dir=output_dir)
            except EvaluationStopped:  # the checkpoint is written: resuming redoes the evaluation
                raise signal_stop(stop, f"during the evaluation after epoch {epoch}", saved) from None
            to_tensorboard(log_stats)
            progress = EpochProgress(nonfinite_streak=result.progress.nonfinite_streak)

    total_time = datetime.timedelta(seconds=int(time.time() - start_time))
    logger.info("training time %s", total_time)
    return log_stats

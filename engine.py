"""Training and evaluation loops and the main program (``run``) behind ``main.py``.

    train_one_epoch   one pass over the training data: weighted loss, backward, clipping, step
    evaluate          losses and COCO box AP on the validation data
    run               the whole program: distribution, data, model, optimiser, checkpoints, logs

Single process by default; under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK in the environment)
each process trains on its shard (NCCL on CUDA, gloo on CPU) and rank 0 alone logs and writes files.
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
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
)

from datasets import build_dataset, get_coco_api_from_dataset
from datasets.coco_eval import CocoEvaluator
from models import build_model
from util.checkpoint import (
    TrainState,
    load_checkpoint,
    load_finetune_weights,
    load_model_strict,
    resolve_resume,
    restore_training_state,
    write_checkpoints,
)
from util.logger import MetricLogger, SmoothedValue
from util.misc import collate_fn, comm_device, is_main_process, reduce_dict
from util.process import (
    DistContext,
    init_distributed,
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


def check_finite_loss(stats: Mapping[str, float], weight_dict: Mapping[str, float], *, epoch: int, step: int,
                      num_steps: int) -> None:
    """Raise ``RuntimeError`` naming the non-finite losses when the weighted total is not finite."""
    if math.isfinite(stats["loss"]):
        return
    bad = [f"{k}={stats[k + '_unscaled']}" for k in weight_dict if not math.isfinite(stats[k + "_unscaled"])]
    raise RuntimeError(
        f"non-finite training loss {stats['loss']} at epoch {epoch}, iteration {step} (batch {step + 1} of "
        f"{num_steps}); non-finite losses: {', '.join(bad) or 'none alone (their weighted sum overflowed)'}. "
        "Lower --lr, keep --clip_max_norm > 0, or try --amp off / bf16.")


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


def train_one_epoch(model: nn.Module, criterion: nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, clip_max_norm: float = 0.0,
                    scaler: Optional[torch.amp.GradScaler] = None, amp_dtype: Optional[torch.dtype] = None,
                    log_every: int = 50) -> dict[str, float]:
    """Train ``model`` for one pass over ``data_loader``.

    Each step: forward (under autocast with ``amp_dtype``), losses in float32, total =
    sum(loss * weight) over ``criterion.weight_dict``, backward (scaled when ``scaler`` is enabled),
    gradient clipping to ``clip_max_norm`` (0 disables), optimiser step. Raises ``RuntimeError`` on a
    non-finite total. Returns the epoch averages of ``loss``, every weighted loss, every
    ``*_unscaled`` criterion output, ``class_error``, ``lr`` (of the first parameter group) and ``grad_norm``
    (over the steps with finite gradients), plus with the fp16 scaler ``skipped_steps`` (a count).
    """
    model.train()
    criterion.train()
    use_scaler = scaler is not None and scaler.is_enabled()
    weight_dict = criterion.weight_dict
    metrics = MetricLogger()
    metrics.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    metrics.add_meter("class_error", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    metrics.add_meter("grad_norm", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    num_steps = len(data_loader)  # type: ignore[arg-type]
    skipped_steps = 0
    for step, (samples, targets) in enumerate(metrics.log_every(data_loader, log_every, f"Epoch: [{epoch}]")):
        samples, targets = to_device(samples, targets, device)
        with autocast(device, amp_dtype):
            outputs = model(samples)
        loss_dict = criterion(outputs_to_float32(outputs), targets)
        total = weighted_loss(loss_dict, weight_dict)
        step_stats = reduced_loss_stats(loss_dict, weight_dict)
        check_finite_loss(step_stats, weight_dict, epoch=epoch, step=step, num_steps=num_steps)

        optimizer.zero_grad(set_to_none=True)
        if use_scaler:
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)
        else:
            total.backward()
        grad_norm = grad_norm_and_clip(model.parameters(), clip_max_norm)
        if use_scaler:  # with non-finite gradients it skips the step and lowers its scale (alike on all processes)
            scaler.step(optimizer)
            scaler.update()
        elif math.isfinite(grad_norm):
            optimizer.step()
        else:
            raise RuntimeError(f"non-finite gradient norm at epoch {epoch}, iteration {step} (batch {step + 1} of "
                               f"{num_steps}) although the loss {step_stats['loss']:.4g} is finite; the step was "
                               "not applied. Lower --lr or keep --clip_max_norm > 0.")
        metrics.update(**step_stats, lr=optimizer.param_groups[0]["lr"])
        if math.isfinite(grad_norm):
            metrics.update(grad_norm=grad_norm)
        else:
            skipped_steps += 1
    metrics.synchronize_between_processes()
    logger.info("Epoch %d averaged stats: %s", epoch, metrics)
    stats = metrics.global_averages()
    if use_scaler:
        stats["skipped_steps"] = skipped_steps
        logger.info("Epoch %d: the fp16 gradient scaler skipped %d of %d steps", epoch, skipped_steps, num_steps)
    return stats


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
    for samples, targets in metrics.log_every(data_loader, log_every, "Test:"):
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
    """Training: random order (sharded per process), batches of ``--batch_size``, incomplete last batch
    dropped. Evaluation: sequential order (sharded per process), every image kept."""
    if ctx.distributed:
        sampler = DistributedSampler(dataset, shuffle=train, seed=args.seed)
    else:
        sampler = RandomSampler(dataset) if train else SequentialSampler(dataset)
    common = dict(collate_fn=collate_fn, num_workers=args.num_workers, pin_memory=device.type == "cuda")
    if not train:
        return DataLoader(dataset, args.batch_size, sampler=sampler, drop_last=False, **common)
    loader = DataLoader(dataset, batch_sampler=BatchSampler(sampler, args.batch_size, drop_last=True), **common)
    if len(loader) == 0:
        raise ValueError(f"the training set has {len(dataset)} images, fewer than one batch of {args.batch_size} "
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
# Checkpoints
# ----------------------------------------------------------------------------------------------
# The main program


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train (or with ``--eval`` evaluate) as ``main.py`` describes; returns the last epoch's log record
    (``train_*``, ``test_*``, ``epoch``, ``n_parameters``), or the ``test_*`` stats with ``--eval``."""
    ctx = init_distributed(args.device)
    setup_logging(ctx)
    try:
        return _run(args, ctx)
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


def _run(args: argparse.Namespace, ctx: DistContext) -> dict[str, Any]:
    device = resolve_device(args.device, ctx)
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

    logger.info("training epochs %d to %d", state.start_epoch, args.epochs - 1)
    start_time = time.time()
    log_stats: dict[str, Any] = {}
    for epoch in range(state.start_epoch, args.epochs):
        if isinstance(loader_train.batch_sampler.sampler, DistributedSampler):
            loader_train.batch_sampler.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(model, criterion, loader_train, optimizer, device, epoch, args.clip_max_norm,
                                      scaler, amp_dtype, args.log_every)
        lr_scheduler.step()
        if output_dir is not None:
            write_checkpoints(model_without_ddp, optimizer, lr_scheduler, scaler, epoch, args, output_dir)

        test_stats: dict[str, Any] = {}
        if (epoch + 1) % args.eval_every == 0 or epoch == args.epochs - 1:
            with preserved_rng_state():  # evaluation never shifts the training's random streams
                test_stats, _ = evaluate(model, criterion, postprocessors, loader_val, base_ds, device, amp_dtype,
                                         args.log_every)
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                     **{f"test_{k}": v for k, v in test_stats.items()},
                     "epoch": epoch, "n_parameters": n_parameters}
        if output_dir is not None and is_main_process():
            with (output_dir / "log.txt").open("a") as f:
                f.write(json.dumps(log_stats) + "\n")

    total_time = datetime.timedelta(seconds=int(time.time() - start_time))
    logger.info("training time %s", total_time)
    return log_stats

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
import os
import random
import re
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from datasets import build_dataset, get_coco_api_from_dataset
from datasets.coco_eval import CocoEvaluator
from models import build_model
from util.misc import (all_gather_object, collate_fn, get_world_size, is_dist_avail_and_initialized,
                       is_main_process, reduce_dict)

logger = logging.getLogger("engine")

AMP_DTYPES: dict[str, Optional[torch.dtype]] = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}
REFERENCE_BATCH = 16  # --lr_scaling sqrt: the learning rates are the ones of a global batch of 16
CHECKPOINT_EVERY = 5  # keep checkpoint{epoch:04}.pth every this many epochs (and before each lr drop)


# ----------------------------------------------------------------------------------------------
# Metric logging


def _comm_device() -> torch.device:
    """Device of the tensors that collectives of the current process group take."""
    if is_dist_avail_and_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class SmoothedValue:
    """A series of numbers: window statistics (median, avg, max, last value) and the global average."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})"):
        self.window: deque[float] = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value: float, n: int = 1) -> None:
        self.window.append(float(value))
        self.count += n
        self.total += float(value) * n

    def synchronize_between_processes(self) -> None:
        """Sum count and total over processes (the window stays local)."""
        if get_world_size() < 2:
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), float(t[1].item())

    @property
    def median(self) -> float:
        return float(np.median(self.window)) if self.window else math.nan

    @property
    def avg(self) -> float:
        return float(np.mean(self.window)) if self.window else math.nan

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else math.nan

    @property
    def max(self) -> float:
        return max(self.window) if self.window else math.nan

    @property
    def value(self) -> float:
        return self.window[-1] if self.window else math.nan

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max,
                               value=self.value)


class MetricLogger:
    """Named :class:`SmoothedValue` meters, plus :meth:`log_every`, which wraps an iterable and logs
    progress, ETA and the meters every N iterations through :mod:`logging`."""

    def __init__(self, delimiter: str = "  ", log: logging.Logger = logger):
        self.meters: dict[str, SmoothedValue] = {}
        self.delimiter = delimiter
        self.log = log

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def update(self, **values: float | Tensor) -> None:
        for name, value in values.items():
            if isinstance(value, Tensor):
                value = value.item()
            self.meters.setdefault(name, SmoothedValue()).update(float(value))

    def synchronize_between_processes(self) -> None:
        for name in sorted(self.meters):  # the same order on every process
            self.meters[name].synchronize_between_processes()

    def global_averages(self) -> dict[str, float]:
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def log_every(self, iterable: Iterable, every: int, header: str = "") -> Iterator:
        """Yield the items of ``iterable`` (which needs ``len``), logging after items 0, every, 2*every, ...
        and the last one, then the total time."""
        total = len(iterable)  # type: ignore[arg-type]
        width = len(str(total))
        iter_time, data_time = SmoothedValue(fmt="{avg:.4f}"), SmoothedValue(fmt="{avg:.4f}")
        start = end = time.perf_counter()
        for i, item in enumerate(iterable):
            data_time.update(time.perf_counter() - end)
            yield item
            iter_time.update(time.perf_counter() - end)
            if i % every == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                parts = [header, f"[{i:{width}d}/{total}]", f"eta: {eta}", str(self),
                         f"time: {iter_time}", f"data: {data_time}"]
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
                self.log.info("%s", self.delimiter.join(p for p in parts if p))
            end = time.perf_counter()
        elapsed = time.perf_counter() - start
        self.log.info("%s total time: %s (%.4f s / it)", header, datetime.timedelta(seconds=int(elapsed)),
                      elapsed / max(total, 1))


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


@dataclass
class DistContext:
    """Where this process stands: rank, world size, local rank; ``owns_group`` when run() started the group."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str) -> DistContext:
    """Join the process group described by torchrun's RANK / WORLD_SIZE / LOCAL_RANK (NCCL for CUDA,
    gloo for CPU); a single process when they are absent or WORLD_SIZE is 1."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistContext()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world_size < 2:
        return DistContext(rank, world_size, local_rank)
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank)
    use_cuda = device_name.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
    return DistContext(rank, world_size, local_rank, owns_group=True)


def setup_logging(ctx: DistContext) -> None:
    """Root logging for the run: INFO on rank 0, WARNING elsewhere (a no-op where logging is configured)."""
    prefix = f"[rank {ctx.rank}] " if ctx.distributed else ""
    logging.basicConfig(level=logging.INFO if ctx.rank == 0 else logging.WARNING,
                        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s")


def resolve_device(device_name: str, ctx: DistContext) -> torch.device:
    """``torch.device`` of ``--device``; in a distributed CUDA run, the GPU of this process's local rank."""
    device = torch.device(device_name)
    if device.type == "cuda" and ctx.distributed:
        device = torch.device("cuda", ctx.local_rank)
    return device


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """The state of every random generator the training reads (torch CPU/CUDA, numpy, random)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Run the block without disturbing the random streams of training (evaluation, probes)."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


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


def set_lr_drop(lr_scheduler: torch.optim.lr_scheduler.StepLR, lr_drop: int) -> None:
    """Make a (resumed) StepLR drop every ``lr_drop`` epochs and set the current rates accordingly."""
    if lr_scheduler.step_size == lr_drop:
        return
    logger.warning("the checkpoint's schedule dropped the learning rates every %d epochs; --lr_drop %d now applies",
                   lr_scheduler.step_size, lr_drop)
    lr_scheduler.step_size = lr_drop
    factor = lr_scheduler.gamma ** (lr_scheduler.last_epoch // lr_drop)
    for group, base_lr in zip(lr_scheduler.optimizer.param_groups, lr_scheduler.base_lrs):
        group["lr"] = base_lr * factor
    lr_scheduler._last_lr = [group["lr"] for group in lr_scheduler.optimizer.param_groups]


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
    flag = torch.tensor([float(bool(unused))], device=_comm_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    find_unused = bool(flag.item())
    if find_unused:
        logger.info("DDP: find_unused_parameters=True (%d trainable tensors get no gradient, e.g. %s)", len(unused),
                    unused[:4])
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused)


# ----------------------------------------------------------------------------------------------
# Checkpoints

# Flags that change the model's tensors; compared with a checkpoint's args when its weights do not fit.
ARCHITECTURE_FLAGS = (
    "model", "backbone", "dilation", "num_feature_levels", "hidden_dim", "dim_feedforward", "nheads", "enc_layers",
    "dec_layers", "num_queries", "enc_n_points", "dec_n_points", "num_classes", "with_box_refine", "two_stage",
    "eff_query_init", "eff_specific_head", "rho", "use_enc_aux_loss", "position_embedding", "pre_norm",
)
# (key pattern, likely cause) for weights that are missing, unexpected or of another shape.
KEY_HINTS = (
    (r"transformer\.decoder\.bbox_embed", "--with_box_refine differs"),
    (r"enc_output|pos_trans|^query_embed|transformer\.reference_points", "--two_stage differs"),
    (r"enc_mask_predictor", "--rho differs (Sparse DETR's scoring network exists with --rho > 0 only)"),
    (r"transformer\.encoder\.(class|bbox)_embed", "--use_enc_aux_loss differs"),
    (r"transformer\.encoder\.layers\.\d+", "--enc_layers differs"),
    (r"transformer\.decoder\.layers\.\d+", "--dec_layers differs"),
    (r"input_proj|level_embed", "--num_feature_levels differs"),
    (r"backbone\.0\.body", "--backbone / --dilation differs"),
    (r"class_embed", "--num_classes or the number of heads (--dec_layers, --two_stage, --use_enc_aux_loss) differs"),
    (r"query_embed|tgt_embed", "--num_queries or --hidden_dim differs"),
)


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's weights do not fit the model built from the current flags."""


def save_checkpoint(obj: Mapping[str, Any], path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically: a temporary file in the same folder, fsync'ed, then renamed over
    ``path``; a failure leaves ``path`` as it was and no temporary file behind."""
    path = Path(path)
    tmp_name = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp_name, "xb") as f:  # the usual permissions (mkstemp's would be 0600)
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def checkpoint_paths(output_dir: Path, epoch: int, lr_drop: int) -> list[Path]:
    """``checkpoint.pth``, plus ``checkpoint{epoch:04}.pth`` every 5 epochs and before each lr drop."""
    paths = [output_dir / "checkpoint.pth"]
    if (epoch + 1) % CHECKPOINT_EVERY == 0 or (epoch + 1) % lr_drop == 0:
        paths.append(output_dir / f"checkpoint{epoch:04}.pth")
    return paths


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU (ours or an official one: a dict with at least ``model``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # The reference's checkpoints pickle argparse.Namespace, which weights_only loading refuses.
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(checkpoint, Mapping) and "model" not in checkpoint and checkpoint and all(
            isinstance(v, Tensor) for v in checkpoint.values()):
        checkpoint = {"model": dict(checkpoint)}  # a bare state dict
    if not isinstance(checkpoint, Mapping) or "model" not in checkpoint:
        raise ValueError(f"{path} is not a checkpoint: expected a dict with the model's state dict under 'model'")
    return dict(checkpoint)


def _strip_ddp_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop the ``module.`` prefix of a state dict saved from a DistributedDataParallel wrapper."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _likely_causes(keys: Iterable[str], checkpoint_args: Any, args: argparse.Namespace) -> list[str]:
    """Human-readable guesses of why ``keys`` do not fit: differing architecture flags, else key patterns."""
    causes = []
    if checkpoint_args is not None:
        saved = vars(checkpoint_args) if isinstance(checkpoint_args, argparse.Namespace) else dict(checkpoint_args)
        for flag in ARCHITECTURE_FLAGS:
            if flag in saved and hasattr(args, flag) and saved[flag] != getattr(args, flag):
                causes.append(f"--{flag} is {saved[flag]!r} in the checkpoint but {getattr(args, flag)!r} now")
    if not causes:
        keys = list(keys)
        causes = list(dict.fromkeys(hint for pattern, hint in KEY_HINTS
                                    if any(re.search(pattern, k) for k in keys)))
    return causes


def load_model_strict(model: nn.Module, checkpoint: Mapping[str, Any], source: str | Path,
                      args: argparse.Namespace) -> None:
    """Load ``checkpoint["model"]`` into ``model``, requiring the exact same tensors; otherwise raise
    :class:`CheckpointMismatchError` listing the missing, unexpected and reshaped tensors and the
    likely cause (usually a checkpoint of another variant or ``--num_classes``)."""
    state_dict = _strip_ddp_prefix(checkpoint["model"])
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    reshaped = [f"{k}: {tuple(state_dict[k].shape)} in the checkpoint, {tuple(own[k].shape)} in the model"
                for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        def listing(title: str, items: list[str]) -> str:
            shown = "\n    ".join(items[:12]) + (f"\n    ... ({len(items) - 12} more)" if len(items) > 12 else "")
            return f"\n  {title} ({len(items)}):\n    {shown}" if items else ""

        bad_keys = missing + unexpected + [r.split(":")[0] for r in reshaped]
        causes = _likely_causes(bad_keys, checkpoint.get("args"), args)
        raise CheckpointMismatchError(
            f"the weights of {source} do not fit the model built from the current flags (--model {args.model})."
            + listing("missing from the checkpoint", missing) + listing("unexpected in the checkpoint", unexpected)
            + listing("of another shape", reshaped)
            + "\n  likely cause: " + ("; ".join(causes) if causes else "a checkpoint of another model or variant")
            + ".\n  Use the flags the checkpoint was trained with (e.g. the variant's configs/*.sh), or --finetune "
              "to load only the tensors that fit.")
    model.load_state_dict(state_dict, strict=True)
    logger.info("loaded the weights of %s", source)


def load_finetune_weights(model: nn.Module, checkpoint: Mapping[str, Any], source: str | Path) -> None:
    """Load the weights of ``checkpoint`` that fit ``model``; tensors of another shape (e.g. class heads of
    another ``--num_classes``) and missing / unexpected ones are skipped with a log message."""
    state_dict = _strip_ddp_prefix(checkpoint["model"])
    own = model.state_dict()
    reshaped = [k for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    for key in reshaped:
        logger.info("--finetune: skipping %s: shape %s in %s, %s in the model", key, tuple(state_dict[key].shape),
                    source, tuple(own[key].shape))
    missing, unexpected = model.load_state_dict({k: v for k, v in state_dict.items() if k not in reshaped},
                                                strict=False)
    if missing:
        logger.info("--finetune: %d tensors keep their initialisation (not in %s), e.g. %s", len(missing), source,
                    missing[:5])
    if unexpected:
        logger.info("--finetune: %d tensors of %s have no place in the model, e.g. %s", len(unexpected), source,
                    unexpected[:5])
    logger.info("--finetune: initialised from %s (%d tensors skipped for their shape)", source, len(reshaped))


def resolve_resume(args: argparse.Namespace) -> Optional[Path]:
    """The checkpoint to resume from: ``--resume PATH``, or with ``--resume auto`` the output folder's
    ``checkpoint.pth`` when present (None, to start fresh, otherwise)."""
    if not args.resume:
        return None
    if args.resume != "auto":
        return Path(args.resume)
    candidate = Path(args.output_dir) / "checkpoint.pth"
    if candidate.is_file():
        logger.info("--resume auto: resuming from %s", candidate)
        return candidate
    if args.eval:
        raise FileNotFoundError(f"--eval --resume auto: no checkpoint at {candidate}")
    logger.info("--resume auto: no checkpoint at %s, starting a fresh run", candidate)
    return None


@dataclass
class TrainState:
    """What a checkpoint restores besides the weights."""
    start_epoch: int
    rng_state: Optional[dict[str, Any]] = None


def restore_training_state(checkpoint: Mapping[str, Any], optimizer: torch.optim.Optimizer,
                           lr_scheduler: torch.optim.lr_scheduler.StepLR, scaler: torch.amp.GradScaler,
                           args: argparse.Namespace, ctx: DistContext, source: str | Path) -> TrainState:
    """Restore optimiser, schedule, gradient scaler and this process's random state; training goes on at the
    epoch after the checkpoint's. A weights-only checkpoint (e.g. an official one) starts at --start_epoch."""
    if not all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch")):
        logger.warning("%s holds no optimizer / lr_scheduler / epoch: only its weights are used, training starts "
                       "at epoch %d", source, args.start_epoch)
        return TrainState(args.start_epoch)
    optimizer.load_state_dict(checkpoint["optimizer"])
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    set_lr_drop(lr_scheduler, args.lr_drop)
    if scaler.is_enabled() and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    rng_states = checkpoint.get("rng_state")
    rng_state = None
    if rng_states is not None and len(rng_states) == ctx.world_size:
        rng_state = rng_states[ctx.rank]
    elif rng_states is not None:
        logger.warning("%s was written by %d processes, this run has %d: random streams are not restored", source,
                       len(rng_states), ctx.world_size)
    start_epoch = int(checkpoint["epoch"]) + 1
    logger.info("resumed %s: training continues at epoch %d", source, start_epoch)
    return TrainState(start_epoch, rng_state)


def write_checkpoints(model: nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler, scaler, epoch: int,
                      args: argparse.Namespace, output_dir: Path) -> None:
    """Save the end-of-epoch checkpoint(s) from rank 0 (every process must call it: it gathers their
    random states)."""
    rng_states = all_gather_object(capture_rng_state())
    if not is_main_process():
        return
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "epoch": epoch,
        "args": args,
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "rng_state": rng_states,
    }
    for path in checkpoint_paths(output_dir, epoch, args.lr_drop):
        save_checkpoint(checkpoint, path)


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

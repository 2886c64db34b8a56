"""Checkpoints: atomic writes, strict and fine-tuning loads, resuming the full training state."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from util.errors import InputError
from util.misc import all_gather_object, is_main_process
from util.process import DistContext, capture_rng_state

logger = logging.getLogger("engine")

CHECKPOINT_EVERY = 5  # keep checkpoint{epoch:04}.pth every this many epochs (and before each lr drop)


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


class CheckpointMismatchError(InputError, RuntimeError):
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
    try:
        # The reference's checkpoints pickle argparse.Namespace, which weights_only loading refuses.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - whatever a damaged file makes the unpickler raise
        raise unreadable_checkpoint_error(path, error) from error
    if isinstance(checkpoint, Mapping) and "model" not in checkpoint and checkpoint and all(
            isinstance(v, Tensor) for v in checkpoint.values()):
        checkpoint = {"model": dict(checkpoint)}  # a bare state dict
    if not isinstance(checkpoint, Mapping) or "model" not in checkpoint:
        raise InputError(f"{path} is not a checkpoint: expected a dict with the model's state dict under 'model'")
    return dict(checkpoint)


def unreadable_checkpoint_error(path: Path, error: Exception) -> InputError:
    """The error for a checkpoint file that torch.load cannot read, naming another checkpoint of the run."""
    others = [p for p in sorted(path.parent.glob("checkpoint[0-9][0-9][0-9][0-9].pth")) if p != path]
    fix = (f"Resume from another checkpoint of the run instead, e.g. --resume {others[-1]}" if others else
           "Restore it from a copy, or train from the start without --resume (there is no "
           "checkpoint{epoch:04}.pth next to it to fall back on)")
    reason = (str(error).strip().splitlines() or [""])[0].split(". ")[0]  # torch's first sentence says it
    return InputError(f"{path} cannot be read: the file is truncated or corrupt ({type(error).__name__}: {reason}). "
                      f"{fix}.")


def remove_unfinished_writes(output_dir: Path) -> None:
    """Delete the temporary files of checkpoint writes that a killed process left in ``output_dir`` (call it
    before this run writes any)."""
    for path in sorted(output_dir.glob(".*.pth.*.tmp")):
        logger.info("removing %s, the unfinished write of an interrupted run", path)
        path.unlink(missing_ok=True)


def strip_ddp_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
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
    state_dict = strip_ddp_prefix(checkpoint["model"])
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
    state_dict = strip_ddp_prefix(checkpoint["model"])
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
class EpochProgress:
    """How far an epoch got: ``step`` batches done, the running ``(total, count)`` of each logged average,
    the steps the fp16 gradient scaler skipped, and the steps skipped for a non-finite loss or gradient norm
    (in all, and in a row until now). A mid-epoch checkpoint holds it as a dict under ``progress``."""
    step: int = 0
    totals: dict[str, tuple[float, int]] = field(default_factory=dict)
    scaler_skipped: int = 0
    nonfinite: int = 0
    nonfinite_streak: int = 0


@dataclass
class TrainState:
    """What a checkpoint restores besides the weights: where training continues (epoch, and ``progress`` in it),
    this process's random state, and after an end-of-epoch checkpoint that epoch's ``train_stats`` (its log
    record is written from them when the evaluation that follows the checkpoint was cut short)."""
    start_epoch: int
    rng_state: Optional[dict[str, Any]] = None
    progress: EpochProgress = field(default_factory=EpochProgress)
    train_stats: Optional[dict[str, Any]] = None


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


def restore_training_state(checkpoint: Mapping[str, Any], optimizer: torch.optim.Optimizer,
                           lr_scheduler: torch.optim.lr_scheduler.StepLR, scaler: torch.amp.GradScaler,
                           args: argparse.Namespace, ctx: DistContext, source: str | Path) -> TrainState:
    """Restore optimiser, schedule, gradient scaler and this process's random state; training goes on where
    the checkpoint stopped: the next epoch, or within its epoch for a mid-epoch checkpoint. A weights-only
    checkpoint (e.g. an official one) starts at --start_epoch."""
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
    if checkpoint.get("progress") is None:
        start_epoch = int(checkpoint["epoch"]) + 1
        logger.info("resumed %s: training continues at epoch %d", source, start_epoch)
        return TrainState(start_epoch, rng_state, train_stats=checkpoint.get("train_stats"))
    progress = EpochProgress(**checkpoint["progress"])
    # A step is a global batch: with another batch size or process count, continue after as many images.
    then = getattr(checkpoint.get("args"), "batch_size", args.batch_size) * len(rng_states)
    now = args.batch_size * ctx.world_size
    if then != now:
        logger.warning("%s stopped epoch %d after %d global batches of %d images; with %d images per global batch "
                       "now, it continues at batch %d (in another image order)", source, checkpoint["epoch"],
                       progress.step, then, now, progress.step * then // now)
        progress.step = progress.step * then // now
    logger.info("resumed %s: training continues at epoch %d, iteration %d", source, checkpoint["epoch"],
                progress.step)
    return TrainState(int(checkpoint["epoch"]), rng_state, progress)


def write_checkpoints(model: nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler, scaler, epoch: int,
                      args: argparse.Namespace, output_dir: Path, *, progress: Optional[EpochProgress] = None,
                      train_stats: Optional[Mapping[str, Any]] = None) -> Path:
    """Save from rank 0, and return the path of, checkpoint.pth (every process must call it: it gathers their
    random states): with ``progress``, that of epoch ``epoch`` stopped midway; otherwise that of the finished
    epoch (with its ``train_stats``), plus checkpoint{epoch:04}.pth when due."""
    rng_states = all_gather_object(capture_rng_state())
    latest = output_dir / "checkpoint.pth"
    if not is_main_process():
        return latest
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "epoch": epoch,
        "args": args,
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "rng_state": rng_states,
        "progress": None if progress is None else asdict(progress),
        "train_stats": None if train_stats is None else dict(train_stats),
    }
    paths = [latest] if progress is not None else checkpoint_paths(output_dir, epoch, args.lr_drop)
    # checkpoint.pth last: a kill between two writes then redoes the epoch rather than lose checkpoint{epoch:04}.pth.
    for path in reversed(paths):
        save_checkpoint(checkpoint, path)
    return latest

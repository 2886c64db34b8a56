"""Checkpoints: atomic writes, strict and fine-tuning loads, resuming the full training state."""
from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import pickle
import re
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from util.checkpoint_checks import check_checkpoint_contents, check_optimizer_groups, check_zip_sizes
from util.errors import InputError
from util.misc import all_gather_object, is_main_process
from util.process import DistContext, capture_rng_state

logger = logging.getLogger(__name__)


class CheckpointMismatchError(InputError, RuntimeError):
    """The checkpoint's weights do not fit the model built from the current flags."""


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested checkpoint object (about its size on disk)."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(obj: Mapping[str, Any], path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically: a temporary file in the same folder, fsync'ed, then renamed over
    ``path``; a failure leaves ``path`` as it was and no temporary file behind. A full disk raises InputError
    naming the folder and the size needed."""
    path = Path(path)
    tmp_name = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp_name, "xb") as f:  # the usual permissions (mkstemp's would be 0600)
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException as error:
        with contextlib.suppress(OSError):  # the clean-up never adds a second error
            os.unlink(tmp_name)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = f"{path.name} there is intact" if path.exists() else f"no earlier {path.name} is there"
            raise InputError(f"no space left in {path.parent} to write {path.name} (it needs about "
                             f"{tensor_bytes(obj) / 2**20:.0f} MiB); {kept}. Free space there or choose another "
                             "--output_dir, then resume with --resume") from None
        raise


def checkpoint_paths(output_dir: Path, epoch: int, lr_drop: int, keep_every: int) -> list[Path]:
    """``checkpoint.pth``, plus ``checkpoint{epoch:04}.pth`` every ``keep_every`` epochs and before each lr drop
    (the references: every 5 epochs in Deformable DETR, every 100 in DETR)."""
    paths = [output_dir / "checkpoint.pth"]
    if (epoch + 1) % keep_every == 0 or (epoch + 1) % lr_drop == 0:
        paths.append(output_dir / f"checkpoint{epoch:04}.pth")
    return paths


def _numpy_pickle_globals() -> list:
    """What numpy arrays, dtypes and scalars (e.g. numpy's random state) pickle as, under numpy 2's module
    names and numpy 1's (checkpoints written by older installs name ``numpy.core``)."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    names = [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar,
             (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
             (multiarray.scalar, "numpy.core.multiarray.scalar")]
    names += [type(np.dtype(code)) for code in ("uint32", "int64", "float64", "float32", "bool")]
    return names


# Besides tensors and plain containers, what our checkpoints and the official ones hold: the run's flags
# (argparse.Namespace, as the references save them) and the numpy random state.
CHECKPOINT_GLOBALS = [argparse.Namespace, *_numpy_pickle_globals()]


class UntrustedCheckpointError(InputError):
    """A file holds pickled objects beyond weights and settings: loading it could run code."""


def torch_load(path: Path, *, trust: bool = False, mmap: bool = False) -> Any:
    """``torch.load`` of ``path`` on the CPU that runs no code from the file: only tensors, plain Python values
    and :data:`CHECKPOINT_GLOBALS` are unpickled (``weights_only``). Anything else raises
    :class:`UntrustedCheckpointError`; ``trust=True`` (``--trust_checkpoint``) loads it anyway, with a warning."""
    check_zip_sizes(path)
    if trust:
        logger.warning("--trust_checkpoint: unpickling %s without restriction; a checkpoint file can carry code "
                       "that runs as it loads, so use this only for files from a source you trust", path)
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if found is None:
            raise
        raise UntrustedCheckpointError(
            f"{path} was refused: it holds a pickled {found.group(1)!r}, which is neither weights nor settings, and "
            "unpickling it could run code the file carries. If you trust where the file comes from, pass "
            "--trust_checkpoint (tools/predict.py takes it too).") from None


def load_checkpoint(path: str | Path, *, trust: bool = False) -> dict[str, Any]:
    """Read a checkpoint on the CPU (ours or an official one: a dict with at least ``model``) with
    :func:`torch_load`."""
    path = Path(path)
    if not path.is_file():
        hint = " (a folder: name the .pth file in it)" if path.is_dir() else ""
        raise FileNotFoundError(f"checkpoint not found: {path}{hint}")
    try:
        checkpoint = torch_load(path, trust=trust)
    except InputError:  # refused (untrusted pickle, implausible sizes), not damaged
        raise
    except Exception as error:  # noqa: BLE001 - whatever a damaged file makes the unpickler raise
        raise unreadable_checkpoint_error(path, error) from error
    if isinstance(checkpoint, Mapping) and "model" not in checkpoint and checkpoint and all(
            isinstance(v, Tensor) for v in checkpoint.values()):
        checkpoint = {"model": dict(checkpoint)}  # a bare state dict
    if not isinstance(checkpoint, Mapping) or "model" not in checkpoint:
        raise InputError(f"{path} is not a checkpoint: expected a dict with the model's state dict under 'model'")
    check_checkpoint_contents(checkpoint, path)
    return dict(checkpoint)


def read_checkpoint_entries(path: str | Path, keys: Sequence[str], *, trust: bool = False) -> dict[str, Any]:
    """The entries ``keys`` of a checkpoint file (None where absent), with its tensors memory-mapped rather than
    read (files of the zip format, every torch >= 1.6 writes); other files are read whole by
    :func:`load_checkpoint`, whose errors this raises."""
    try:
        checkpoint = torch_load(Path(path), trust=trust, mmap=True)
    except UntrustedCheckpointError:
        raise
    except Exception:  # noqa: BLE001 - an old format, a damaged file: the full read says what is wrong
        checkpoint = load_checkpoint(path, trust=trust)
    if not isinstance(checkpoint, Mapping):
        checkpoint = load_checkpoint(path, trust=trust)  # raises its "not a checkpoint" error
    return {key: checkpoint.get(key) for key in keys}


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


def model_state(checkpoint: Mapping[str, Any], weights: str = "raw", *, source: str | Path = "the checkpoint",
                flag: str = "--weights") -> dict[str, Tensor]:
    """The state dict of ``checkpoint`` to load: its trained weights (``weights="raw"``, ``model``) or their
    moving average (``"ema"``, ``model_ema``, written by runs with ``--ema_decay``; same keys). Raises InputError
    when the checkpoint holds no average (e.g. an official checkpoint) or ``weights`` is neither; ``flag`` is the
    caller's option that chooses (``--weights`` in the tools, ``--eval_weights`` in main.py), named in the error."""
    if weights not in ("raw", "ema"):
        raise InputError(f"weights={weights!r}: choose raw (the trained weights) or ema (their moving average)")
    if weights == "raw":
        return checkpoint["model"]
    if checkpoint.get("model_ema") is None:
        raise InputError(f"{source} holds no moving average of the weights (no 'model_ema': the run was trained "
                         f"without --ema_decay, or it is an official checkpoint); use its raw weights ({flag} raw)")
    return checkpoint["model_ema"]


def strip_ddp_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop the ``module.`` prefix of a state dict saved from a DistributedDataParallel wrapper."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


# Buffers that FLOP counters (thop, ptflops) register on every module and that some released checkpoints
# carry; the reference skips them when it loads.
COUNTER_SUFFIXES = ("total_ops", "total_params")


def drop_counter_entries(state_dict: dict[str, Tensor], own: Mapping[str, Tensor], source: str | Path
                         ) -> dict[str, Tensor]:
    """``state_dict`` without the FLOP counters' entries that the model lacks, with one log line naming them."""
    counters = [k for k in state_dict if k.rsplit(".", 1)[-1] in COUNTER_SUFFIXES and k not in own]
    if counters:
        logger.info("%s: skipped %d entries written by a FLOP counter, not weights (e.g. %s)", source, len(counters),
                    ", ".join(counters[:3]))
    return {k: v for k, v in state_dict.items() if k not in counters}


def load_model_strict(model: nn.Module, checkpoint: Mapping[str, Any], source: str | Path, *,
                      explain: Optional[Callable[[list[str]], list[str]]] = None, built_as: str = "") -> None:
    """Load ``checkpoint["model"]`` into ``model``, requiring the exact same tensors; otherwise raise
    :class:`CheckpointMismatchError` listing the missing, unexpected and reshaped tensors and the
    likely cause (usually a checkpoint of another variant or ``--num_classes``).

    ``explain(bad keys)`` gives those causes (see
    ``models.checkpoint_mismatch_causes``); ``built_as`` names how the model was built (e.g. "--model detr")."""
    state_dict = drop_counter_entries(strip_ddp_prefix(checkpoint["model"]), model.state_dict(), source)
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
        causes = explain(bad_keys) if explain is not None else []
        raise CheckpointMismatchError(
            f"the weights of {source} do not fit the model built from the current flags"
            + (f" ({built_as})." if built_as else ".")
            + listing("missing from the checkpoint", missing) + listing("unexpected in the checkpoint", unexpected)
            + listing("of another shape", reshaped)
            + "\n  likely cause: " + ("; ".join(causes) if causes else "a checkpoint of another model or variant")
            + ".\n  Use the flags the checkpoint was trained with (e.g. the variant's configs/*.sh), or --finetune "
              "to load only the tensors that fit.")
    model.load_state_dict(state_dict, strict=True)
    logger.info("loaded the weights of %s", source)


def load_finetune_weights(model: nn.Module, checkpoint: Mapping[str, Any], source: str | Path) -> None:
    """Load the weights of ``checkpoint`` that fit ``model``; tensors of another shape (e.g. class heads of
    another ``--num_classes``) and missing / unexpected ones are skipped with a log message. Raises InputError,
    loading nothing, when fewer than half of the model's tensors would load (e.g. a backbone-only file)."""
    own = model.state_dict()
    state_dict = drop_counter_entries(strip_ddp_prefix(checkpoint["model"]), own, source)
    reshaped = [k for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    fitting = {k: v for k, v in state_dict.items() if k in own and k not in reshaped}
    if 2 * len(fitting) < len(own):
        found = [k for k in state_dict if k not in fitting][:3]
        raise InputError(f"--finetune {source}: only {len(fitting)} of the model's {len(own)} tensors are in it with "
                         f"their shape, so it would initialise almost nothing. The model expects keys like "
                         f"{list(own)[:3]}; the file holds keys like {found or list(state_dict)[:3]}. Is it a "
                         "checkpoint of this model family (not a backbone-only file: that is --backbone_weights)?")
    for key in reshaped:
        logger.info("--finetune: skipping %s: shape %s in %s, %s in the model", key, tuple(state_dict[key].shape),
                    source, tuple(own[key].shape))
    missing, unexpected = model.load_state_dict(fitting, strict=False)
    unexpected = [k for k in state_dict if k not in own]
    if missing:
        logger.info("--finetune: %d tensors keep their initialisation (not in %s), e.g. %s", len(missing), source,
                    missing[:5])
    if unexpected:
        logger.info("--finetune: %d tensors of %s have no place in the model, e.g. %s", len(unexpected), source,
                    unexpected[:5])
    logger.info("--finetune: initialised %d of the model's %d tensors from %s (%d skipped for their shape, %d not "
                "in the file)", len(fitting), len(own), source, len(reshaped), len(missing))


def newest_checkpoint(output_dir: Path) -> Optional[Path]:
    """``output_dir/checkpoint.pth`` when present, else the numbered ``checkpoint{epoch:04}.pth`` of the latest
    epoch (e.g. a folder whose checkpoint.pth was lost or moved), else None."""
    latest = output_dir / "checkpoint.pth"
    if latest.is_file():
        return latest
    numbered = sorted(p for p in output_dir.glob("checkpoint[0-9][0-9][0-9][0-9].pth") if p.is_file())
    return numbered[-1] if numbered else None


def resolve_resume(resume: str, output_dir: str, *, eval_only: bool = False) -> Optional[Path]:
    """The checkpoint to resume from: ``--resume PATH``, or with ``--resume auto`` the output folder's newest
    checkpoint (:func:`newest_checkpoint`) when present (None, to start fresh, otherwise; an error with
    ``eval_only``)."""
    if not resume:
        return None
    if resume != "auto":
        return Path(resume)
    candidate = Path(output_dir) / "checkpoint.pth"
    found = newest_checkpoint(Path(output_dir))
    if found is not None:
        logger.info("--resume auto: resuming from %s", found)
        return found
    if eval_only:
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


def check_optimizer_state_fits(optimizer: torch.optim.Optimizer, source: str | Path) -> None:
    """Raise InputError when a loaded optimizer state holds, for some parameter, moments of another shape: its
    parameters were listed in another order (the first step would fail deep inside the optimizer)."""
    for group_index, group in enumerate(optimizer.param_groups):
        for position, param in enumerate(group["params"]):
            for name, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                    raise InputError(
                        f"the optimizer state of {source} does not fit: parameter {position} of group {group_index} "
                        f"has shape {tuple(param.shape)} but its {name} {tuple(value.shape)} (the checkpoint lists "
                        "the parameters in another order, or another model wrote it). To keep the weights and "
                        "restart the optimizer, use --finetune with this checkpoint instead of --resume.")


def apply_current_lrs(lr_scheduler: torch.optim.lr_scheduler.StepLR, current_lrs: list[float], *,
                      global_batch: tuple[int, int]) -> None:
    """Give a resumed optimiser the current command's learning rates (``current_lrs``, one per group, already
    scaled for the current global batch), as the reference does, keeping the schedule's position: each group's
    rate becomes its new base times the drops so far. Groups whose base is unchanged keep their rates to the
    bit, so a resume with the same flags and world size is exact. ``global_batch``: (then, now), for the log."""
    old_bases = list(lr_scheduler.base_lrs)
    if old_bases == current_lrs:
        return
    drops = lr_scheduler.gamma ** (lr_scheduler.last_epoch // lr_scheduler.step_size)
    for index, (group, base) in enumerate(zip(lr_scheduler.optimizer.param_groups, current_lrs)):
        group["initial_lr"] = base
        group["lr"] = base * drops
        lr_scheduler.base_lrs[index] = base
    lr_scheduler._last_lr = [group["lr"] for group in lr_scheduler.optimizer.param_groups]
    changes = ", ".join(f"group {i}: {old:.3g} -> {new:.3g}" for i, (old, new) in enumerate(zip(old_bases, current_lrs))
                        if old != new)
    logger.warning("--resume: the learning rates follow the current flags and world size, lr %.3g -> %.3g "
                   "(global batch %d -> %d; %s); the schedule keeps its place (epoch %d, x%.3g)", old_bases[0],
                   current_lrs[0], *global_batch, changes, lr_scheduler.last_epoch, drops)


def restore_training_state(checkpoint: Mapping[str, Any], optimizer: torch.optim.Optimizer,
                           lr_scheduler: torch.optim.lr_scheduler.StepLR, scaler: torch.amp.GradScaler, *,
                           start_epoch: int, lr_drop: int, batch_size: int, ctx: DistContext,
                           source: str | Path) -> TrainState:
    """Restore optimiser, schedule (made to drop every ``lr_drop`` epochs; the learning rates of the optimiser as
    built now, see :func:`apply_current_lrs`), gradient scaler and this process's random state; training goes on where the checkpoint stopped: the next epoch, or within its epoch for a
    mid-epoch checkpoint (``batch_size`` per process now). A weights-only checkpoint (e.g. an official one)
    starts at ``start_epoch``."""
    if not all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch")):
        logger.warning("%s holds no optimizer / lr_scheduler / epoch: only its weights are used, training starts "
                       "at epoch %d", source, start_epoch)
        return TrainState(start_epoch)
    current_lrs = [group["lr"] for group in optimizer.param_groups]
    check_optimizer_groups(checkpoint["optimizer"], optimizer, source)
    optimizer.load_state_dict(checkpoint["optimizer"])
    check_optimizer_state_fits(optimizer, source)
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    rng_states = checkpoint.get("rng_state")
    then_batch = getattr(checkpoint.get("args"), "batch_size", batch_size) * len(rng_states or [None])
    apply_current_lrs(lr_scheduler, current_lrs, global_batch=(then_batch, batch_size * ctx.world_size))
    set_lr_drop(lr_scheduler, lr_drop)
    if scaler.is_enabled() and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
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
    then = getattr(checkpoint.get("args"), "batch_size", batch_size) * len(rng_states)
    now = batch_size * ctx.world_size
    if then != now:
        logger.warning("%s stopped epoch %d after %d global batches of %d images; with %d images per global batch "
                       "now, it continues at batch %d (in another image order)", source, checkpoint["epoch"],
                       progress.step, then, now, progress.step * then // now)
        progress.step = progress.step * then // now
    logger.info("resumed %s: training continues at epoch %d, iteration %d", source, checkpoint["epoch"],
                progress.step)
    return TrainState(int(checkpoint["epoch"]), rng_state, progress)


def write_checkpoints(model: nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler, scaler, epoch: int,
                      output_dir: Path, *, run_args: argparse.Namespace, lr_drop: int, keep_every: int,
                      progress: Optional[EpochProgress] = None,
                      train_stats: Optional[Mapping[str, Any]] = None,
                      model_ema: Optional[Mapping[str, Tensor]] = None,
                      model_description: Optional[Mapping[str, Any]] = None) -> Path:
    """Save from rank 0, and return the path of, checkpoint.pth (every process must call it: it gathers their
    random states): with ``progress``, that of epoch ``epoch`` stopped midway; otherwise that of the finished
    epoch (with its ``train_stats``), plus checkpoint{epoch:04}.pth when due (see :func:`checkpoint_paths`).
    ``run_args`` (the run's flags) are stored as they are, as the reference does; ``model_description`` (the
    plain-data ``models.description.ModelDescription.to_dict()``, which every tool rebuilds the model from) under
    ``model_description``; ``model_ema`` (``--ema_decay``: the moving average's state dict) under ``model_ema``, a
    key the checkpoint lacks without it."""
    rng_states = all_gather_object(capture_rng_state())
    latest = output_dir / "checkpoint.pth"
    if not is_main_process():
        return latest
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "epoch": epoch,
        "args": run_args,
        "model_description": None if model_description is None else dict(model_description),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "rng_state": rng_states,
        "progress": None if progress is None else asdict(progress),
        "train_stats": None if train_stats is None else dict(train_stats),
    }
    if model_ema is not None:
        checkpoint["model_ema"] = model_ema
    paths = [latest] if progress is not None else checkpoint_paths(output_dir, epoch, lr_drop, keep_every)
    # checkpoint.pth last: a kill between two writes then redoes the epoch rather than lose checkpoint{epoch:04}.pth.
    for path in reversed(paths):
        save_checkpoint(checkpoint, path)
    return latest

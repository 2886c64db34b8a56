"""Checks of a checkpoint file and its contents before they are used: implausible zip entry sizes (a compressed
"zip bomb"), entries that are not what a checkpoint holds, an optimizer state of other parameter groups. Each
raises :class:`~util.errors.InputError` naming the problem and the fix (used by :mod:`util.checkpoint`)."""
from __future__ import annotations

import argparse
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from util.errors import InputError


# torch.save stores its zip entries uncompressed: together they take about the file's size. A file whose entries
# claim more than this many times its size (plus a little, for tiny files) was rewritten with compression;
# DEFLATE turns a few MB of zeros into GBs, which torch.load would allocate before anything could check them.
MAX_INFLATION = 4
INFLATION_SLACK = 2**20


def check_zip_sizes(path: Path) -> None:
    """Raise InputError, before anything is read from ``path``, when its zip entries claim implausibly more bytes
    than the file holds (a compressed "zip bomb"). Legacy (non-zip) checkpoints pass: they are not compressed."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a zip archive (a legacy pickle), or damaged: torch.load says which
    size = path.stat().st_size
    claimed = sum(entry.file_size for entry in entries)
    if claimed > MAX_INFLATION * size + INFLATION_SLACK:
        largest = max(entries, key=lambda entry: entry.file_size)
        raise InputError(
            f"{path} was refused: its zip entries claim {claimed / 2**20:.0f} MiB in a {size / 2**20:.1f} MiB file "
            f"(e.g. {largest.filename!r}: {largest.file_size / 2**20:.0f} MiB stored in "
            f"{largest.compress_size / 2**20:.2f} MiB), while torch.save stores them uncompressed; loading it could "
            "exhaust the memory. Use an unmodified copy of the checkpoint (as torch.save wrote it).")


def _describe(value: Any) -> str:
    """``None``, ``a list``, ``a str ('abc...')``: what a checkpoint entry holds, for an error message."""
    if value is None:
        return "None"
    text = f"a {type(value).__name__}"
    return f"{text} ({value[:20]!r})" if isinstance(value, str) else text


def check_checkpoint_contents(checkpoint: Mapping[str, Any], path: Path) -> None:
    """Raise InputError when ``model`` (or ``model_ema``) is not a state dict (names -> tensors), or ``args`` is
    neither the run's flags (a Namespace or dict) nor absent: whatever wrote the file, it is not a checkpoint of
    a model."""
    for key in ("model", "model_ema"):
        value = checkpoint.get(key)
        if key == "model_ema" and value is None:
            continue
        if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                     for k, v in value.items()):
            raise InputError(f"{path} is not a usable checkpoint: its {key!r} holds {_describe(value)}, not a state "
                             "dict (parameter names -> tensors). Was it written by torch.save(model.state_dict()) "
                             "or this project's training?")
    stored_args = checkpoint.get("args")
    if stored_args is not None and not isinstance(stored_args, (argparse.Namespace, Mapping)):
        raise InputError(f"{path} is not a usable checkpoint: its 'args' holds {_describe(stored_args)}, not the "
                         "run's flags (an argparse.Namespace or a dict). Give the model flags yourself instead "
                         "(tools: after --, or a configs/*.sh script) from a copy of the file without 'args'.")


def check_optimizer_groups(saved: Any, optimizer: torch.optim.Optimizer, source: str | Path) -> None:
    """Raise InputError, naming ``--finetune``, when the saved optimizer state ``saved`` has another number of
    parameter groups than ``optimizer`` (DETR's reference writes 2, ours 3) or another number of parameters in
    a group, or is not an optimizer state at all: ``load_state_dict`` would fail with a bare ValueError."""
    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    fix = ("To keep the weights and restart the optimizer, use --finetune with this checkpoint instead of --resume "
           "(in a new --output_dir).")
    if not isinstance(groups, list) or not all(isinstance(g, Mapping) and isinstance(g.get("params"), list)
                                               for g in groups):
        raise InputError(f"the optimizer state of {source} is not one torch wrote (no list of parameter groups). {fix}")
    saved_sizes = [len(group["params"]) for group in groups]
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    if saved_sizes != sizes:
        raise InputError(f"the optimizer state of {source} does not fit this run: it has {len(saved_sizes)} parameter "
                         f"groups of {saved_sizes} tensors, this run's optimizer {len(sizes)} of {sizes} (another "
                         "model, flags such as --lr_backbone 0 that freeze parameters, or another training code, e.g. "
                         f"DETR's reference with 2 groups, wrote it). {fix}")

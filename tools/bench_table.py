"""The output of ``benchmark.py model``: its markdown table's columns and lines, the setup line above it, and
the ``--jsonl`` records."""
from __future__ import annotations

import argparse
import json
from typing import Any

import torch


def training_columns(opts: argparse.Namespace, amp: str) -> list[tuple[str, str, str]]:
    """(row key, header, number format) of the training columns of ``--amp amp``."""
    cols = [(f"train_images_per_s_{amp}", f"train img/s amp {amp}", ".3f")] if "train" in opts.measure else []
    if "train" in opts.measure or "memory" in opts.measure:
        cols += [(f"train_peak_mib_{amp}", f"train peak MiB amp {amp}", ".0f"),
                 (f"train_step_mib_{amp}", f"train step MiB amp {amp}", ".0f")]
    return cols


def columns(opts: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(row key, header, number format) of the table's measurement columns."""
    cols = []
    if "cost" in opts.measure:
        cols += [("params_m", "params (M)", ".2f"), ("gmacs", "GMACs", ".1f")]
    if "fps" in opts.measure:
        cols += [(f"fps_bs{b}", f"FPS batch {b}", ".2f") for b in opts.batch_sizes]
    for amp in opts.amp:
        cols += training_columns(opts, amp)
    return cols


def table_line(cells: list[str]) -> str:
    """One markdown table line."""
    return "| " + " | ".join(cells) + " |"


def format_row(row: dict[str, Any], cols: list[tuple[str, str, str]]) -> str:
    """A measured row as a table line; "n/a" where a measurement did not run."""
    cells = [row["model"]] + ["n/a" if row.get(key) is None else format(row[key], fmt) for key, _, fmt in cols]
    return table_line(cells)


def describe_setup(device: torch.device, opts: argparse.Namespace, kept_freed_memory: bool) -> str:
    """The line above the table: device (and on CPU whether freed memory is kept), torch, image, batch and
    timing settings."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    if device.type == "cpu":
        where += ", freed memory kept" if kept_freed_memory else ", system malloc"
    extra = f", model flags {' '.join(opts.model_args)}" if opts.model_args else ""
    return (f"# {where}; torch {torch.__version__}; image {opts.height}x{opts.width}; training batch "
            f"{opts.train_batch_size}; median of {opts.repeats} (models in turn) after {opts.warmup} warm-up{extra}")


def write_jsonl(opts: argparse.Namespace, device: torch.device, kept_freed_memory: bool, row: dict[str, Any],
                grad_checkpoint: bool) -> None:
    """Append ``row`` with the setup to the ``--jsonl`` file."""
    setup = {"device": str(device), "threads": torch.get_num_threads(), "kept_freed_memory": kept_freed_memory,
             "height": opts.height, "width": opts.width, "train_batch_size": opts.train_batch_size,
             "warmup": opts.warmup, "repeats": opts.repeats, "model_args": opts.model_args,
             "grad_checkpoint": grad_checkpoint, "torch": torch.__version__}
    with open(opts.jsonl, "a") as f:
        f.write(json.dumps({**setup, **row}) + "\n")

"""What a run prints: one progress line every ``--log_every`` steps of training and evaluation, and the
tables that end an evaluation (the 12 COCO stats, the AP per class), all in percent.

    epoch 3 [ 250/1000] eta 0:12:31 | run eta 5:40:12 | 38.2 img/s | lr 2.00e-04 | loss 8.5123 loss_ce 0.7211
        loss_bbox 0.2123 loss_giou 0.5012 loss_mask_prediction 0.0812 | peak mem 10234 MiB (GPU)   (one line)
    eval [ 20/125] eta 0:00:31 | 52.1 img/s
    COCO box AP and AR of 5000 images, in percent:
        AP   AP50   AP75    APs    APm    APl    AR1   AR10  AR100    ARs    ARm    ARl
      46.1   65.2   49.8   28.1   50.2   60.1   35.9   57.0   61.2   41.4   65.3   77.8

``eta`` is the epoch's, ``run eta`` the whole run's (to the end of the last epoch, at the pace of this process
since it started, evaluations included: :class:`RunPace`). The losses are the weighted total ``loss`` and every
weighted ``loss_*`` without a layer suffix (``_0``, ``_enc``, ``_enc_0``): those of the last decoder layer, then
the terms of Sparse DETR's token-selection rule (``--rho`` > 0: ``loss_mask_prediction`` of the DAM rule,
``loss_*_backbone`` of the objectness rule, whatever a new rule names), smoothed over the last steps (median of
:class:`util.logger.SmoothedValue`'s window). log.txt keeps every metric. Lines go through :mod:`logging` as plain lines,
each ending in a newline, on a terminal too: Slurm logs and CI get no carriage-return updates. Under torchrun
only rank 0 logs at INFO (:func:`util.process.setup_logging`).
"""
from __future__ import annotations

import datetime
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch

from util.memory import peak_rss_mib

logger = logging.getLogger(__name__)

# The losses the training line leaves out: those of the decoder's and encoder's other layers (models/criterion.py
# output groups), and every loss before its weight.
HIDDEN_LOSS = re.compile(r"_(\d+|enc|enc_\d+|unscaled)$")
# The 12 numbers of a COCO box evaluation (``CocoEvaluator.stats``), in their order; the table shows the first 6.
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
PER_CLASS_FEW = 5  # the per-class table shows this many best and worst classes without --per_class


@dataclass
class Progress:
    """Where a loop stands when it logs: ``step`` batches of ``total`` are done (counting those done before a
    resume), ``eta_s`` seconds to go at the average pace so far, ``images_per_s`` since the previous line
    (over all processes)."""
    step: int
    total: int
    eta_s: float
    images_per_s: float

    def __str__(self) -> str:
        width = len(str(self.total))
        return (f"[{self.step:{width}d}/{self.total}] eta {datetime.timedelta(seconds=int(self.eta_s))} | "
                f"{self.images_per_s:.1f} img/s")


@dataclass
class RunPace:
    """The whole run's pace: ``total_steps`` training steps in the run (every epoch), ``steps_at_start`` of them
    done when this process started (a resume), at ``start`` (``time.perf_counter()``)."""
    total_steps: int
    steps_at_start: int = 0
    start: float = field(default_factory=time.perf_counter)

    def eta_s(self, steps_done: int, now: Optional[float] = None) -> Optional[float]:
        """Seconds to the end of the run after ``steps_done`` steps (counted from epoch 0), at the pace since
        ``start`` (evaluations included); None before this process did a step."""
        done_here = steps_done - self.steps_at_start
        if done_here <= 0:
            return None
        elapsed = (time.perf_counter() if now is None else now) - self.start
        return elapsed / done_here * max(self.total_steps - steps_done, 0)


def peak_memory() -> tuple[float, str]:
    """``(MiB, source)``: the peak CUDA memory allocated by tensors on the current device once CUDA is in use,
    else the process's peak resident set size (``"RSS"``)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20, "GPU"
    return peak_rss_mib(), "RSS"


def console_losses(smoothed: Mapping[str, float]) -> dict[str, float]:
    """The losses of the training line in ``smoothed`` (a run's metric values by log.txt key): ``loss``, then
    every ``loss_*`` key in its order there, except those :data:`HIDDEN_LOSS` matches (auxiliary layers ``_0``,
    ``_enc``, ``_enc_0``; ``_unscaled``); no metric key."""
    shown = [name for name in smoothed if name.startswith("loss_") and not HIDDEN_LOSS.search(name)]
    return {name: smoothed[name] for name in ("loss", *shown) if name in smoothed}


@dataclass
class TrainReport:
    """What a training progress line shows: the epoch, where it stands, the learning rate (of the first
    parameter group), :func:`console_losses` and the peak memory."""
    epoch: int
    progress: Progress
    lr: float
    losses: dict[str, float]
    peak_mib: float
    peak_source: str
    run_eta_s: Optional[float] = None

    @classmethod
    def now(cls, epoch: int, progress: Progress, *, lr: float, smoothed: Mapping[str, float],
            run_eta_s: Optional[float] = None) -> "TrainReport":
        """The report at this point; ``smoothed``: the run's metric values by log.txt key; ``run_eta_s``: the
        whole run's ETA (:class:`RunPace`), None to leave it out."""
        return cls(epoch, progress, lr, console_losses(smoothed), *peak_memory(), run_eta_s=run_eta_s)

    def line(self) -> str:
        losses = " ".join(f"{name} {value:.4f}" for name, value in self.losses.items())
        progress = str(self.progress)
        if self.run_eta_s is not None:  # after the epoch's eta, before the images per second
            epoch_part, speed = progress.rsplit(" | ", 1)
            progress = f"{epoch_part} | run eta {datetime.timedelta(seconds=int(self.run_eta_s))} | {speed}"
        return (f"epoch {self.epoch} {progress} | lr {self.lr:.2e} | {losses} | peak mem {self.peak_mib:.0f} "
                f"MiB ({self.peak_source})")

    def scalars(self) -> dict[str, float]:
        """The line's numbers by name: ``lr``, the losses, ``images_per_s``, ``peak_mem_mib``."""
        return {"lr": self.lr, **self.losses, "images_per_s": self.progress.images_per_s,
                "peak_mem_mib": self.peak_mib}


def eval_line(progress: Progress) -> str:
    """The evaluation progress line."""
    return f"eval {progress}"


def _percent(value: float) -> str:
    """A COCO stat in percent with one decimal; -1 (no ground truth of that kind) as ``-``."""
    return "-" if value < 0 else f"{100 * value:.1f}"


def ap_table(stats: Sequence[float], num_images: int) -> str:
    """The 12 COCO stats (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl) as a named two-row
    table, in percent; -1 (no ground truth of that kind) is shown as ``-``."""
    values = [_percent(v) for v in stats[:len(COCO_STAT_NAMES)]]
    return (f"COCO box AP and AR of {num_images} images, in percent:\n"
            + " ".join(f"{n:>6}" for n in COCO_STAT_NAMES) + "\n" + " ".join(f"{v:>6}" for v in values))


def class_ap_table(rows: Sequence[Mapping], *, show_all: bool, few: int = PER_CLASS_FEW) -> str:
    """Per-class AP and AP50 in percent (``rows``: ``datasets.coco_results.per_class_ap``), best first; classes
    without ground truth (AP -1) last, as ``-``. ``show_all`` lists every class, else the ``few`` best and the
    ``few`` worst (classes with ground truth), with a line saying how many are left out."""
    ranked = sorted(rows, key=lambda r: (r["AP"] < 0, -r["AP"]))
    if show_all or len(ranked) <= 2 * few:
        shown: list = ranked
        title = f"AP per class of {len(rows)} classes, in percent, best first:"
    else:
        scored = [r for r in ranked if r["AP"] >= 0]
        worst = scored[max(few, len(scored) - few):]
        shown = [*scored[:few], None, *worst]
        title = (f"AP per class of {len(rows)} classes, in percent: the {few} best and the {len(worst)} worst "
                 f"(--per_class lists all):")
    width = max([5, *(len(str(r["name"])) for r in rows)])
    lines = [title, f"  {'class':<{width}} {'AP':>6} {'AP50':>6} {'boxes':>6}"]
    for row in shown:
        if row is None:
            lines.append(f"  ... {len(ranked) - len(shown) + 1} classes more ...")
        else:
            lines.append(f"  {str(row['name']):<{width}} {_percent(row['AP']):>6} {_percent(row['AP50']):>6} "
                         f"{row['num_boxes']:>6}")
    return "\n".join(lines)


def log_progress(batches: Iterable, *, name: str, total: int, every: int, line: Callable[[Progress], str], done: int = 0,
                 images_per_batch: Callable[[object], int] = lambda batch: len(batch[1]),
                 world_size: int = 1, log: logging.Logger = logger) -> Iterator:
    """Yield the batches of ``batches`` (batch ``done`` to ``total - 1``); after batch 0, every ``every``-th and
    the last one (once the caller's loop body has run for it), log ``line(progress)``. Images per second
    count ``images_per_batch`` (default: the length of a ``(samples, targets)`` batch's targets) times
    ``world_size`` (each process runs as many batches). Ends, when every batch was taken, with the line
    ``"<name> done: <steps> steps in <time> (<s> s / step)"``."""
    start = last_time = time.perf_counter()
    images = 0
    step = done
    for step, batch in enumerate(batches, done):
        yield batch
        images += images_per_batch(batch) * world_size
        if step % every == 0 or step == total - 1:
            now = time.perf_counter()
            eta = (now - start) / (step + 1 - done) * (total - step - 1)
            log.info("%s", line(Progress(step + 1, total, eta, images / max(now - last_time, 1e-9))))
            images, last_time = 0, now
    elapsed = time.perf_counter() - start
    steps = max(step + 1 - done, 1)
    log.info("%s done: %d step%s in %s (%.3f s / step)", name, steps, "s" * (steps != 1), datetime.timedelta(seconds=int(elapsed)), elapsed / steps)

"""The end of each epoch and the early stops of a run (``runner.run`` calls them).

    Validation              evaluating on the validation data without shifting the random streams
    finish_epoch            evaluate when due, then append the epoch's record to log.txt (and eval.json)
    record_cut_short_epoch  after a resume, write the record of an epoch whose evaluation was cut short
    read_log_records        log.txt's records, skipping damaged lines
    stop_error              the exception that ends training after a stop signal or too many non-finite steps
"""
from __future__ import annotations

import json
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn

from datasets.coco_eval import CocoEvaluator
from datasets.coco_results import save_evaluation
from engine import EpochResult, evaluate
from util.checkpoint import TrainState
from util.errors import InputError
from util.misc import any_process, is_main_process
from util.process import StopRequest, TrainingStopped, preserved_rng_state

logger = logging.getLogger(__name__)


class NonFiniteLossError(InputError):
    """Training stopped: too many steps in a row had a non-finite loss or gradient norm."""


@dataclass
class Validation:
    """What evaluating on the validation data takes. Calling it runs :func:`evaluate` without shifting the
    training's random streams and returns the record's test entries: ``test_<stat>`` of ``model`` and, with
    ``ema_model`` (``--ema_decay``: the moving average of the weights), ``test_ema_<stat>`` of it; the
    evaluators of the last call stay in ``evaluators`` (by prefix). ``model_description`` goes into eval.json."""
    model: nn.Module
    criterion: nn.Module
    postprocessors: Mapping[str, nn.Module]
    loader: Iterable
    base_ds: Any
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    log_every: int
    stop: Optional[StopRequest] = None  # a signal stops the evaluation (EvaluationStopped)
    ema_model: Optional[nn.Module] = None
    backend: str = "pycocotools"  # --eval_backend
    per_class: bool = False  # --per_class
    model_description: Mapping[str, Any] = field(default_factory=dict)
    evaluators: dict[str, CocoEvaluator] = field(default_factory=dict)

    def __call__(self) -> dict[str, Any]:
        models = {"test": self.model}
        if self.ema_model is not None:
            models["test_ema"] = self.ema_model
        record = {}
        for prefix, model in models.items():
            if prefix == "test_ema":
                logger.info("evaluating the moving average of the weights (--ema_decay): test_ema_* in log.txt")
            with preserved_rng_state():
                stats, self.evaluators[prefix] = evaluate(
                    model, self.criterion, self.postprocessors, self.loader, self.base_ds, self.device,
                    self.amp_dtype, self.log_every, self.stop, backend=self.backend, per_class=self.per_class)
            record.update({f"{prefix}_{k}": v for k, v in stats.items()})
        return record


def evaluation_due(epoch: int, eval_every: int, epochs: int) -> bool:
    """Whether epoch ``epoch`` ends with an evaluation: every ``eval_every`` epochs, and after the last."""
    return (epoch + 1) % eval_every == 0 or epoch == epochs - 1


def finish_epoch(epoch: int, train_stats: Mapping[str, Any], validation: Validation, *, evaluate_now: bool,
                 n_parameters: int, output_dir: Optional[Path]) -> dict[str, Any]:
    """Evaluate when ``evaluate_now``, then append the epoch's record (``train_*``, ``test_*``, with
    ``--ema_decay`` ``test_ema_*``, ``epoch``, ``n_parameters``) to ``output_dir``/log.txt; returns the record.
    An evaluation also (over)writes ``output_dir``/eval.json (eval_ema.json: of the moving average), so that
    it holds the run's last one."""
    test_stats = validation() if evaluate_now else {}
    record = {**{f"train_{k}": v for k, v in train_stats.items()}, **test_stats, "epoch": epoch,
              "n_parameters": n_parameters}
    if output_dir is not None and is_main_process():
        with (output_dir / "log.txt").open("a") as f:
            f.write(json.dumps(record) + "\n")
        for prefix, evaluator in validation.evaluators.items() if evaluate_now else ():
            weights = "ema" if prefix == "test_ema" else "raw"
            save_evaluation(output_dir, evaluator, name="eval_ema" if weights == "ema" else "eval",
                            checkpoint=output_dir / "checkpoint.pth", weights=weights, epoch=epoch,
                            model=validation.model_description, dataset=getattr(validation.loader, "dataset", None))
    return record


def read_log_records(path: Path) -> list[dict[str, Any]]:
    """The JSON records of a log.txt; lines that are not a JSON object (cut short by a crash, damaged bytes,
    ``null``) are skipped with one warning. The checkpoint, not the log, decides where a run resumes."""
    if not path.is_file():
        return []
    records, unreadable = [], []
    for number, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif line.strip():
            unreadable.append(number)
    if unreadable:
        logger.warning("%s: skipped %d lines that are not JSON records (lines %s); the checkpoint decides where "
                       "training resumes", path, len(unreadable), ", ".join(map(str, unreadable[:5])))
    return records


def log_lacks_epoch(output_dir: Path, epoch: int) -> bool:
    """Whether ``output_dir``/log.txt holds no record of ``epoch``. Rank 0 reads the file (it alone writes
    it); OR-ing over processes hands its answer to all."""
    lacks = is_main_process() and not any(r.get("epoch") == epoch for r in read_log_records(output_dir / "log.txt"))
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
    tries = ["a lower --lr (--resume auto with it continues the run at the new rate)",
             "--clip_max_norm 0.1 (clipping is off)" if clip_max_norm == 0 else
             f"a lower --clip_max_norm (now {clip_max_norm:g})"]
    if amp != "off":
        tries.append(f"--amp off (now {amp})")
    tries.append(f"checking the data with: python tools/check_dataset.py --coco_path {coco_path}")
    return NonFiniteLossError(
        f"training stopped: {result.progress.nonfinite_streak} steps in a row had non-finite values and were "
        f"skipped, up to epoch {epoch}, iteration {result.progress.step - 1} (the last: {result.problem}); "
        f"{kept}. Try {'; '.join(tries)}.")



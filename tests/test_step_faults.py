"""Faults within a step or a write: a killed checkpoint write leaves the previous checkpoint, a corrupt checkpoint
gives a clear error, non-finite steps are skipped (and too many in a row stop training with a checkpoint), and
--deterministic CPU runs are bitwise repeatable."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine
import runner
from util import checkpoint as ckpt
from util.errors import InputError

from test_engine import SPARSE_DETR, coco_root  # noqa: F401 (a fixture)
from test_fault_tolerance import ROOT, assert_same_runs, load, main_error, tiny_args

# ----------------------------------------------------------------------------------------------
# Killed writes, corrupt checkpoints

KILLED_WRITE = """
import os, signal, sys
import torch
from util.checkpoint import save_checkpoint
path = sys.argv[1]
save_checkpoint({"epoch": 1}, path)
def killed_mid_write(obj, f, *args, **kwargs):
    f.write(b"PK\\x03\\x04 the first bytes of a zip archive")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = killed_mid_write
save_checkpoint({"epoch": 2}, path)
"""


def test_a_write_killed_midway_leaves_the_previous_checkpoint_and_its_leftover_is_removed(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    path = tmp_path / "checkpoint.pth"
    result = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(path)], cwd=ROOT, capture_output=True)
    assert result.returncode == -signal.SIGKILL, result.stderr
    (leftover,) = tmp_path.glob(".checkpoint.pth.*.tmp")
    assert load(path) == {"epoch": 1}  # os.replace never ran: the previous checkpoint is whole
    ckpt.remove_unfinished_writes(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]
    assert f"removing {leftover}, the unfinished write of an interrupted run" in caplog.text


def test_save_checkpoint_writes_a_synced_temporary_file_then_renames_it(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append(("replace", Path(a).name, Path(b).name))
                        or real_replace(a, b))
    ckpt.save_checkpoint({"epoch": 3}, tmp_path / "checkpoint.pth")
    assert calls[0] == "fsync" and calls[1][0] == "replace"
    assert calls[1][1].startswith(".checkpoint.pth.") and calls[1][1].endswith(".tmp")
    assert calls[1][2] == "checkpoint.pth"


def test_a_truncated_checkpoint_names_the_file_and_another_checkpoint(coco_root, tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {"w": torch.zeros(1000)}, "epoch": 7}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(InputError) as info:
        ckpt.load_checkpoint(path)
    assert str(info.value).startswith(f"{path} cannot be read: the file is truncated or corrupt (RuntimeError: ")
    assert str(info.value).endswith("Restore it from a copy, or train from the start without --resume (there is "
                                    "no checkpoint{epoch:04}.pth next to it to fall back on).")
    for epoch in (4, 9):
        torch.save({"model": {}}, tmp_path / f"checkpoint{epoch:04}.pth")
    message = main_error(tiny_args(coco_root, "--output_dir", str(tmp_path), "--resume", "auto"))
    assert message.startswith(f"error: {path} cannot be read: the file is truncated or corrupt (")
    assert message.endswith(f"Resume from another checkpoint of the run instead, e.g. --resume "
                            f"{tmp_path / 'checkpoint0009.pth'}.")


# ----------------------------------------------------------------------------------------------
# Non-finite steps


def test_a_step_with_a_non_finite_gradient_norm_is_skipped(coco_root, caplog):
    args = tiny_args(coco_root)
    model, criterion, _ = runner.build_model(args)
    loader = runner.build_data_loader(runner.build_dataset("train", args), args, runner.DistContext(), train=True,
                                      device=torch.device("cpu"))
    optimizer = runner.build_optimizer(model, args, args.lr, args.lr_backbone)
    param = next(p for p in model.parameters() if p.requires_grad)
    hook = param.register_hook(lambda grad: grad * float("nan"))
    before = param.detach().clone()
    result = engine.train_one_epoch(model, criterion, [next(iter(loader))], optimizer, torch.device("cpu"), 0)
    hook.remove()
    assert result.stats["nonfinite_steps"] == 1 and torch.equal(param, before)
    assert "iteration 0 (batch 1 of 1): non-finite gradient norm nan with a finite loss" in caplog.text


def nan_from_call(monkeypatch, first_bad: int) -> None:
    """The criterion of the models runner.run builds returns a NaN loss_bbox from its ``first_bad``-th call."""
    real_build, calls = runner.build_model, []

    def build_model(*args, **kwargs):
        model, criterion, postprocessors = real_build(*args, **kwargs)
        real_forward = criterion.forward

        def forward(outputs, targets):
            losses = real_forward(outputs, targets)
            calls.append(1)
            if len(calls) >= first_bad and criterion.training:
                losses["loss_bbox"] = losses["loss_bbox"] * float("nan")
            return losses

        criterion.forward = forward
        return model, criterion, postprocessors

    monkeypatch.setattr(runner, "build_model", build_model)


def test_max_nonfinite_steps_in_a_row_stop_with_a_checkpoint_and_what_to_try(coco_root, tmp_path, monkeypatch):
    nan_from_call(monkeypatch, first_bad=2)
    message = main_error(tiny_args(coco_root, "--epochs", "2", "--max_nonfinite", "2", "--amp", "bf16",
                                   "--output_dir", str(tmp_path)))
    assert message == (
        "error: training stopped: 2 steps in a row had non-finite values and were skipped, up to epoch 0, iteration "
        "2 (the last: non-finite loss nan (loss_bbox=nan)); "
        f"{tmp_path / 'checkpoint.pth'} holds the weights and optimiser state of the last good step (--resume auto "
        "continues after the skipped batches). Try a lower --lr (--resume auto with it continues the run at the new "
        "rate); a lower --clip_max_norm (now 0.1); --amp off (now bf16); "
        f"checking the data with: python tools/check_dataset.py --coco_path {coco_root}.")
    saved = load(tmp_path / "checkpoint.pth")
    assert saved["progress"]["step"] == 3 and saved["progress"]["nonfinite"] == 2
    assert all(int(state["step"]) == 1 for state in saved["optimizer"]["state"].values())  # 1 good step

    monkeypatch.undo()  # the data is fine again: the run resumes and finishes
    record = runner.run(tiny_args(coco_root, "--epochs", "1", "--amp", "bf16", "--output_dir", str(tmp_path),
                                  "--resume", "auto"))
    assert record["epoch"] == 0 and record["train_nonfinite_steps"] == 2


# ----------------------------------------------------------------------------------------------
# Determinism


def test_two_deterministic_cpu_runs_give_identical_weights(coco_root, tmp_path):
    """Also with other --num_workers: order and augmentations do not depend on the workers."""
    a, b = tmp_path / "a", tmp_path / "b"
    runner.run(tiny_args(coco_root, *SPARSE_DETR, "--deterministic", "--epochs", "1", "--output_dir", str(a)))
    assert not torch.are_deterministic_algorithms_enabled()  # restored when the run ends
    runner.run(tiny_args(coco_root, *SPARSE_DETR, "--deterministic", "--epochs", "1", "--num_workers", "2",
                         "--output_dir", str(b)))
    assert_same_runs(b, a)

"""Trust: a run never overwrites another, one run holds a folder at a time, a checkpoint is not a program,
resuming follows the current flags, and a load says what it took and skipped (util/run_dir.py,
util/checkpoint.py)."""
from __future__ import annotations

import argparse
import builtins
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch

import main
import runner
from main import parse_args
from test_engine import ROOT, TINY, coco_root, read_log, tiny_args  # noqa: F401 (coco_root: a fixture)
from util.checkpoint import UntrustedCheckpointError, load_checkpoint
from util.errors import InputError
from util.run_dir import RunLock


def run_main(*flags: str) -> str:
    """The message main.py exits with."""
    with pytest.raises(SystemExit) as info:
        main.main(parse_args(list(flags)))
    return str(info.value)


# ----------------------------------------------------------------------------------------------
# A new run never overwrites an old one


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused_and_overwrite_moves_it_aside(coco_root, tmp_path):
    out = tmp_path / "run"
    runner.run(tiny_args(coco_root, "--epochs", "1", "--output_dir", str(out)))
    checkpoint_bytes, log = (out / "checkpoint.pth").read_bytes(), (out / "log.txt").read_text()
    message = run_main(*TINY, "--coco_path", str(coco_root), "--epochs", "1", "--output_dir", str(out))
    assert message == (f"error: --output_dir {out} already holds a run (checkpoint.pth, log.txt): continue it with "
                       "--resume auto, choose a new --output_dir, or start over with --overwrite (which moves the old "
                       "files aside, deleting nothing)")
    assert (out / "checkpoint.pth").read_bytes() == checkpoint_bytes and (out / "log.txt").read_text() == log

    runner.run(tiny_args(coco_root, "--epochs", "1", "--output_dir", str(out), "--overwrite"))
    (aside,) = out.glob("overwritten-*")
    assert (aside / "checkpoint.pth").read_bytes() == checkpoint_bytes and (aside / "log.txt").read_text() == log
    assert [r["epoch"] for r in read_log(out)] == [0]  # one epoch-0 record: the new run's
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pth", "config.json", "eval.json", "log.txt",
                                                     aside.name, "train.log"]  # no .lock
    # The old run's description, console and evaluation went with its weights.
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint.pth", "config.json", "eval.json", "log.txt",
                                                       "train.log"]


def test_overwrite_goes_with_a_fresh_training_run_only(coco_root, tmp_path):
    with pytest.raises(SystemExit, match="--overwrite starts a fresh training run"):
        tiny_args(coco_root, "--output_dir", str(tmp_path), "--overwrite", "--resume", "auto")


# ----------------------------------------------------------------------------------------------
# One run per folder


def test_a_second_run_in_a_held_folder_stops_at_once_naming_the_first(coco_root, tmp_path):
    lock = RunLock(tmp_path).acquire()
    try:
        message = run_main(*TINY, "--coco_path", str(coco_root), "--epochs", "1", "--output_dir", str(tmp_path))
    finally:
        lock.release()
    assert message.startswith(f"error: another run is using --output_dir {tmp_path} (pid {os.getpid()} on host "
                              f"{socket.gethostname()}, started ")
    assert message.endswith("): wait for it to finish or stop it, or choose another --output_dir")
    assert not (tmp_path / "checkpoint.pth").exists()


HOLD_THE_LOCK = """
import sys, time
from pathlib import Path
from util.run_dir import RunLock
RunLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_the_lock_of_a_killed_run_does_not_block_resume_auto(coco_root, tmp_path):
    out = tmp_path / "run"
    runner.run(tiny_args(coco_root, "--epochs", "1", "--output_dir", str(out)))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert "another run is using" in run_main(*TINY, "--coco_path", str(coco_root), "--epochs", "2",
                                                  "--output_dir", str(out), "--resume", "auto")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / ".lock").exists()  # the killed run's file stays; its flock went with the process
    runner.run(tiny_args(coco_root, "--epochs", "2", "--output_dir", str(out), "--resume", "auto"))
    assert [r["epoch"] for r in read_log(out)] == [0, 1]


# ----------------------------------------------------------------------------------------------
# An output folder that cannot be used is refused at start-up


def test_an_output_dir_that_is_a_file(coco_root, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("x")
    assert run_main(*TINY, "--coco_path", str(coco_root), "--output_dir", str(path)) == (
        f"error: --output_dir {path} is a file, not a folder: name a folder")


def test_an_output_dir_that_cannot_be_written(coco_root):
    unwritable = Path("/sys/kernel")  # not writable, even for root
    try:
        (unwritable / "probe").touch()
        pytest.skip("/sys/kernel is writable here: no unwritable folder to test with")
    except OSError:
        pass
    message = run_main(*TINY, "--coco_path", str(coco_root), "--output_dir", str(unwritable))
    assert message.startswith(f"error: cannot write to --output_dir {unwritable} (")
    assert message.endswith("): choose a folder you can write to, or fix its permissions")


# ----------------------------------------------------------------------------------------------
# A checkpoint is not a program


class WritesAFile:
    """A pickled payload that, unpickled, writes a file: what a malicious checkpoint could carry."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.target)!r}, 'w').write('ran')",)


def test_a_checkpoint_carrying_code_is_refused_and_runs_nothing(coco_root, tmp_path):
    target = tmp_path / "payload_ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "extra": WritesAFile(target)}, path)
    with pytest.raises(UntrustedCheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value) == (
        f"{path} was refused: it holds a pickled 'exec', which is neither weights nor settings, and unpickling it "
        "could run code the file carries. If you trust where the file comes from, pass --trust_checkpoint "
        "(tools/predict.py takes it too).")
    assert run_main(*TINY, "--coco_path", str(coco_root), "--eval", "--resume", str(path)) == f"error: {info.value}"
    assert not target.exists()
    # --trust_checkpoint loads it (and so runs the payload): the user's explicit choice.
    load_checkpoint(path, trust=True)
    assert target.read_text() == "ran"


def test_our_checkpoints_and_official_style_ones_load_without_trust(coco_root, tmp_path):
    out = tmp_path / "run"
    runner.run(tiny_args(coco_root, "--epochs", "1", "--output_dir", str(out)))
    ours = load_checkpoint(out / "checkpoint.pth")  # args (a Namespace), numpy / python / torch random states
    assert isinstance(ours["args"], argparse.Namespace) and ours["rng_state"][0]["numpy"][0] == "MT19937"
    # The references save {"model", "optimizer", "lr_scheduler", "epoch", "args"} with args a Namespace.
    official = {"model": ours["model"], "optimizer": ours["optimizer"], "lr_scheduler": ours["lr_scheduler"],
                "epoch": 49, "args": argparse.Namespace(lr=2e-4, backbone="resnet50", two_stage=True, rho=0.1)}
    torch.save(official, tmp_path / "official.pth")
    assert load_checkpoint(tmp_path / "official.pth")["args"].rho == 0.1
    stats = runner.run(tiny_args(coco_root, "--eval", "--resume", str(out / "checkpoint.pth")))
    assert stats["test_coco_eval_bbox"] == read_log(out)[0]["test_coco_eval_bbox"]


def test_predict_refuses_an_untrusted_checkpoint(tmp_path):
    from tools.predict import main as predict
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "extra": WritesAFile(tmp_path / "ran")}, path)
    PIL.Image.new("RGB", (32, 32)).save(tmp_path / "image.png")
    with pytest.raises(SystemExit, match="was refused: it holds a pickled 'exec'"):
        predict(["--resume", str(path), str(tmp_path / "image.png"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "ran").exists()


def test_the_trust_flag_warns_about_the_risk(tmp_path, caplog):
    path = tmp_path / "plain.pth"
    torch.save({"model": {"w": torch.zeros(1)}}, path)
    load_checkpoint(path, trust=True)
    assert "--trust_checkpoint: unpickling" in caplog.text and "can carry code" in caplog.text


def test_no_torch_load_in_the_project_unpickles_without_restriction():
    """Every load goes through util.checkpoint.torch_load (weights_only unless --trust_checkpoint)."""
    sources = [p for folder in ("models", "util", "datasets", "tools") for p in (ROOT / folder).rglob("*.py")]
    sources += [ROOT / "main.py", ROOT / "runner.py", ROOT / "epochs.py", ROOT / "engine.py"]
    offenders = [f"{p.relative_to(ROOT)}" for p in sources
                 if "weights_only=False" in p.read_text() and p != ROOT / "util" / "checkpoint.py"]
    assert offenders == []


def test_lock_file_names_its_holder(tmp_path):
    lock = RunLock(tmp_path).acquire()
    try:
        assert RunLock(tmp_path).holder().startswith(f"pid {os.getpid()} on host {socket.gethostname()}, started ")
    finally:
        lock.release()
    assert not (tmp_path / ".lock").exists()


# ----------------------------------------------------------------------------------------------
# Resuming with other learning rates or another world size (as the reference: the current flags decide)


def test_resume_with_a_new_lr_applies_it_at_the_schedules_place(coco_root, tmp_path, caplog):
    out = tmp_path / "run"
    common = ["--output_dir", str(out), "--lr_drop", "1"]
    runner.run(tiny_args(coco_root, *common, "--epochs", "1"))
    runner.run(tiny_args(coco_root, *common, "--epochs", "2", "--resume", "auto", "--lr", "4e-4"))
    assert [r["train_lr"] for r in read_log(out)] == pytest.approx([2e-4, 4e-5])  # one drop so far: 4e-4 x 0.1
    assert "lr 0.0002 -> 0.0004 (global batch 2 -> 2" in caplog.text


def test_resume_on_another_world_size_rescales_the_rates(coco_root):
    """A checkpoint of 2 processes x 2 images resumed by 1 process with --lr_scaling sqrt: the rates are those
    of a global batch of 2 now, not 4."""
    from util import checkpoint as ckpt
    from util.process import DistContext
    param = torch.nn.Parameter(torch.zeros(1))
    old = torch.optim.AdamW([param], lr=2e-4 * (4 / 16) ** 0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(old, 40)
    saved = {"optimizer": old.state_dict(), "lr_scheduler": scheduler.state_dict(), "epoch": 3,
             "args": parse_args(["--device", "cpu", "--batch_size", "2"]), "rng_state": [None, None]}
    now_lr = 2e-4 * (2 / 16) ** 0.5
    optimizer = torch.optim.AdamW([param], lr=now_lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 40)
    ckpt.restore_training_state(saved, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False),
                                start_epoch=0, lr_drop=40, batch_size=2, ctx=DistContext(), source="c.pth")
    assert optimizer.param_groups[0]["lr"] == now_lr and scheduler.base_lrs == [now_lr]


# ----------------------------------------------------------------------------------------------
# What a checkpoint load takes and skips


def test_flop_counter_entries_are_skipped_with_a_note_and_missing_tensors_still_fail(coco_root, caplog):
    from models import build_model
    from util.checkpoint import CheckpointMismatchError, load_model_strict
    caplog.set_level("INFO")
    model, _, _ = build_model(tiny_args(coco_root))
    weights = dict(model.state_dict())
    counted = {**weights, "total_ops": torch.zeros(1), "backbone.0.total_params": torch.zeros(1),
               "transformer.encoder.total_ops": torch.zeros(1)}
    load_model_strict(model, {"model": counted}, "official.pth")
    assert ("official.pth: skipped 3 entries written by a FLOP counter, not weights (e.g. total_ops, "
            "backbone.0.total_params, transformer.encoder.total_ops)") in caplog.text
    del counted["class_embed.0.bias"]
    with pytest.raises(CheckpointMismatchError, match="missing from the checkpoint"):
        load_model_strict(model, {"model": counted}, "official.pth")


def test_finetune_from_a_file_that_fits_almost_nothing_stops_with_the_keys(coco_root, tmp_path, caplog):
    from models import build_model
    from util.checkpoint import load_finetune_weights
    from util.errors import InputError
    model, _, _ = build_model(tiny_args(coco_root))
    backbone_only = {k[len("backbone.0.body."):]: v for k, v in model.state_dict().items()
                     if k.startswith("backbone.0.body.")}
    with pytest.raises(InputError) as info:
        load_finetune_weights(model, {"model": backbone_only}, "resnet.pth")
    own = list(model.state_dict())
    assert str(info.value).startswith(f"--finetune resnet.pth: only 0 of the model's {len(own)} tensors are in it "
                                      "with their shape, so it would initialise almost nothing. The model expects "
                                      f"keys like {own[:3]}; the file holds keys like {list(backbone_only)[:3]}.")
    caplog.set_level("INFO")
    load_finetune_weights(model, {"model": model.state_dict()}, "same.pth")
    assert f"--finetune: initialised {len(own)} of the model's {len(own)} tensors from same.pth" in caplog.text


def test_a_full_disk_while_saving_names_the_folder_and_the_size_and_keeps_the_last_checkpoint(tmp_path,
                                                                                              monkeypatch):
    import errno

    from util import checkpoint as ckpt
    path = tmp_path / "checkpoint.pth"
    ckpt.save_checkpoint({"model": {"w": torch.zeros(1)}}, path)
    before = path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(InputError) as info:
        ckpt.save_checkpoint({"model": {"w": torch.zeros(2**20)}}, path)  # 4 MiB of weights
    assert str(info.value) == (f"no space left in {tmp_path} to write checkpoint.pth (it needs about 4 MiB); "
                               "checkpoint.pth there is intact. Free space there or choose another --output_dir, "
                               "then resume with --resume")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]


def test_resume_of_a_folder_names_the_file_to_give(coco_root, tmp_path):
    assert run_main(*TINY, "--coco_path", str(coco_root), "--eval", "--resume", str(tmp_path)) == (
        f"error: checkpoint not found: {tmp_path} (a folder: name the .pth file in it)")

"""Issue 27 (reliability, round 3): runs, checkpoints, tools and torchrun. Each test names the bug it catches;
the data items are in test_bad_data_round3.py."""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import main
import runner
from main import parse_args
from test_engine import ROOT, TINY, coco_root, read_log, tiny_args  # noqa: F401 (coco_root: a fixture)
from util import checkpoint as ckpt
from util.console import Progress, RunPace, TrainReport
from util.errors import InputError
from util.process import DistContext, check_same_flags, differing_flags
from util.run_dir import claim_output_dir


def main_message(*flags: str) -> str:
    """What main.py exits with (its `error: ...` or `Invalid arguments:` text)."""
    with pytest.raises(SystemExit) as info:
        main.main(parse_args(list(flags)))
    return str(info.value.code)


def invalid(*flags: str) -> str:
    with pytest.raises(SystemExit) as info:
        parse_args(list(flags))
    return str(info.value.code)


@pytest.fixture(scope="module")
def ema_run(coco_root, tmp_path_factory) -> Path:
    """One tiny epoch with --ema_decay 0.99 and INFO logging (what the console shows): its output folder."""
    out = tmp_path_factory.mktemp("ema_run") / "run"
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    try:
        runner.run(tiny_args(coco_root, "--epochs", "1", "--ema_decay", "0.99", "--output_dir", str(out)))
    finally:
        root.setLevel(level)
    return out


# ----------------------------------------------------------------------------------------------
# BAD 1, 2: resuming never loses the average nor mixes two runs


def test_resume_without_ema_decay_is_refused_and_the_checkpoint_kept(coco_root, ema_run):
    """BAD 1: catches a resume without --ema_decay whose next checkpoint silently drops model_ema."""
    before = (ema_run / "checkpoint.pth").read_bytes()
    message = main_message(*TINY, "--coco_path", str(coco_root), "--epochs", "2", "--output_dir", str(ema_run),
                           "--resume", "auto")
    assert message.startswith(f"error: {ema_run / 'checkpoint.pth'} holds a moving average of the weights "
                              "(model_ema) that this run, without --ema_decay, would drop from its next checkpoint: "
                              "resume with --ema_decay 0.99 to keep it.")
    assert (ema_run / "checkpoint.pth").read_bytes() == before and len(read_log(ema_run)) == 1


def test_resume_path_into_a_folder_holding_another_run_is_refused(coco_root, ema_run, tmp_path):
    """BAD 2: catches --resume PATH --output_dir X that writes into X's run when PATH is not X's checkpoint."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "log.txt").write_text('{"epoch": 0}\n')
    message = main_message(*TINY, "--coco_path", str(coco_root), "--epochs", "2", "--ema_decay", "0.99",
                           "--output_dir", str(other), "--resume", str(ema_run / "checkpoint.pth"))
    assert message == (f"error: --output_dir {other} already holds another run (log.txt), and --resume "
                       f"{ema_run / 'checkpoint.pth'} is not one of its checkpoints: its log.txt would mix two runs' "
                       f"records. Continue {ema_run / 'checkpoint.pth'} in a new --output_dir, continue the folder's "
                       "own run with --resume auto, or start over with --overwrite (which moves the old files aside, "
                       "deleting nothing)")
    assert (other / "log.txt").read_text() == '{"epoch": 0}\n'


def test_claim_takes_the_folders_own_checkpoints_and_overwrite_moves_train_log_too(tmp_path):
    (tmp_path / "checkpoint0004.pth").write_bytes(b"x")
    (tmp_path / "train.log").write_text("old console\n")
    claim_output_dir(tmp_path, resume_from=tmp_path / "checkpoint0004.pth", overwrite=False).release()
    claim_output_dir(tmp_path, resume_from=tmp_path / "sub" / ".." / "checkpoint0004.pth", overwrite=False).release()
    with pytest.raises(InputError, match="already holds another run"):
        claim_output_dir(tmp_path, resume_from=tmp_path.parent / "checkpoint.pth", overwrite=False)
    claim_output_dir(tmp_path, resume_from=tmp_path.parent / "checkpoint.pth", overwrite=True).release()
    (aside,) = tmp_path.glob("overwritten-*")
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint0004.pth", "train.log"]


def test_overwrite_with_resume_is_checked_against_the_folder():
    assert "--overwrite would move aside" in invalid("--output_dir", "runs/a", "--overwrite", "--resume",
                                                      "runs/a/checkpoint.pth")
    assert "--overwrite starts a fresh training run" in invalid("--output_dir", "runs/a", "--overwrite", "--resume",
                                                                 "auto")
    parse_args(["--output_dir", "runs/a", "--overwrite", "--resume", "runs/b/checkpoint.pth", "--device", "cpu"])


# ----------------------------------------------------------------------------------------------
# Runs


def test_resume_auto_takes_the_newest_numbered_checkpoint(tmp_path):
    """Runs: catches --resume auto that ignores checkpoint<epoch>.pth when checkpoint.pth is absent."""
    for epoch in (4, 9):
        (tmp_path / f"checkpoint{epoch:04}.pth").write_bytes(b"x")
    assert ckpt.resolve_resume("auto", str(tmp_path)) == tmp_path / "checkpoint0009.pth"
    (tmp_path / "checkpoint.pth").write_bytes(b"x")
    assert ckpt.resolve_resume("auto", str(tmp_path)) == tmp_path / "checkpoint.pth"


def test_a_folder_with_a_log_but_no_checkpoint_does_not_send_the_user_to_resume_auto(tmp_path):
    """Runs: catches the refusal that tells a user who gave --resume auto to "continue it with --resume auto"."""
    (tmp_path / "log.txt").write_text("{}\n")
    with pytest.raises(InputError) as info:
        claim_output_dir(tmp_path, resume_from=None, overwrite=False)
    assert str(info.value) == (f"--output_dir {tmp_path} already holds a run (log.txt) but no checkpoint to continue "
                               "it from: choose a new --output_dir, or start over with --overwrite (which moves the "
                               "old files aside, deleting nothing)")


@pytest.mark.parametrize("flags, message", [
    (["--start_epoch", "5", "--epochs", "3"], "--start_epoch 5 is not below --epochs 3: no epoch would train"),
    (["--start_epoch", "-1"], "--start_epoch must be >= 0, got -1"),
    (["--device", "gpu"], "--device gpu: use cuda, cuda:N (a GPU's index) or cpu"),
    (["--device", "CPU"], "--device CPU: use cuda, cuda:N (a GPU's index) or cpu (lower case: --device cpu)"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--clip_max_norm", "inf"], "--clip_max_norm must be a finite number, got inf"),
])
def test_run_flags_that_train_nothing_or_cannot_work_are_refused(flags, message):
    """Runs: catches each of these passing validation (nothing trains and exit 0; a raw torch.device error after
    the datasets load; NaN weights after the first step)."""
    assert message in invalid("--device", "cpu", *flags) if flags[0] != "--device" else message in invalid(*flags)


def test_start_warnings_reach_the_log(monkeypatch, caplog):
    """Runs: catches training without --output_dir (saves nothing) and a ResNet from scratch with identity
    norms passing without a word."""
    args = parse_args(["--device", "cpu", "--backbone", "resnet18", "--backbone_from_scratch"])
    assert main.start_warnings(args) == [
        "no --output_dir: this run saves nothing (no checkpoint, no log.txt); add --output_dir DIR to keep its "
        "results",
        "--backbone_from_scratch with --backbone_norm frozen: the frozen BatchNorms of a random resnet18 are "
        "identities, so its trained layers (--lr_backbone 2e-05) cannot normalise their activations; add "
        "--backbone_norm batch"]
    assert main.start_warnings(parse_args(["--device", "cpu", "--backbone_from_scratch", "--backbone_norm", "batch",
                                           "--output_dir", "x"])) == []
    assert main.start_warnings(parse_args(["--device", "cpu", "--backbone_from_scratch", "--lr_backbone", "0",
                                           "--output_dir", "x"])) == []
    monkeypatch.setattr(runner, "init_distributed", lambda device: (_ for _ in ()).throw(RuntimeError("stop")))
    caplog.set_level(logging.WARNING)
    with pytest.raises(RuntimeError, match="stop"):
        runner.run(args, warnings=["a warning"])
    monkeypatch.setattr(runner, "run", lambda args, warnings=(): caplog.records.append(warnings))
    main.main(args)
    assert caplog.records[-1] == main.start_warnings(args)


def test_train_log_holds_the_console_and_the_run_eta(ema_run):
    """Long runs: catches a console that is lost with the terminal, and a progress line without the run's ETA."""
    text = (ema_run / "train.log").read_text()
    assert "INFO runner: model: Deformable DETR" in text  # the start-up lines are there too
    progress = [line for line in text.splitlines() if "INFO engine: epoch 0 [" in line]
    assert progress and all(" | run eta 0:" in line for line in progress)


def test_run_eta_counts_the_steps_left_in_the_whole_run():
    """Long runs: the whole run's ETA at the pace since the process started, after a resume too."""
    pace = RunPace(total_steps=100, steps_at_start=20, start=1000.0)
    assert pace.eta_s(20, now=1010.0) is None  # no step done by this process yet
    assert pace.eta_s(30, now=1010.0) == pytest.approx(70.0)  # 1 s per step, 70 steps left
    report = TrainReport(3, Progress(5, 10, 12.0, 4.0), 1e-4, {"loss": 1.0}, 100.0, "RSS", run_eta_s=3725.0)
    assert report.line() == ("epoch 3 [ 5/10] eta 0:00:12 | run eta 1:02:05 | 4.0 img/s | lr 1.00e-04 | loss 1.0000 | "
                             "peak mem 100 MiB (RSS)")


# ----------------------------------------------------------------------------------------------
# Odd and hostile checkpoints


def test_a_compressed_checkpoint_that_would_inflate_is_refused_before_loading(tmp_path):
    """BAD 3: catches a checkpoint whose zip entries were rewritten with DEFLATE (a few KB claiming many MB; real
    bombs claim GBs) reaching torch.load, which would allocate them all."""
    plain = tmp_path / "plain.pth"
    torch.save({"model": {"w": torch.zeros(2**21)}}, plain)  # 8 MiB of zeros
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as target:
        for entry in source.infolist():
            target.writestr(entry.filename, source.read(entry))
    assert bomb.stat().st_size < 2**20 // 8
    with pytest.raises(InputError) as info:
        ckpt.load_checkpoint(bomb)
    assert str(info.value).startswith(f"{bomb} was refused: its zip entries claim 8 MiB in a 0.0 MiB file")
    assert torch.equal(ckpt.load_checkpoint(plain)["model"]["w"], torch.zeros(2**21))  # torch.save's own: fine


@pytest.mark.parametrize("content, message", [
    ({"model": None}, "its 'model' holds None, not a state dict"),
    ({"model": [torch.zeros(1)]}, "its 'model' holds a list, not a state dict"),
    ({"model": {"w": torch.zeros(1)}, "args": "str"}, "its 'args' holds a str ('str'), not the run's flags"),
    ({"model": {"w": torch.zeros(1)}, "model_ema": [1]}, "its 'model_ema' holds a list, not a state dict"),
])
def test_a_checkpoint_with_odd_contents_is_one_line(tmp_path, content, message):
    """Odd weights: catches model=None / a list / args="str" reaching the model code (AttributeError, TypeError)."""
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    with pytest.raises(InputError) as info:
        ckpt.load_checkpoint(path)
    assert str(info.value).startswith(f"{path} is not a usable checkpoint: {message}") and "\n" not in str(info.value)


def test_an_optimizer_state_with_two_parameter_groups_is_refused_naming_finetune():
    """Odd weights: catches DETR's reference optimizer state (2 groups) failing inside torch's load_state_dict
    with "different number of parameter groups" instead of the refusal the README promises."""
    layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
    optimizer = torch.optim.AdamW([{"params": layer.parameters()} for layer in layers])
    detr_style = torch.optim.AdamW([{"params": layers[0].parameters()},
                                    {"params": [*layers[1].parameters(), *layers[2].parameters()]}])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 10)
    checkpoint = {"optimizer": detr_style.state_dict(), "lr_scheduler": scheduler.state_dict(), "epoch": 3}
    with pytest.raises(InputError) as info:
        ckpt.restore_training_state(checkpoint, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False),
                                    start_epoch=0, lr_drop=10, batch_size=2, ctx=DistContext(), source="detr.pth")
    assert str(info.value) == (
        "the optimizer state of detr.pth does not fit this run: it has 2 parameter groups of [2, 4] tensors, this "
        "run's optimizer 3 of [2, 2, 2] (another model, flags such as --lr_backbone 0 that freeze parameters, or "
        "another training code, e.g. DETR's reference with 2 groups, wrote it). To keep the weights and restart the "
        "optimizer, use --finetune with this checkpoint instead of --resume (in a new --output_dir).")


# ----------------------------------------------------------------------------------------------
# torchrun: every process runs the same flags


def test_differing_flags_are_named_per_rank():
    same = {"epochs": 3, "rho": 0.1}
    assert differing_flags([same, same]) == []
    assert differing_flags([same, {"epochs": 5, "rho": 0.1}, {"epochs": 5, "rho": 0.2}]) == [
        "--epochs is 3 on rank 0 but 5 on ranks 1, 2", "--rho is 0.1 on rank 0 but 0.2 on rank 2"]


def _flags_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    try:
        # Different data folders and loader processes per node are fine; a different --epochs is not.
        check_same_flags({"epochs": 3, "coco_path": f"/node{rank}", "num_workers": rank})
        try:
            check_same_flags({"epochs": 3 + 2 * rank, "coco_path": "/data"})
        except InputError as error:
            Path(out, f"rank{rank}").write_text(str(error))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_every_process_refuses_flags_that_differ_across_ranks(tmp_path):
    """torchrun: catches differing model flags ending in DDP's "params[49] ... sizes" traceback and a different
    --epochs per node in gloo's "Connection closed", instead of one line naming the flag."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_flags_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    expected = ("the processes of this run were started with different flags: --epochs is 3 on rank 0 but 5 on rank "
                "1. Start every node (every process) with the same command")
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == [expected, expected]


# ----------------------------------------------------------------------------------------------
# Tools


def test_predict_gives_every_image_a_unique_id():
    """BAD 6: catches an unlisted image given its position + 1, the id of a listed image (one id's results then
    hold two images' detections), and two inputs of one listed name sharing its id."""
    from tools.predict import assign_image_ids

    annotations = {"images": [{"id": 1, "file_name": "b.jpg"}, {"id": 7, "file_name": "sub/c.jpg"}]}
    images = [Path("a.jpg"), Path("b.jpg"), Path("x/c.jpg"), Path("y/b.jpg")]
    assert assign_image_ids(images, annotations) == ([8, 1, 7, 9], [("a.jpg", 8), ("b.jpg", 9)])
    assert assign_image_ids(images[:2], None) == ([1, 2], [("a.jpg", 1), ("b.jpg", 2)])


@pytest.mark.parametrize("flags, message", [
    (["--threads", "-1"], "--threads must be >= 0"),
    (["--verify_batch", "0"], "--verify_batch must be at least 1"),
    (["--verify_sizes", "0", "0"], "--verify_sizes must be positive sizes in pixels, got 0 0"),
])
def test_export_arguments_are_checked_before_the_export(tmp_path, flags, message, capsys, monkeypatch):
    """Export: catches these failing only after the export ran (or in torch.set_num_threads)."""
    from tools import export_onnx

    monkeypatch.setattr(export_onnx, "build_detector", lambda *a: pytest.fail("the export started"))
    with pytest.raises(SystemExit):
        export_onnx.main(["--random_init", "--out", str(tmp_path / "m.onnx"), "--verify", *flags])
    assert message in capsys.readouterr().err


def test_browse_dataset_writes_the_format_its_out_extension_names(tmp_path):
    """Tools: catches PNG bytes written under a .jpg name."""
    import PIL.Image
    from tools import browse_dataset
    from tools.make_synthetic_coco import make_synthetic_coco

    make_synthetic_coco(tmp_path, num_train=2, num_val=1, seed=0, size=32)
    for name, fmt in (("g.jpg", "JPEG"), ("g.png", "PNG")):
        written = browse_dataset.main(["--coco_path", str(tmp_path), "--n", "1", "--out", str(tmp_path / name)])
        with PIL.Image.open(written) as sheet:
            assert (written.name, sheet.format) == (name, fmt)
    assert browse_dataset.main(["--coco_path", str(tmp_path), "--n", "1", "--out", str(tmp_path / "g")]).name == "g.png"
    with pytest.raises(SystemExit, match=r"error: --out .*g\.gif: unknown extension '\.gif'; give a \.png, \.jpg"):
        browse_dataset.main(["--coco_path", str(tmp_path), "--out", str(tmp_path / "g.gif")])


@pytest.mark.parametrize("flags, message", [
    (["--height", "0"], "--height must be at least 1, got 0"),
    (["--repeats", "0"], "--repeats must be at least 1, got 0"),
    (["--batch_sizes", "0"], "--batch_sizes must be at least 1 each, got 0"),
])
def test_benchmark_arguments_are_checked(flags, message, capsys):
    """Tools: catches a ZeroDivisionError, a median of nothing or an empty batch after the models are built."""
    from tools import benchmark

    with pytest.raises(SystemExit):
        benchmark.parse_model_benchmark_args(["--device", "cpu", *flags])
    assert message in capsys.readouterr().err


def test_benchmark_help_exits_0():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), "--help"], capture_output=True,
                          text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.startswith("usage: python tools/benchmark.py {model,op}")

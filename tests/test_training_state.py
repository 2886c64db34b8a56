"""What a training run carries into its start and across a resume: the moving average of fine-tuned or
weights-only-resumed weights, the fp16 gradient scaler, and when --eval_every evaluates. (Each rank's own
random stream is checked by test_engine.py's two-process run.)"""
from __future__ import annotations

import pytest
import torch

import runner
from epochs import evaluation_due
from main import parse_args
from models import build_model
from util import checkpoint as ckpt

from test_engine import coco_root, read_log, tiny_args, train_stats  # noqa: F401 (coco_root: a fixture)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


# ----------------------------------------------------------------------------------------------
# The moving average starts from the loaded weights


@pytest.mark.parametrize("how", ["--finetune", "--resume"])
def test_the_average_starts_from_the_weights_loaded_not_the_initial_ones(coco_root, tmp_path, how):
    """Catches a moving average built before --finetune or a weights-only --resume (an official checkpoint)
    loads the weights: it would start from the random initialisation. With --lr_backbone 0 the backbone never
    moves, so the saved average's backbone must be the loaded one, bit for bit."""
    torch.manual_seed(123)  # weights other than those the run initialises (seed 42)
    loaded = build_model(tiny_args(coco_root))[0].state_dict()
    torch.save({"model": loaded}, tmp_path / "weights_only.pth")
    out = tmp_path / "run"
    runner.run(tiny_args(coco_root, "--epochs", "1", "--ema_decay", "0.9", how, str(tmp_path / "weights_only.pth"),
                         "--output_dir", str(out)))
    average = load(out / "checkpoint.pth")["model_ema"]
    backbone = [key for key in loaded if key.startswith("backbone.0.")]
    assert len(backbone) > 10 and any(key.endswith("conv1.weight") for key in backbone)
    for key in backbone:
        assert torch.equal(average[key], loaded[key]), key
    # Not vacuous: the run's own initial backbone (--seed 42) differs from the loaded one.
    torch.manual_seed(42)
    initial = build_model(tiny_args(coco_root))[0].state_dict()
    assert not torch.equal(initial["backbone.0.body.conv1.weight"], loaded["backbone.0.body.conv1.weight"])


# ----------------------------------------------------------------------------------------------
# The fp16 gradient scaler


def test_a_checkpoint_restores_the_gradient_scalers_scale_and_growth_tracker(tmp_path):
    """Catches a resume that reads the scaler from another key (or not at all): it would restart at scale 65536
    with no growth progress. A scaler at scale 1024, 7 steps into its growth interval, is written and restored
    exactly."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 10)
    scaler = torch.amp.GradScaler("cpu")
    scaler.load_state_dict({"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                            "_growth_tracker": 7})
    path = ckpt.write_checkpoints(model, optimizer, scheduler, scaler, 0, tmp_path, run_args=parse_args([]),
                                  lr_drop=10, keep_every=10)
    restored = torch.amp.GradScaler("cpu")
    ckpt.restore_training_state(ckpt.load_checkpoint(path), optimizer, scheduler, restored, start_epoch=0,
                                lr_drop=10, batch_size=2, ctx=runner.DistContext(), source=path)
    assert restored.state_dict()["scale"] == 1024.0 and restored.state_dict()["_growth_tracker"] == 7


def test_an_fp16_run_resumed_after_its_first_epoch_equals_the_uninterrupted_run(coco_root, tmp_path):
    """Catches a resumed fp16 run whose gradient scaler restarts (scale, growth tracker): the second epoch then
    skips other steps, or the scaler ends elsewhere. Weights, statistics and scaler end bit for bit as in the
    run that was not interrupted."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ["--amp", "fp16", "--lr_drop", "1"]
    runner.run(tiny_args(coco_root, *common, "--epochs", "2", "--output_dir", str(full)))
    runner.run(tiny_args(coco_root, *common, "--epochs", "1", "--output_dir", str(resumed)))
    runner.run(tiny_args(coco_root, *common, "--epochs", "2", "--output_dir", str(resumed), "--resume",
                         str(resumed / "checkpoint.pth")))
    assert [train_stats(r) for r in read_log(resumed)] == [train_stats(r) for r in read_log(full)]
    a, b = load(full / "checkpoint.pth"), load(resumed / "checkpoint.pth")
    assert a["scaler"] is not None and a["scaler"] == b["scaler"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# ----------------------------------------------------------------------------------------------
# --eval_every


@pytest.mark.parametrize("eval_every, epochs, evaluated", [
    (1, 3, [0, 1, 2]),
    (2, 3, [1, 2]),
    (2, 4, [1, 3]),
    (2, 5, [1, 3, 4]),
    (3, 7, [2, 5, 6]),
    (4, 3, [2]),
    (5, 5, [4]),
])
def test_evaluation_is_due_every_eval_every_epochs_and_after_the_last(eval_every, epochs, evaluated):
    """Catches ``epoch % eval_every`` (evaluating after epoch 0, then one epoch early) and a last epoch left
    unevaluated; the epochs are 0-based, "every 2" means after the 2nd, 4th, ... epoch."""
    assert [e for e in range(epochs) if evaluation_due(e, eval_every, epochs)] == evaluated


def test_grid_of_eval_every_and_epochs():
    """Over a grid: evaluated after epochs k-1, 2k-1, ... and the last one, nothing else."""
    for eval_every in range(1, 6):
        for epochs in range(1, 12):
            expected = sorted(set(range(eval_every - 1, epochs, eval_every)) | {epochs - 1})
            assert [e for e in range(epochs) if evaluation_due(e, eval_every, epochs)] == expected, (eval_every,
                                                                                                   epochs)


def test_a_three_epoch_run_with_eval_every_2_evaluates_after_epochs_1_and_2(coco_root, tmp_path):
    """The flag reaches the run: log.txt holds test_* for epochs 1 and 2 (the last) only, train_* for all."""
    out = tmp_path / "run"
    runner.run(tiny_args(coco_root, "--epochs", "3", "--eval_every", "2", "--output_dir", str(out)))
    records = read_log(out)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert [any(k.startswith("test_") for k in r) for r in records] == [False, True, True]
    assert all("train_loss" in r for r in records)

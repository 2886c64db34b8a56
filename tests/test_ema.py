"""--ema_decay and --eval_weights: the average's arithmetic, which steps update it, how it starts and resumes,
what a checkpoint without one does, the flags' checks, and plot_logs' EMA curves."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from torch import nn

import engine
import main
from main import parse_args
from models import build_model
from util import checkpoint as ckpt
from util.ema import ModelEMA, start_ema
from util.errors import InputError

from test_engine import TINY, coco_root  # noqa: F401 (a fixture)


class Tiny(nn.Module):
    """A trained layer, a frozen parameter and a buffer."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.frozen = nn.Parameter(torch.randn(4), requires_grad=False)
        self.register_buffer("count", torch.zeros(()))


def test_update_averages_parameters_copies_buffers_and_keeps_frozen_weights_bitwise():
    """Catches decay and 1 - decay swapped, buffers averaged (or left stale), and an average that drifts off a
    frozen weight through rounding."""
    torch.manual_seed(0)
    model = Tiny()
    ema = ModelEMA(model, decay=0.9)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        model.linear.weight.add_(1.0)
        model.count.fill_(5)
    ema.update()
    torch.testing.assert_close(ema.module.linear.weight, 0.9 * start["linear.weight"] + 0.1 * model.linear.weight)
    assert torch.equal(ema.module.linear.bias, model.linear.bias)  # unchanged weight: average unchanged
    assert torch.equal(ema.module.frozen, model.frozen)
    assert ema.module.count.item() == 5  # copied, not 0.5
    assert list(ema.state_dict()) == list(model.state_dict())
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError):
        ModelEMA(model, decay=1.0)


def test_only_applied_steps_update_the_average(monkeypatch):
    """A step skipped for a non-finite loss, or by the fp16 scaler (non-finite gradient norm, no problem), leaves
    the average alone; every applied step moves it once."""
    results = [engine.StepResult({"loss": 1.0}, 0.5), engine.StepResult({"loss": math.nan}, problem="nan loss"),
               engine.StepResult({"loss": 1.0}, math.inf), engine.StepResult({"loss": 1.0}, 0.7)]
    monkeypatch.setattr(engine, "train_step", lambda *args, **kwargs: results.pop(0))

    class CountingEMA:
        updates = 0

        def update(self):
            self.updates += 1

    ema, model = CountingEMA(), nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    result = engine.train_one_epoch(model, nn.Module(), [(None, [{}])] * 4, optimizer, torch.device("cpu"), 0,
                                    ema=ema)
    assert result.complete and ema.updates == 2


def test_start_ema_restores_a_saved_average_or_starts_from_the_loaded_weights(caplog):
    caplog.set_level(logging.INFO)
    torch.manual_seed(0)
    model = Tiny()
    assert start_ema(model, None, None) is None
    official = {"model": model.state_dict()}  # no model_ema: e.g. an official checkpoint
    ema = start_ema(model, 0.99, official, "official.pth")
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), model.state_dict().values()))
    assert "official.pth holds no moving average of the weights (model_ema); it starts from the weights" in caplog.text
    saved = {k: v + 1 for k, v in model.state_dict().items()}
    ema = start_ema(model, 0.99, {"model": model.state_dict(), "model_ema": saved}, "ours.pth")
    assert all(torch.equal(ema.state_dict()[k], saved[k]) for k in saved)


def test_resuming_an_average_without_ema_decay_is_refused_naming_the_stored_decay():
    """Issue 27, BAD 1: catches a resume without --ema_decay that drops the checkpoint's average (its next
    checkpoint has no model_ema, log.txt no test_ema_*) with only an INFO line."""
    model = Tiny()
    saved = model.state_dict()
    stored_args = parse_args(["--ema_decay", "0.9998"])
    with pytest.raises(InputError) as info:
        start_ema(model, None, {"model": saved, "model_ema": saved, "args": stored_args}, "ours.pth")
    assert str(info.value).startswith("ours.pth holds a moving average of the weights (model_ema) that this run, "
                                      "without --ema_decay, would drop from its next checkpoint: resume with "
                                      "--ema_decay 0.9998 to keep it.")
    with pytest.raises(InputError, match="resume with --ema_decay with its decay"):  # official-style: no args
        start_ema(model, None, {"model": saved, "model_ema": saved}, "other.pth")
    assert start_ema(model, None, {"model": saved}, "plain.pth") is None  # nothing to lose


def test_model_state_chooses_the_weights_and_names_the_flag_when_there_is_no_average():
    raw, average = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    assert ckpt.model_state({"model": raw, "model_ema": average}) is raw
    assert ckpt.model_state({"model": raw, "model_ema": average}, "ema") is average
    with pytest.raises(InputError, match=r"official\.pth holds no moving average .*--ema_decay.*\(--eval_weights raw\)"):
        ckpt.model_state({"model": raw}, "ema", source="official.pth", flag="--eval_weights")
    # Issue 27: the tools' flag is --weights (the message named --eval_weights there too).
    with pytest.raises(InputError, match=r"use its raw weights \(--weights raw\)$"):
        ckpt.model_state({"model": raw}, "ema", source="official.pth")


def test_checkpoints_with_an_average_load_under_weights_only(tmp_path):
    """The average is a state dict (an OrderedDict with metadata): the safe unpickler must take it."""
    model = Tiny()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    path = ckpt.write_checkpoints(model, optimizer, scheduler, scaler, 0, tmp_path, run_args=parse_args([]),
                                  lr_drop=10, keep_every=10, model_ema=ModelEMA(model, 0.9).state_dict())
    loaded = ckpt.load_checkpoint(path)
    assert list(loaded["model_ema"]) == list(model.state_dict())
    (tmp_path / "without").mkdir()
    without = ckpt.write_checkpoints(model, optimizer, scheduler, scaler, 0, tmp_path / "without",
                                     run_args=parse_args([]), lr_drop=10, keep_every=10)
    assert "model_ema" not in ckpt.load_checkpoint(without)


@pytest.mark.parametrize("flags, message", [
    (["--ema_decay", "1"], "--ema_decay must be in (0, 1)"),
    (["--ema_decay", "0"], "--ema_decay must be in (0, 1)"),
    (["--ema_decay", "0.99", "--eval", "--resume", "a.pth"], "with --eval, choose the checkpoint's average"),
    (["--eval_weights", "ema"], "--eval_weights ema chooses the weights --eval evaluates"),
])
def test_ema_flags_are_checked(flags, message):
    with pytest.raises(SystemExit) as info:
        parse_args(flags)
    assert message in str(info.value.code)


def test_eval_of_the_average_of_a_checkpoint_without_one_names_the_flag(coco_root, tmp_path):
    args = parse_args([*TINY, "--coco_path", str(coco_root), "--eval", "--eval_weights", "ema", "--resume",
                       str(tmp_path / "official.pth")])
    torch.save({"model": build_model(args)[0].state_dict()}, tmp_path / "official.pth")
    with pytest.raises(SystemExit) as info:
        main.main(args)
    assert str(info.value.code).startswith(f"error: {tmp_path / 'official.pth'} holds no moving average")
    assert "--ema_decay" in str(info.value.code) and str(info.value.code).endswith("(--eval_weights raw)")


def test_plot_logs_plots_the_average_when_asked(tmp_path):
    """Catches --weights ema that still plots test_* (or plots nothing) and a silent empty plot of a run
    trained without --ema_decay."""
    from tools import plot_logs

    run = tmp_path / "run"
    run.mkdir()
    records = [{"epoch": e, "train_loss": 3.0 - e, "test_loss": 3.5 - e, "test_ema_loss": 3.2 - e,
                "test_coco_eval_bbox": [0.1 * e] * 12, "test_ema_coco_eval_bbox": [0.2 * e] * 12,
                "train_loss_ce": 1.0, "test_loss_ce": 1.1, "test_ema_loss_ce": 1.05} for e in range(3)]
    (run / "log.txt").write_text("".join(json.dumps(r) + "\n" for r in records))
    curves = dict(plot_logs.panel_curves(["test_ema_loss_ce"], "ema"))
    assert [c[0] for c in curves["loss"]] == ["train_loss", "test_ema_loss"]
    assert [c[:2] for c in curves["AP"]] == [("test_ema_coco_eval_bbox", 0)]
    assert [c[0] for c in curves["loss_ce"]] == ["train_loss_ce", "test_ema_loss_ce"]
    assert [c[0] for c in dict(plot_logs.panel_curves([], "both"))["AP50"]] == ["test_coco_eval_bbox",
                                                                                "test_ema_coco_eval_bbox"]
    assert plot_logs._series(records, "test_ema_coco_eval_bbox", 0) == ([0, 1, 2], [0.0, 0.2, 0.4])
    assert plot_logs.main([str(run), "--out", str(tmp_path / "ema.png"), "--weights", "both"]).is_file()
    (run / "log.txt").write_text(json.dumps({"epoch": 0, "train_loss": 1.0, "test_loss": 1.0}) + "\n")
    with pytest.raises(SystemExit, match="no test_ema_\\* values in these logs .*--ema_decay"):
        plot_logs.main([str(run), "--out", str(tmp_path / "ema.png"), "--weights", "ema"])

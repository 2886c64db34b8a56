"""Tests of engine.py and runner.py: training / evaluation runs on a tiny synthetic COCO, exact resume, checkpoints,
optimiser groups, non-finite losses, and a two-process (gloo) run."""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine
import runner
from util import checkpoint as ckpt
from datasets import build_dataset
from main import parse_args
from models import build_model
from tools.make_synthetic_coco import make_synthetic_coco
from tiny_flags import ENGINE_TINY as TINY, ENGINE_SPARSE_DETR as SPARSE_DETR

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    make_synthetic_coco(root, num_train=8, num_val=4, seed=0, size=64)
    return root


def tiny_args(coco_root: Path, *extra: str):
    return parse_args([*TINY, "--coco_path", str(coco_root), *extra])


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines()]


def train_stats(record: dict) -> dict:
    return {k: v for k, v in record.items() if k.startswith("train_")}


@pytest.fixture(scope="module")
def sparse_runs(coco_root, tmp_path_factory) -> dict[str, Path]:
    """Sparse DETR, lr drop after every epoch, a moving average of the weights: 'full' trains 2 epochs straight;
    'resumed' trains 1 epoch, then a second run resumes its checkpoint for epoch 2."""
    full, resumed = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("resumed")
    common = [*SPARSE_DETR, "--lr_drop", "1", "--ema_decay", "0.7"]
    runner.run(tiny_args(coco_root, *common, "--epochs", "2", "--output_dir", str(full)))
    runner.run(tiny_args(coco_root, *common, "--epochs", "1", "--output_dir", str(resumed)))
    runner.run(tiny_args(coco_root, *common, "--epochs", "2", "--output_dir", str(resumed),
                         "--resume", str(resumed / "checkpoint.pth")))
    return {"full": full, "resumed": resumed}


# ----------------------------------------------------------------------------------------------
# Whole runs


def test_one_epoch_writes_checkpoint_and_log_then_resume_auto_continues(coco_root, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    record = runner.run(tiny_args(coco_root, "--epochs", "1", "--output_dir", str(out), "--resume", "auto"))
    assert "no checkpoint" in caplog.text and "starting a fresh run" in caplog.text
    assert (out / "checkpoint.pth").is_file()
    assert not (out / "checkpoint0000.pth").exists()  # only every 5 epochs and before lr drops (40 here)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pth", "config.json", "eval.json", "log.txt",
                                                     "train.log"]  # no temporary file left
    (line,) = read_log(out)
    assert line == record
    assert line["epoch"] == 0 and line["n_parameters"] > 0
    assert len(line["test_coco_eval_bbox"]) == 12 and all(-1 <= v <= 1 for v in line["test_coco_eval_bbox"])
    for key in ("train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou", "train_loss_giou_unscaled",
                "train_class_error", "train_lr", "train_grad_norm", "test_loss", "test_loss_ce", "test_class_error"):
        assert math.isfinite(line[key]), key
    assert line["train_lr"] == pytest.approx(2e-4)

    checkpoint = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "lr_scheduler", "epoch", "args", "scaler", "rng_state"} <= set(checkpoint)
    assert checkpoint["epoch"] == 0 and len(checkpoint["rng_state"]) == 1

    caplog.clear()
    runner.run(tiny_args(coco_root, "--epochs", "2", "--output_dir", str(out), "--resume", "auto"))
    assert "resuming from" in caplog.text
    assert [r["epoch"] for r in read_log(out)] == [0, 1]


def test_resume_reproduces_the_uninterrupted_run(sparse_runs):
    full, resumed = read_log(sparse_runs["full"]), read_log(sparse_runs["resumed"])
    assert [r["epoch"] for r in full] == [r["epoch"] for r in resumed] == [0, 1]
    assert train_stats(resumed[0]) == train_stats(full[0])
    # Epoch 2 restarts from the checkpoint: same weights, optimiser moments, lr schedule, data order, dropout.
    assert train_stats(resumed[1]) == train_stats(full[1])
    # The lr of epoch k is lr * 0.1^(k // lr_drop): the scheduler steps after each epoch, not before.
    assert [r["train_lr"] for r in full] == pytest.approx([2e-4, 2e-5])
    assert resumed[1]["test_loss"] == full[1]["test_loss"]
    # The moving average too: restored from the checkpoint, not restarted from the weights.
    assert resumed[1]["test_ema_loss"] == full[1]["test_ema_loss"] != full[1]["test_loss"]
    assert resumed[1]["test_ema_coco_eval_bbox"] == full[1]["test_ema_coco_eval_bbox"]
    a = torch.load(sparse_runs["full"] / "checkpoint.pth", map_location="cpu", weights_only=False)
    b = torch.load(sparse_runs["resumed"] / "checkpoint.pth", map_location="cpu", weights_only=False)
    for key in ("model", "model_ema"):
        assert list(a[key]) == list(b[key]) == list(a["model"])  # the model's keys, in its order
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    # Extra checkpoints before every lr drop (--lr_drop 1).
    assert (sparse_runs["full"] / "checkpoint0000.pth").is_file()
    assert (sparse_runs["full"] / "checkpoint0001.pth").is_file()


def test_eval_of_a_checkpoint_reproduces_the_logged_evaluation(coco_root, sparse_runs):
    out = sparse_runs["full"]
    stats = runner.run(tiny_args(coco_root, *SPARSE_DETR, "--eval", "--resume", str(out / "checkpoint0000.pth")))
    logged = read_log(out)[0]
    assert stats["test_coco_eval_bbox"] == logged["test_coco_eval_bbox"]
    assert stats["test_loss"] == pytest.approx(logged["test_loss"], rel=1e-6)
    assert stats["test_class_error"] == pytest.approx(logged["test_class_error"], rel=1e-6)
    ema = runner.run(tiny_args(coco_root, *SPARSE_DETR, "--eval", "--eval_weights", "ema", "--resume",
                               str(out / "checkpoint0000.pth")))
    assert ema["test_ema_coco_eval_bbox"] == logged["test_ema_coco_eval_bbox"]
    assert ema["test_ema_loss"] == pytest.approx(logged["test_ema_loss"], rel=1e-6) != stats["test_loss"]


# ----------------------------------------------------------------------------------------------
# Checkpoint loading


def test_checkpoint_of_another_variant_fails_with_the_cause(coco_root, sparse_runs):
    model, _, _ = build_model(tiny_args(coco_root))  # plain Deformable DETR
    checkpoint = ckpt.load_checkpoint(sparse_runs["full"] / "checkpoint.pth")
    flags = vars(tiny_args(coco_root))
    with pytest.raises(ckpt.CheckpointMismatchError) as info:
        runner.load_weights_strict(model, checkpoint, "sparse.pth", current_flags=flags, built_as="--model deformable")
    message = str(info.value)
    assert "missing from the checkpoint" in message and "unexpected in the checkpoint" in message
    assert "query_embed.weight" in message and "transformer.enc_mask_predictor" in message
    assert "--two_stage is True in the checkpoint but False now" in message
    # An official-style checkpoint holds only the weights: the cause is read from the key names.
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"--two_stage differs.*--rho differs"):
        runner.load_weights_strict(model, {"model": checkpoint["model"]}, "official.pth", current_flags=flags,
                                   built_as="--model deformable")


def test_finetune_skips_tensors_of_another_shape(coco_root, sparse_runs, caplog):
    caplog.set_level(logging.INFO)
    model, _, _ = build_model(tiny_args(coco_root, *SPARSE_DETR, "--num_classes", "7"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint = ckpt.load_checkpoint(sparse_runs["full"] / "checkpoint.pth")
    ckpt.load_finetune_weights(model, checkpoint, "sparse.pth")
    after = model.state_dict()
    for key, value in checkpoint["model"].items():
        if key.endswith(("class_embed.0.weight", "class_embed.0.bias")) or "class_embed" in key:
            assert torch.equal(after[key], before[key]), key  # 4 classes there, 7 here: kept as initialised
        else:
            assert torch.equal(after[key], value), key
    assert "skipping class_embed.0.weight: shape (4, 64)" in caplog.text


def test_resume_auto_without_output_dir_and_finetune_with_resume_are_rejected(coco_root):
    with pytest.raises(SystemExit, match="--resume auto"):
        tiny_args(coco_root, "--resume", "auto")
    with pytest.raises(SystemExit, match="--finetune"):
        tiny_args(coco_root, "--resume", "a.pth", "--finetune", "b.pth")


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    ckpt.save_checkpoint({"epoch": 1}, path)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint({"epoch": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]
    assert torch.load(path, weights_only=False) == {"epoch": 1}


def test_checkpoint_paths_follow_the_reference():
    out = Path("out")
    names = {epoch: [p.name for p in ckpt.checkpoint_paths(out, epoch, lr_drop=40, keep_every=5)] for epoch in range(50)}
    assert names[0] == ["checkpoint.pth"]
    assert names[4] == ["checkpoint.pth", "checkpoint0004.pth"]
    assert names[39] == ["checkpoint.pth", "checkpoint0039.pth"]
    assert sum(len(n) == 2 for n in names.values()) == 10


def test_detr_keeps_a_numbered_checkpoint_every_100_epochs_and_before_the_drop():
    args = parse_args(["--model", "detr", "--device", "cpu", "--epochs", "500", "--lr_drop", "400"])
    assert args.checkpoint_every == 100 and parse_args(["--device", "cpu"]).checkpoint_every == 5
    kept = [epoch for epoch in range(args.epochs)
            if len(ckpt.checkpoint_paths(Path("out"), epoch, args.lr_drop, args.checkpoint_every)) == 2]
    assert kept == [99, 199, 299, 399, 499]


# ----------------------------------------------------------------------------------------------
# Training step pieces


def test_clipping_bounds_every_gradient_the_optimizer_applies(coco_root, tmp_path, monkeypatch):
    """A run with --clip_max_norm 0.001: each AdamW step sees gradients of total norm <= 0.001, while the
    logged norm (before clipping) is larger, so the bound did work."""
    norms, real_step = [], torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    record = runner.run(tiny_args(coco_root, "--epochs", "1", "--clip_max_norm", "0.001"))
    assert len(norms) == 4 and max(norms) <= 0.001 * (1 + 1e-5)
    assert record["train_grad_norm"] > 0.01


def test_training_order_and_augmentation_follow_the_seed(coco_root):
    """The batches of an epoch depend on --seed and the epoch: equal for equal seeds, different otherwise."""
    dataset = list(range(40))

    def batches(seed: int, epoch: int) -> list:
        loader = runner.build_data_loader(dataset, tiny_args(coco_root, "--seed", str(seed)), runner.DistContext(),
                                          train=True, device=torch.device("cpu"))
        assert loader.dataset.seed == seed  # each sample's augmentation is seeded from it too
        loader.batch_sampler.set_epoch(epoch)
        return [[index for _, index in batch] for batch in loader.batch_sampler]

    assert batches(1, 0) == batches(1, 0)
    assert batches(1, 0) != batches(2, 0)
    assert batches(1, 0) != batches(1, 1)


def test_a_non_finite_loss_skips_its_step_with_a_warning_naming_the_loss(coco_root, monkeypatch, caplog):
    args = tiny_args(coco_root)
    model, criterion, _ = build_model(args)
    loader = runner.build_data_loader(build_dataset("train", args), args, runner.DistContext(), train=True,
                                      device=torch.device("cpu"))
    optimizer = runner.build_optimizer(model, args, args.lr, args.lr_backbone)
    real_forward, calls = criterion.forward, []

    def second_call_is_nan(outputs, targets):
        losses = real_forward(outputs, targets)
        calls.append(1)
        if len(calls) == 2:
            losses["loss_giou"] = losses["loss_giou"] * float("nan")
        return losses

    monkeypatch.setattr(criterion, "forward", second_call_is_nan)
    steps = []
    real_step = optimizer.step
    monkeypatch.setattr(optimizer, "step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    result = engine.train_one_epoch(model, criterion, loader, optimizer, torch.device("cpu"), epoch=3)
    assert result.stopped is None and result.stats["nonfinite_steps"] == 1 and len(steps) == 3
    assert math.isfinite(result.stats["loss"])  # the skipped step is left out of the averages
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "skipped (" in r.getMessage()]
    assert warning.startswith("epoch 3, iteration 1 (batch 2 of 4): non-finite loss nan (loss_giou=nan); step "
                              "skipped (1 in a row; training stops at 10, see --max_nonfinite)")
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step was not applied


@pytest.mark.parametrize("variant", [[], SPARSE_DETR], ids=["deformable", "sparse_detr"])
def test_optimizer_param_groups(coco_root, variant):
    args = tiny_args(coco_root, *variant, "--lr", "1e-3", "--lr_backbone", "1e-4", "--lr_linear_proj_mult", "0.1")
    model, _, _ = build_model(args)
    optimizer = runner.build_optimizer(model, args, args.lr, args.lr_backbone)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3, 1e-4, 1e-4])
    assert len(lr_of) == sum(len(g["params"]) for g in optimizer.param_groups)  # no tensor in two groups
    names = {"backbone": 0, "linear": 0}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert id(param) not in lr_of, name
        elif "sampling_offsets" in name or "reference_points" in name:
            assert lr_of[id(param)] == pytest.approx(1e-4), name
            names["linear"] += 1
        elif name.startswith("backbone.0"):
            assert lr_of[id(param)] == pytest.approx(1e-4), name
            names["backbone"] += 1
        else:
            assert lr_of[id(param)] == pytest.approx(1e-3), name
    assert names["backbone"] > 0 and names["linear"] > 0


@pytest.mark.parametrize("model_name", ["detr", "sdetr"])
def test_detrs_learned_position_embedding_trains_at_the_backbone_rate(coco_root, model_name):
    """As DETR's main.py ("backbone" in the name): backbone.1 (the position embedding) joins the backbone group."""
    args = tiny_args(coco_root, "--model", model_name, "--position_embedding", "learned", "--lr_backbone", "1e-5",
                     "--dim_feedforward", "32", "--num_queries", "5", "--num_feature_levels", "1")
    model, _, _ = build_model(args)
    optimizer = runner.build_optimizer(model, args, args.lr, args.lr_backbone)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    embedding = [p for n, p in model.named_parameters() if n.startswith("backbone.1.")]
    assert embedding and all(lr_of[id(p)] == 1e-5 for p in embedding)
    deformable = tiny_args(coco_root, "--position_embedding", "learned")
    model, _, _ = build_model(deformable)
    optimizer = runner.build_optimizer(model, deformable, 2e-4, 2e-5)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert all(lr_of[id(p)] == 2e-4 for n, p in model.named_parameters() if n.startswith("backbone.1."))


def test_sqrt_lr_scaling(coco_root, caplog):
    caplog.set_level(logging.INFO)
    args = tiny_args(coco_root, "--lr_scaling", "sqrt", "--lr", "2e-4", "--lr_backbone", "2e-5", "--batch_size", "4")
    lr, lr_backbone = runner.scaled_learning_rates(args.lr, args.lr_backbone, scaling=args.lr_scaling,
                                                   batch_size=args.batch_size, world_size=2)
    assert (lr, lr_backbone) == pytest.approx((2e-4 * math.sqrt(8 / 16), 2e-5 * math.sqrt(8 / 16)))
    assert "lr 0.0002 -> 0.0001414" in caplog.text
    assert runner.scaled_learning_rates(2e-4, 0.0, scaling="none", batch_size=2, world_size=8) == (2e-4, 0.0)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_step(coco_root, amp):
    args = tiny_args(coco_root, "--amp", amp)
    model, criterion, _ = build_model(args)
    loader = runner.build_data_loader(build_dataset("train", args), args, runner.DistContext(), train=True,
                                      device=torch.device("cpu"))
    optimizer = runner.build_optimizer(model, args, args.lr, args.lr_backbone)
    scaler = torch.amp.GradScaler("cpu", enabled=amp == "fp16")
    one_batch = [next(iter(loader))]
    stats = engine.train_one_epoch(model, criterion, one_batch, optimizer, torch.device("cpu"), 0, 0.1, scaler,
                                   runner.AMP_DTYPES[amp]).stats
    assert math.isfinite(stats["loss"])
    if amp == "fp16":  # the first steps may overflow at the initial scale: skipped and counted, never NaN in logs
        assert stats["skipped_steps"] in (0, 1)
        assert stats["skipped_steps"] == 1 or stats["grad_norm"] > 0
    else:
        assert "skipped_steps" not in stats and stats["grad_norm"] > 0


def test_resumed_schedule_follows_a_new_lr_drop():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=40)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    ckpt.set_lr_drop(scheduler, 4)  # epoch 10 with a drop every 4: two drops so far
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.001)  # third drop at epoch 12


# ----------------------------------------------------------------------------------------------
# Two processes


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_two_process_run_with_unused_parameters(coco_root, tmp_path):
    """torchrun, 2 CPU processes (gloo): box refinement without auxiliary losses leaves the first decoder
    layer's heads unused, so DDP needs find_unused_parameters. The moving average (--ema_decay) follows the
    unwrapped model: its keys have no DDP prefix. Each rank draws from its own random stream (seeded with
    --seed + rank): without dropout both draw alike, so equally seeded ranks would save equal states."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "main.py"), *TINY, "--coco_path", str(coco_root), "--with_box_refine", "--no_aux_loss",
               "--dec_layers", "2", "--epochs", "1", "--ema_decay", "0.7", "--dropout", "0", "--output_dir", str(out)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "find_unused_parameters=True" in result.stderr
    assert "[rank 0]" in result.stderr and "[rank 1] INFO" not in result.stderr
    (line,) = read_log(out)
    assert len(line["test_coco_eval_bbox"]) == 12 and math.isfinite(line["train_loss"])
    checkpoint = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert len(checkpoint["rng_state"]) == 2
    assert not torch.equal(checkpoint["rng_state"][0]["torch"], checkpoint["rng_state"][1]["torch"])
    assert list(checkpoint["model_ema"]) == list(checkpoint["model"]) and len(line["test_ema_coco_eval_bbox"]) == 12


@pytest.mark.parametrize("model_name", ["detr", "sdetr"])
def test_one_training_epoch_of_detr_and_sdetr(coco_root, tmp_path, model_name):
    flags = ["--model", model_name, "--backbone", "resnet18", "--backbone_from_scratch", "--hidden_dim", "32",
             "--nheads", "2", "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "32",
             "--num_queries", "6", "--num_classes", "4", "--batch_size", "2", "--num_workers", "0", "--device", "cpu",
             "--scales", "64", "--val_size", "64", "--max_size", "64", "--epochs", "1",
             "--coco_path", str(coco_root), "--output_dir", str(tmp_path)]
    if model_name == "sdetr":
        flags += ["--sdetr_stage1_enc_layers", "1", "--sdetr_stage1_dec_layers", "1", "--sdetr_stage1_enc_heads", "2",
                  "--sdetr_stage1_dec_heads", "2", "--sdetr_stage2_enc_layers", "1", "--sdetr_stage2_dec_layers", "1",
                  "--sdetr_stage2_dec_heads", "2"]
    runner.run(parse_args(flags))
    record = read_log(tmp_path)[0]
    assert math.isfinite(record["train_loss"]) and len(record["test_coco_eval_bbox"]) == 12
    assert (tmp_path / "checkpoint.pth").is_file()


def test_detections_do_not_depend_on_the_eval_batch_size(coco_root):
    """Images of equal size are not padded in a batch, so batching changes nothing (padding does:
    see README, "Evaluate")."""
    torch.manual_seed(0)
    args = tiny_args(coco_root, *SPARSE_DETR)
    model, _, postprocessors = build_model(args)
    model.eval()
    dataset = build_dataset("val", args)
    images = [dataset[i][0] for i in range(len(dataset))]
    sizes = torch.tensor([list(img.shape[-2:]) for img in images])
    with torch.no_grad():
        one_by_one = [postprocessors["bbox"](model([img]), sizes[i:i + 1])[0] for i, img in enumerate(images)]
        batched = postprocessors["bbox"](model(images), sizes)
    for single, together in zip(one_by_one, batched):
        torch.testing.assert_close(together["scores"], single["scores"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(together["boxes"], single["boxes"], rtol=1e-4, atol=1e-3)

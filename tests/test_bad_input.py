"""The bad-input matrix for flags, checkpoints and weight files: each case ends in one ``error: ...``
message from main.py that names the problem and the fix (the data cases are in test_bad_data.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

import main
from main import parse_args
from models import build_model
from tools.make_synthetic_coco import make_synthetic_coco
from tiny_flags import BAD_INPUT_TINY as TINY, BAD_INPUT_SPARSE as SPARSE



@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    make_synthetic_coco(root, num_train=4, num_val=2, seed=0, size=64)
    return root


def run_main(*flags: str) -> str:
    """The message main.py exits with."""
    with pytest.raises(SystemExit) as info:
        main.main(parse_args(list(flags)))
    return str(info.value)


def save_model_checkpoint(path: Path, *flags: str, drop: str = "") -> Path:
    model, _, _ = build_model(parse_args([*TINY, *flags]))
    state_dict = {k: v for k, v in model.state_dict().items() if not (drop and k.startswith(drop))}
    torch.save({"model": state_dict, "args": parse_args([*TINY, *flags])}, path)
    return path


@pytest.mark.parametrize("flags,message", [
    (["--rho", "1.5", "--two_stage", "--with_box_refine"],
     "Invalid arguments:\n  --rho must be in [0, 1] (a fraction of tokens), got 1.5"),
    (["--rho", "0.1"],
     "Invalid arguments:\n  --rho needs --two_stage --with_box_refine (Sparse DETR scores tokens with the two-stage "
     "token projection); see configs/r50_sparse_detr_rho_0.1.sh"),
    (["--eff_query_init", "--two_stage"],
     "Invalid arguments:\n  --two_stage needs --with_box_refine (the decoder refines the proposal boxes, as in every "
     "published two-stage config)"),
    (["--clip_max_norm", "-1"],
     "Invalid arguments:\n  --clip_max_norm must be >= 0 (0 disables clipping), got -1.0"),
    (["--nheads", "0"], "Invalid arguments:\n  --nheads must be at least 1, got 0"),
    (["--num_workers", "-1"],
     "Invalid arguments:\n  --num_workers must be >= 0 (0 loads data in the main process), got -1"),
    (["--dropout", "1.5"], "Invalid arguments:\n  --dropout must be in [0, 1) (a probability), got 1.5"),
    (["--lr=-1e-4"], "Invalid arguments:\n  --lr must be >= 0, got -0.0001"),
    (["--lr_backbone=-1e-5"], "Invalid arguments:\n  --lr_backbone must be >= 0 (0 freezes the backbone), got -1e-05"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--nheads", "-2"],
     "Invalid arguments:\n  --device cuda: CUDA is not available here (no GPU, or a CPU-only PyTorch); use --device "
     "cpu" if not torch.cuda.is_available() else "Invalid arguments:\n  --nheads must be at least 1, got -2"),
    (["--batch_size", "0", "--eval"],
     "Invalid arguments:\n  --batch_size must be at least 1, got 0\n  --eval evaluates a checkpoint: add --resume PATH"),
])
def test_invalid_flags_list_every_problem_at_start_up(flags, message):
    with pytest.raises(SystemExit) as info:
        parse_args(["--device", "cpu", *flags])
    assert str(info.value) == message


def test_unknown_flag_names_the_flag(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--rho_typo", "0.1"])
    assert info.value.code == 2
    assert "error: unrecognized arguments: --rho_typo 0.1" in capsys.readouterr().err


def test_missing_resume_checkpoint(coco_root, tmp_path):
    path = tmp_path / "nowhere.pth"
    assert run_main(*TINY, "--coco_path", str(coco_root), "--resume", str(path)) == \
        f"error: checkpoint not found: {path}"


def test_eval_resume_auto_without_checkpoint(coco_root, tmp_path):
    assert run_main(*TINY, "--coco_path", str(coco_root), "--output_dir", str(tmp_path), "--eval",
                    "--resume", "auto") == f"error: --eval --resume auto: no checkpoint at {tmp_path / 'checkpoint.pth'}"


def test_checkpoint_that_is_not_a_checkpoint(coco_root, tmp_path):
    path = tmp_path / "weights.pth"
    torch.save([1, 2, 3], path)
    assert run_main(*TINY, "--coco_path", str(coco_root), "--eval", "--resume", str(path)) == (
        f"error: {path} is not a checkpoint: expected a dict with the model's state dict under 'model'")


def test_checkpoint_with_missing_keys(coco_root, tmp_path):
    path = save_model_checkpoint(tmp_path / "partial.pth", drop="class_embed")
    message = run_main(*TINY, "--coco_path", str(coco_root), "--eval", "--resume", str(path))
    assert message.startswith(f"error: the weights of {path} do not fit the model built from the current flags "
                              "(--model deformable).\n  missing from the checkpoint (2):\n    class_embed.0.weight\n"
                              "    class_embed.0.bias\n")
    assert message.endswith(
        "  likely cause: --num_classes or the number of heads (--dec_layers, --two_stage, --use_enc_aux_loss) "
        "differs.\n  Use the flags the checkpoint was trained with (e.g. the variant's configs/*.sh), or --finetune "
        "to load only the tensors that fit.")


def test_checkpoint_of_another_variant_names_the_flags(coco_root, tmp_path):
    path = save_model_checkpoint(tmp_path / "deformable.pth")
    message = run_main(*TINY, *SPARSE, "--coco_path", str(coco_root), "--eval", "--resume", str(path))
    # The checkpoint describes its model: the flags that cannot serve its weights are refused before anything loads.
    assert message == (f"error: {path} cannot be loaded with --with_box_refine True, --two_stage True, --rho 0.3, "
                       "--use_enc_aux_loss True: its weights were trained with --with_box_refine False, --two_stage "
                       "False, --rho 0.0, --use_enc_aux_loss False; drop those flags (the checkpoint supplies them), "
                       "or use --finetune to load only the tensors that fit")


def test_backbone_weights_of_another_network(coco_root, tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    flags = [f for f in TINY if f != "--backbone_from_scratch"]
    message = run_main(*flags, "--backbone", "resnet50", "--backbone_weights", str(path), "--coco_path",
                       str(coco_root))
    assert message.startswith("error: the backbone weights do not fit resnet50: 165 tensors missing (e.g. "
                              "['layer1.0.conv3.weight', ")
    assert message.endswith("Pass the ImageNet weights of resnet50 (torchvision's layout) or choose the matching "
                            "--backbone.")


def test_backbone_weights_file_that_is_not_a_state_dict(coco_root, tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2], path)
    flags = [f for f in TINY if f != "--backbone_from_scratch"]
    assert run_main(*flags, "--backbone_weights", str(path), "--coco_path", str(coco_root)) == (
        f"error: --backbone_weights {path}: expected a state dict, got a list. Pass a file saved with "
        "torch.save(model.state_dict(), path).")


def test_missing_backbone_weights_file(coco_root, tmp_path):
    path = tmp_path / "none.pth"
    flags = [f for f in TINY if f != "--backbone_from_scratch"]
    assert run_main(*flags, "--backbone_weights", str(path), "--coco_path", str(coco_root)) == (
        f"error: --backbone_weights {path}: no such file. Pass the path of a local weights file (e.g. torchvision's "
        "resnet50-0676ba61.pth, or swin_tiny_patch4_window7_224.pth of the official Swin release).")


@pytest.mark.parametrize("model_flags,classifier_outputs", [((), 7), (("--model", "detr"), 8)])
def test_eval_of_an_official_checkpoint_names_its_class_count(coco_root, tmp_path, model_flags, classifier_outputs):
    """An official checkpoint holds no args: the advice reads the class count off its classifier (DETR's has one
    output more, the no-object class), instead of leaving the user to guess. Bug caught: advice naming the
    dataset's count, or 91, or DETR's output count."""
    flags = [f for f in TINY if f not in ("--num_classes", "4")]
    model, _, _ = build_model(parse_args([*flags, *model_flags, "--num_classes", str(classifier_outputs - (
        1 if model_flags else 0))]))
    path = tmp_path / "official.pth"
    torch.save({"model": model.state_dict()}, path)  # no "args", as the released checkpoints
    message = run_main(*flags, *model_flags, "--num_classes", "4", "--coco_path", str(coco_root), "--eval",
                       "--resume", str(path))
    assert "likely cause: the checkpoint's classifier predicts 7 classes but the model was built with " \
           "--num_classes 4: pass --num_classes 7" in message

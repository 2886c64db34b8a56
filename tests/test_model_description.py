"""The model description (models/description.py) in checkpoints and config.json, and every entry point building
from it: main.py --eval/--resume, predict, visualize_sparsity, export, the API, torch.hub and model folders."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import main
import runner
from inference import Detector
from main import parse_args
from models.description import ModelDescription
from tiny_flags import ENGINE_SPARSE_DETR, ENGINE_TINY
from tools import export_onnx, predict, visualize_sparsity
from tools.make_synthetic_coco import make_synthetic_coco
from util.checkpoint import load_checkpoint
from util.errors import InputError

# Trained at 128 px (the flags' default is 800 / 1333): a tool that ignores the stored sizes sees other images.
SIZES = ["--scales", "128", "--val_size", "128", "--max_size", "128"]
# The model flags of the run; the tools get none of them.
MODEL_FLAGS = [*ENGINE_SPARSE_DETR, "--num_classes", "4"]


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    make_synthetic_coco(root, num_train=4, num_val=2, seed=0, size=64)
    return root


@pytest.fixture(scope="module")
def run_dir(coco_root, tmp_path_factory) -> Path:
    """A tiny Sparse DETR run of one epoch with --tensorboard (whose stored flags once blocked every tool)."""
    pytest.importorskip("tensorboard")
    out = tmp_path_factory.mktemp("run")
    runner.run(parse_args([*ENGINE_TINY, *MODEL_FLAGS, *SIZES, "--coco_path", str(coco_root), "--epochs", "1",
                           "--output_dir", str(out), "--tensorboard"]))
    return out


@pytest.fixture(scope="module")
def image(coco_root) -> Path:
    return sorted((coco_root / "val2017").iterdir())[0]


def test_checkpoint_and_config_json_hold_the_description(run_dir, coco_root):
    """Catches a description missing from the checkpoint or config.json, one not loadable with weights_only, the
    training set's class names or the trained sizes left out."""
    checkpoint = load_checkpoint(run_dir / "checkpoint.pth")  # weights_only, Namespace allowed for "args"

    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (str, int, float, bool))

    assert plain(checkpoint["model_description"])
    stored = ModelDescription.from_dict(checkpoint["model_description"])
    names = {c["id"]: c["name"] for c in json.loads((coco_root / "annotations" / "instances_val2017.json").read_text())
             ["categories"]}
    assert stored.class_names() == names and len(names) >= 2
    assert (stored.val_size, stored.max_size, stored.rho, stored.num_classes, stored.hidden_dim) == (128, 128, 0.3, 4, 64)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model_description"] == checkpoint["model_description"]
    assert config["flags"]["tensorboard"] is True and config["flags"]["lr_backbone"] == 0


def test_every_tool_and_the_api_build_the_stored_model_at_its_sizes(run_dir, image, tmp_path):
    """A run trained with --tensorboard at 128 px loads everywhere without model flags. Catches a tool that
    validates the training flags (--tensorboard without --output_dir), runs at 800/1333, or drops the names."""
    detector = Detector.from_checkpoint(run_dir / "checkpoint.pth")
    assert (detector.val_size, detector.max_size) == (128, 128)
    samples, _ = detector.preprocess([predict.open_rgb_image(image)])
    assert max(samples.tensors.shape[-2:]) == 128
    api = detector(image, threshold=0.0)[0]
    names = detector.description.class_names()
    assert [names.get(int(label), str(int(label))) for label in api["labels"]] == api["names"]
    assert set(api["names"]) & set(names.values())  # the training set's names, not COCO's

    results = predict.main(["--resume", str(run_dir / "checkpoint.pth"), str(image), "--out", str(tmp_path / "p"),
                            "--threshold", "0", "--device", "cpu"])
    api_boxes = api["boxes"].clamp(min=0)
    assert len(results) == len(api["scores"])
    assert [r["score"] for r in results] == pytest.approx(api["scores"].tolist(), abs=1e-5)
    assert results[0]["bbox"][:2] == pytest.approx(api_boxes[0, :2].tolist(), abs=0.01)

    sparsity = visualize_sparsity.load_detector(str(run_dir / "checkpoint.pth"), [], "cpu", None, None)
    assert (sparsity.val_size, sparsity.description) == (128, detector.description)
    cli, flags = export_onnx.parse_cli(["--resume", str(run_dir / "checkpoint.pth"), "--out", str(tmp_path / "m.onnx")])
    exported = export_onnx.build_detector(cli, flags)
    assert exported.model.transformer.rho == 0.3

    hub = torch.hub.load(str(Path(__file__).resolve().parents[1]), "detector", str(run_dir / "checkpoint.pth"),
                         source="local")
    assert torch.equal(hub(image)[0]["scores"], api["scores"])


def test_eval_resume_needs_no_model_flags(run_dir, coco_root):
    """--eval --resume CKPT alone evaluates the stored model; its AP equals the training run's last evaluation of
    the same weights. Catches main.py building the flags' default model (it would not even load)."""
    record = json.loads((run_dir / "log.txt").read_text().splitlines()[-1])
    stats = runner.run(parse_args(["--coco_path", str(coco_root), "--eval", "--resume", str(run_dir / "checkpoint.pth"),
                                   "--device", "cpu", "--num_workers", "0", "--batch_size", "2"]))
    assert stats["test_coco_eval_bbox"] == pytest.approx(record["test_coco_eval_bbox"], abs=1e-9)


def test_overrides_warn_or_are_refused(run_dir, caplog, image):
    """A flag given on top of a description wins with a warning naming both values; one the weights cannot serve is
    refused in one line. Catches silently different numbers (--rho 0.1 on a rho 0.3 model) and tracebacks."""
    path = str(run_dir / "checkpoint.pth")
    with caplog.at_level(logging.WARNING):
        args = parse_args(["--eval", "--resume", path, "--rho", "0.1", "--val_size", "96"])
    assert (args.rho, args.val_size, args.hidden_dim, args.max_size) == (0.1, 96, 64, 128)
    assert "--rho 0.1 given; the model of" in caplog.text and "was trained with 0.3: using 0.1" in caplog.text
    assert "--val_size 96 given" in caplog.text
    with pytest.raises(SystemExit) as refused:
        parse_args(["--eval", "--resume", path, "--hidden_dim", "128"])
    assert str(refused.value) == (f"error: {path} cannot be loaded with --hidden_dim 128: its weights were trained "
                                  "with --hidden_dim 64; drop those flags (the checkpoint supplies them), or use "
                                  "--finetune to load only the tensors that fit")
    # --resume auto with another rho continues with it, saying so.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        parse_args(["--resume", "auto", "--output_dir", str(run_dir), "--rho", "0.2"])
    assert "--rho 0.2 given" in caplog.text
    # The API: the same rules.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        detector = Detector.from_checkpoint(path, ["--rho", "0.1"])
    assert detector.description.rho == 0.1 and "was trained with 0.3" in caplog.text
    with pytest.raises(InputError, match="cannot be loaded with --num_classes 7"):
        Detector.from_checkpoint(path, ["--num_classes", "7"])
    # --finetune takes the architecture, not the sizes, and allows any override (only what fits loads).
    args = parse_args(["--finetune", path, "--num_classes", "9"])
    assert (args.rho, args.hidden_dim, args.num_classes, args.val_size) == (0.3, 64, 9, 800)


@pytest.mark.parametrize("field,value,message", [
    ("num_queries", 10 ** 9, "'num_queries' is 1000000000, outside [1, 10000]"),
    ("hidden_dim", "256", "'hidden_dim' must be an integer, got '256'"),
    ("val_size", True, "'val_size' must be an integer, got True"),
    ("categories", [{"id": 1}], "'categories' must be a list of {id: integer, name: string} entries"),
    ("std", [0.2, 0.0, 0.2], "'std' is [0.2, 0.0, 0.2]: every value must be > 0"),
])
def test_an_absurd_stored_description_is_refused_before_anything_is_built(run_dir, tmp_path, field, value, message):
    """Catches a description trusted as stored: 1e9 queries would allocate hundreds of GB."""
    checkpoint = load_checkpoint(run_dir / "checkpoint.pth")
    checkpoint["model_description"][field] = value
    path = tmp_path / "bad.pth"
    torch.save(checkpoint, path)
    with pytest.raises(InputError) as error:
        Detector.from_checkpoint(path)
    assert message in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(SystemExit) as refused:
        parse_args(["--eval", "--resume", str(path)])
    assert message in str(refused.value)


def test_a_model_folder_round_trips(run_dir, image, tmp_path):
    """config.json + model.safetensors give back the same detections and names, through the API, predict and
    torch.hub. Catches a folder missing weights shared by two keys, or its description's sizes or names."""
    detector = Detector.from_checkpoint(run_dir / "checkpoint.pth")
    folder = detector.save(tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    again = Detector.from_checkpoint(folder)
    assert again.description == detector.description
    first, second = detector(image)[0], again(image)[0]
    assert torch.equal(first["boxes"], second["boxes"]) and first["names"] == second["names"]
    model, postprocessor = torch.hub.load(str(Path(__file__).resolve().parents[1]), "model", str(folder),
                                          source="local", return_postprocessor=True)
    assert not model.training and type(postprocessor).__name__ == "PostProcess"
    results = predict.main(["--resume", str(folder), str(image), "--out", str(tmp_path / "p"), "--threshold", "0",
                            "--device", "cpu"])
    assert [r["score"] for r in results] == pytest.approx(first["scores"].tolist(), abs=1e-5)
    with pytest.raises(InputError, match="holds no moving average"):
        Detector.from_checkpoint(folder, weights="ema")


def test_help_names_the_command_and_every_default(capsys):
    """Catches the parser without ArgumentDefaultsHelpFormatter (defaults hidden) and a usage line naming the
    project instead of the command."""
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: main.py ")
    assert "(default: 0.1)" in out and "(default: 1333)" in out and "(default: resnet50)" in out
    assert "(default: None)" not in out  # the per-model defaults are spelled out in the help instead


def test_config_script_gives_main_py_the_model_flags(tmp_path):
    """--config reads a configs/*.sh script's flags (from any folder); flags on the command line win."""
    args = parse_args(["--config", "configs/r50_sparse_detr_rho_0.3.sh", "--rho", "0.2", "--device", "cpu"])
    assert (args.rho, args.two_stage, args.use_enc_aux_loss) == (0.2, True, True)
    with pytest.raises(SystemExit, match="config script not found"):
        parse_args(["--config", str(tmp_path / "none.sh")])
    assert main.config_script_flags("configs/r50_sparse_detr_rho_0.3.sh")[:2] == ["--with_box_refine", "--two_stage"]

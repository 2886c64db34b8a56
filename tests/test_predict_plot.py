"""tools/predict.py (JSON detections + PNGs from a checkpoint) and tools/plot_logs.py (loss / AP curves)."""
import json
from pathlib import Path

import PIL.Image
import pytest
import torch

from main import parse_args
from models import build_model

TINY = ["--backbone", "resnet18", "--backbone_from_scratch", "--hidden_dim", "64", "--nheads", "2",
        "--enc_layers", "1", "--dec_layers", "1", "--dim_feedforward", "64", "--num_queries", "10",
        "--num_feature_levels", "2", "--num_classes", "5", "--device", "cpu"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random model saved the way training saves it (weights and args)."""
    folder = tmp_path_factory.mktemp("ckpt")
    args = parse_args(TINY)
    torch.manual_seed(0)
    model, _, _ = build_model(args)
    torch.save({"model": model.state_dict(), "args": args}, folder / "checkpoint.pth")
    torch.save({"model": model.state_dict()}, folder / "weights_only.pth")  # like an official checkpoint
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    PIL.Image.new("RGB", (96, 64), (200, 40, 40)).save(folder / "red.jpg")
    PIL.Image.new("RGB", (50, 80), (40, 200, 40)).save(folder / "green.png")
    (folder / "notes.txt").write_text("not an image")
    single = tmp_path_factory.mktemp("single") / "blue.jpg"
    PIL.Image.new("RGB", (70, 70), (40, 40, 200)).save(single)
    return folder, single


def test_predict_writes_json_and_pngs(checkpoint, images, tmp_path):
    from tools.predict import main as predict

    folder, single = images
    out = tmp_path / "preds"
    results = predict(["--resume", str(checkpoint / "checkpoint.pth"), str(folder), str(single), "--out", str(out),
                       "--threshold", "0", "--batch_size", "2", "--size", "64", "--max_size", "96",
                       "--device", "cpu"])
    detections = json.loads((out / "detections.json").read_text())
    assert detections == results and detections
    sizes = {"green.png": (50, 80), "red.jpg": (96, 64), "blue.jpg": (70, 70)}
    assert {d["file_name"] for d in detections} == set(sizes)
    ids = {d["file_name"]: d["image_id"] for d in detections}
    assert ids == {"green.png": 1, "red.jpg": 2, "blue.jpg": 3}  # folder in name order, then the file
    for det in detections:
        assert set(det) == {"image_id", "file_name", "category_id", "bbox", "score"}
        width, height = sizes[det["file_name"]]
        x, y, w, h = det["bbox"]
        assert 0 <= x <= x + w <= width + 0.01 and 0 <= y <= y + h <= height + 0.01
        assert 0 <= det["category_id"] < 5 and 0 <= det["score"] <= 1
    # Deformable DETR keeps the top 100 of queries x classes per image: 10 x 5 here.
    assert sum(d["file_name"] == "red.jpg" for d in detections) == 50
    for name, size in sizes.items():
        with PIL.Image.open(out / f"{Path(name).stem}.png") as png:
            assert png.format == "PNG" and png.size == size


def test_predict_threshold_official_checkpoint_flags_and_category_names(checkpoint, images, tmp_path):
    from tools.predict import category_names, main as predict

    folder, single = images
    base = ["--out", str(tmp_path / "a"), "--size", "64", "--max_size", "96", "--device", "cpu"]
    everything = predict(["--resume", str(checkpoint / "checkpoint.pth"), str(single), *base, "--threshold", "0"])
    kept = predict(["--resume", str(checkpoint / "checkpoint.pth"), str(single), *base, "--threshold", "0.5"])
    assert kept == [d for d in everything if d["score"] >= 0.5]
    assert predict(["--resume", str(checkpoint / "checkpoint.pth"), str(single), *base, "--threshold", "1.1"]) == []
    # Weights without args: the model flags come after --.
    official = predict(["--resume", str(checkpoint / "weights_only.pth"), str(single), *base, "--threshold", "0",
                        "--", *TINY])
    assert official == everything
    with pytest.raises(SystemExit, match="do not fit"):
        predict(["--resume", str(checkpoint / "weights_only.pth"), str(single), *base])  # defaults: R50, 91 classes
    with pytest.raises(SystemExit, match="not found"):
        predict(["--resume", str(checkpoint / "checkpoint.pth"), str(folder / "missing.jpg"), *base])

    annotations = {"images": [{"id": 42, "file_name": "blue.jpg"}],
                   "categories": [{"id": 1, "name": "apple"}, {"id": 3, "name": "pear"}]}
    ann_path = tmp_path / "instances.json"
    ann_path.write_text(json.dumps(annotations))
    named = predict(["--resume", str(checkpoint / "checkpoint.pth"), str(single), *base, "--threshold", "0",
                     "--categories", str(ann_path)])
    assert {d["image_id"] for d in named} == {42}
    assert category_names(5, annotations) == {1: "apple", 3: "pear"}
    assert category_names(91, None)[1] == "person" and category_names(91, None)[90] == "toothbrush"
    assert len(category_names(91, None)) == 80 and category_names(5, None) == {}


def _write_log(folder, ap_offset):
    folder.mkdir(parents=True)
    lines = []
    for epoch in range(4):
        lines.append(json.dumps({
            "epoch": epoch, "train_loss": 10 - epoch, "test_loss": 11 - epoch, "train_loss_ce": 1.0 / (epoch + 1),
            "test_loss_ce": 1.2 / (epoch + 1), "train_lr": 2e-4, "n_parameters": 123,
            "test_coco_eval_bbox": [0.1 * epoch + ap_offset, 0.2 * epoch + ap_offset] + [0.0] * 10}))
    lines.insert(2, "")
    (folder / "log.txt").write_text("\n".join(lines) + "\n")


def test_plot_logs_writes_a_png(tmp_path):
    from tools.plot_logs import main as plot_logs, read_log, run_labels

    _write_log(tmp_path / "rho_0.1", 0.0)
    _write_log(tmp_path / "rho_0.3", 0.05)
    # A resumed run writes an epoch again: the last record wins.
    with (tmp_path / "rho_0.3" / "log.txt").open("a") as f:
        f.write(json.dumps({"epoch": 3, "train_loss": 1.0, "test_loss": 2.0}) + "\n")
    assert [r["epoch"] for r in read_log(tmp_path / "rho_0.3")] == [0, 1, 2, 3]
    assert read_log(tmp_path / "rho_0.3")[-1]["train_loss"] == 1.0
    out = tmp_path / "plots" / "rho.png"
    assert plot_logs([str(tmp_path / "rho_0.1"), str(tmp_path / "rho_0.3" / "log.txt"), "--out", str(out),
                      "--keys", "loss_ce"]) == out
    with PIL.Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] > 800
    assert run_labels([tmp_path / "rho_0.1", tmp_path / "rho_0.3"]) == ["rho_0.1", "rho_0.3"]
    with pytest.raises(SystemExit, match="no log.txt"):
        plot_logs([str(tmp_path), "--out", str(out)])

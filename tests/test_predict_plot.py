"""tools/predict.py (JSON detections + PNGs from a checkpoint) and tools/plot_logs.py (loss / AP curves)."""
import json
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import pytest
import torch

from main import parse_args
from models import build_model
from tiny_flags import PREDICT_TINY as TINY



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
    from datasets.coco_names import category_names
    from tools.predict import main as predict

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


def _predict_args(checkpoint, *inputs, out) -> list[str]:
    return ["--resume", str(checkpoint / "checkpoint.pth"), *map(str, inputs), "--out", str(out), "--threshold", "0",
            "--size", "64", "--max_size", "96", "--device", "cpu"]


def test_predict_skips_an_unreadable_image_and_writes_the_others(checkpoint, tmp_path, caplog):
    from tools.predict import main as predict

    folder = tmp_path / "photos"
    folder.mkdir()
    PIL.Image.new("RGB", (60, 40), (200, 40, 40)).save(folder / "a.jpg")
    (folder / "b.jpg").write_bytes(b"not a JPEG")
    PIL.Image.new("RGB", (40, 60), (40, 200, 40)).save(folder / "c.png")
    out = tmp_path / "preds"
    results = predict([*_predict_args(checkpoint, folder, out=out), "--batch_size", "2"])
    assert {d["file_name"]: d["image_id"] for d in results} == {"a.jpg": 1, "c.png": 3}
    assert json.loads((out / "detections.json").read_text()) == results
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png", "detections.json"]
    (message,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert message.startswith(f"cannot read image {folder / 'b.jpg'} (") and message.endswith(
        "): skipped, no detections or PNG for it")
    with pytest.raises(SystemExit, match=r"^none of the 1 images can be read \(see the warnings\): nothing written"):
        predict(_predict_args(checkpoint, folder / "b.jpg", out=tmp_path / "none"))
    assert not (tmp_path / "none" / "detections.json").exists()


def test_predict_refuses_an_out_folder_in_the_inputs_and_never_overwrites_an_input(checkpoint, tmp_path):
    from tools.predict import main as predict

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    PIL.Image.new("RGB", (60, 40), (200, 40, 40)).save(folder / "a.png")
    original = (folder / "a.png").read_bytes()
    for out, where in ((folder, "the input folder"), (folder / "sub" / "preds", "inside the input folder")):
        with pytest.raises(SystemExit) as info:
            predict(_predict_args(checkpoint, folder, out=out))
        assert str(info.value) == (f"--out {out} is {where} {folder}: the PNGs written there could overwrite its images; "
                                   "choose an --out folder outside the input folders")
    # The file itself as input, --out its folder: its PNG gets another name.
    predict(_predict_args(checkpoint, folder / "a.png", out=folder))
    assert (folder / "a.png").read_bytes() == original
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "a_1.png", "detections.json", "sub"]


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


BAD_LOGS = {
    "binary": (b"\x89PNG\r\n\x1a\n\xff\xfe", "{path} is not a text log (byte 0 is not UTF-8): give a run folder or its "
               "log.txt, one JSON object per epoch"),
    "null_lines": (b"null\nnull\n", '{path} holds no epoch record (a JSON object with an integer "epoch" per line): '
                   "is it the log.txt of a training run?"),
    "no_records": (b'{"train_loss": 1}\n[1, 2]\nnot json\n{"epoch": "one"}\n',
                   '{path} holds no epoch record (a JSON object with an integer "epoch" per line): is it the log.txt '
                   "of a training run?"),
}


@pytest.mark.parametrize("case", BAD_LOGS)
def test_plot_logs_with_a_bad_log_gives_one_line(tmp_path, case):
    from tools.plot_logs import main as plot_logs

    content, message = BAD_LOGS[case]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.txt").write_bytes(content)
    with pytest.raises(SystemExit) as info:
        plot_logs([str(tmp_path / "run"), "--out", str(tmp_path / "curves.png")])
    assert str(info.value) == message.format(path=tmp_path / "run" / "log.txt")


def test_plot_logs_skips_bad_lines_with_one_warning_and_checks_the_out_extension(tmp_path, caplog, capsys):
    from tools.plot_logs import main as plot_logs

    _write_log(tmp_path / "run", 0.0)
    with (tmp_path / "run" / "log.txt").open("a") as f:
        f.write('null\n{"epoch": null}\n')
    out = plot_logs([str(tmp_path / "run"), "--out", str(tmp_path / "curves")])
    assert out == tmp_path / "curves.png" and out.is_file()
    assert capsys.readouterr().out == f"wrote {tmp_path / 'curves.png'}\n"
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f'{tmp_path / "run" / "log.txt"}: 2 lines are not JSON objects with an integer "epoch", skipped (e.g. line 6, 7)']
    with pytest.raises(SystemExit) as info:
        plot_logs([str(tmp_path / "run"), "--out", str(tmp_path / "curves.xyz")])
    assert str(info.value).startswith(f"--out {tmp_path / 'curves.xyz'}: cannot write '.xyz' images; use one of ")
    assert str(info.value).endswith(" (e.g. .png)") and ".png, " in str(info.value)


def test_caption_labels_stay_inside_the_image():
    """Catches: labels cut off at the right edge of small images ("triar", "square 0.7" in issue #29), a label
    moved inside the box when there was room above, or pushed off the top when the box is at the bottom."""
    from util.draw import caption_box
    # (left, top, right, bottom), inclusive; the label is the text plus 4 px wide, 2 px high.
    assert caption_box((50, 30), (30, 11), (64, 48)) == (29, 17, 63, 30)  # moved left: ends at column 63
    assert caption_box((10, 20), (30, 11), (64, 48)) == (10, 7, 44, 20)  # room above: unchanged
    assert caption_box((10, 5), (30, 11), (64, 48)) == (10, 5, 44, 18)  # no room above: inside the box
    assert caption_box((10, 3), (30, 11), (64, 14)) == (10, 0, 44, 13)  # inside the box would pass the bottom: up
    assert caption_box((5, 20), (80, 11), (64, 48)) == (0, 7, 84, 20)  # wider than the image: from its left edge


def test_a_caption_at_the_right_edge_is_drawn_whole():
    """Catches: the drawn label not the one caption_box places (cut at the image edge)."""
    from util.draw import caption_box, caption_font, draw_boxes
    canvas = PIL.Image.new("RGB", (64, 48))
    color = (230, 25, 75)
    draw_boxes(canvas, [(50, 30, 63, 47)], [color], ["square 0.7"], line_width=1)
    draw = PIL.ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), "square 0.7", font=caption_font(canvas.size))
    label = caption_box((50, 30), (right - left, bottom - top), canvas.size)
    assert label[2] == 63 and label[0] < 50
    row = [canvas.getpixel((x, label[1])) for x in range(64)]
    assert [x for x, pixel in enumerate(row) if pixel == color] == list(range(label[0], 64))

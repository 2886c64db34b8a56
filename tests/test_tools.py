"""Command-line tools on tiny random models."""
import re

import PIL.Image
import pytest
import torch

from main import parse_args
from models import build_model

from test_models_tiny import SPARSE, TINY


def test_visualize_sparsity_writes_a_png(tmp_path):
    from tools.visualize_sparsity import main as visualize

    args = parse_args([*TINY, *SPARSE, "--rho", "0.2"])
    torch.manual_seed(0)
    model, _, _ = build_model(args)
    torch.save({"model": model.state_dict(), "args": args}, tmp_path / "checkpoint.pth")
    PIL.Image.new("RGB", (80, 60), (120, 30, 200)).save(tmp_path / "image.jpg")
    out = tmp_path / "new_folder" / "sparsity.png"  # a missing folder is created
    visualize(["--resume", str(tmp_path / "checkpoint.pth"), "--image", str(tmp_path / "image.jpg"),
               "--out", str(out), "--size", "64", "--max_size", "96"])
    with PIL.Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] > 300


def test_visualize_sparsity_with_a_bad_image_or_out_gives_one_line(tmp_path):
    from tools.visualize_sparsity import main as visualize

    (tmp_path / "checkpoint.pth").write_bytes(b"never loaded: the inputs are checked first")
    (tmp_path / "notes.jpg").write_text("not an image")
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "image.png")
    cases = {
        "notes.jpg": f"cannot read image {tmp_path / 'notes.jpg'} (cannot identify image file "
                     f"{str(tmp_path / 'notes.jpg')!r}): give an image file PIL can decode (JPEG, PNG, ...)",
        ".": f"--image {tmp_path / '.'} is a folder: give a file",
        "missing.jpg": f"file not found: {tmp_path / 'missing.jpg'}",
    }
    for name, message in cases.items():
        with pytest.raises(SystemExit) as info:
            visualize(["--resume", str(tmp_path / "checkpoint.pth"), "--image", str(tmp_path / name),
                       "--out", str(tmp_path / "out.png")])
        assert str(info.value) == message
    with pytest.raises(SystemExit, match=r"^--out .*out.bmpx: cannot write '.bmpx' images; use one of "):
        visualize(["--resume", str(tmp_path / "checkpoint.pth"), "--image", str(tmp_path / "image.png"),
                   "--out", str(tmp_path / "out.bmpx")])


def tiny_demo_run(tmp_path, num_val: int):
    """Synthetic data with ``num_val`` val images in ``tmp_path/data``, an empty ``tmp_path/run``, and a tiny
    random Sparse DETR for them: ``(run folder, model, its args)``."""
    from tools.make_synthetic_coco import make_synthetic_coco

    make_synthetic_coco(tmp_path / "data", num_train=1, num_val=num_val, seed=0, size=64)
    run = tmp_path / "run"
    run.mkdir()
    args = parse_args([*TINY, *SPARSE, "--rho", "0.2", "--num_classes", "4", "--val_size", "64", "--max_size", "64"])
    torch.manual_seed(0)
    model, _, _ = build_model(args)
    return run, model, args


def test_demo_report_writes_curves_and_predictions(tmp_path):
    import json

    from tools.demo_report import main as report

    run, model, args = tiny_demo_run(tmp_path, num_val=3)
    torch.save({"model": model.state_dict(), "args": args}, run / "checkpoint.pth")
    stats = [0.1 * (i + 1) for i in range(12)]
    records = [{"epoch": 0, "train_loss": 3.0, "test_loss": 2.5, "test_coco_eval_bbox": [0.0] * 12},
               {"epoch": 1, "train_loss": 2.0, "test_loss": 1.5, "test_coco_eval_bbox": stats}]
    (run / "log.txt").write_text("".join(json.dumps(r) + "\n" for r in records))

    result = report([str(run), "--coco_path", str(tmp_path / "data"), "--num_images", "3", "--threshold", "0"])
    assert result["AP"] == 0.1 and result["AP50"] == 0.2
    for name in ("curves.png", "predictions.png"):
        with PIL.Image.open(run / name) as png:
            assert png.format == "PNG" and png.size[0] > 300


def test_demo_report_with_ema_weights_draws_and_reports_the_average(tmp_path, capsys):
    import json

    from tools.demo_report import main as report

    run, model, args = tiny_demo_run(tmp_path, num_val=2)
    # raw weights that cannot run (NaN): only the average gives detections
    raw = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"model": raw, "model_ema": model.state_dict(), "args": args}, run / "checkpoint.pth")
    raw_stats, ema_stats = [0.1] * 12, [0.5 + 0.01 * i for i in range(12)]
    (run / "log.txt").write_text(json.dumps({"epoch": 0, "train_loss": 3.0, "test_loss": 2.5,
                                             "test_coco_eval_bbox": raw_stats,
                                             "test_ema_coco_eval_bbox": ema_stats}) + "\n")

    result = report([str(run), "--coco_path", str(tmp_path / "data"), "--num_images", "2", "--threshold", "0",
                     "--weights", "ema"])
    assert result["AP"] == 0.5 and result["AP50"] == 0.51
    assert "moving average" in capsys.readouterr().out
    # a run without the average says so
    (run / "log.txt").write_text(json.dumps({"epoch": 0, "test_loss": 1.0, "test_coco_eval_bbox": raw_stats}) + "\n")
    with pytest.raises(SystemExit, match="no test_ema_"):
        report([str(run), "--coco_path", str(tmp_path / "data"), "--num_images", "2", "--weights", "ema"])


def test_visualize_sparsity_figure_counts_the_kept_tokens_and_shows_the_image_once():
    """Catches: the image repeated in every row, per-level counts that do not add up to the model's kept count
    (int(tokens * rho) + 1), a level's token total that is not its grid, missing colour bars."""
    from inference import Detector
    from tools.visualize_sparsity import figure, sparsity_maps

    detector = Detector.from_flags([*TINY, *SPARSE, "--rho", "0.2"], val_size=64, max_size=96)
    image = PIL.Image.new("RGB", (80, 60), (120, 30, 200))
    samples, _ = detector.preprocess([image])
    maps = sparsity_maps(detector.model, samples)
    fig = figure(image, maps, 0.2)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles.count("image") == 1 and sum(len(ax.images) for ax in fig.axes if ax.get_title() == "image") == 1
    grids = [m.shape for m in maps["saliency"]]  # 64x85 image: strides 8, 16, 32, 64
    assert grids == [(8, 11), (4, 6), (2, 3), (1, 2)]
    kept = [re.fullmatch(r"level \d: kept (\d+) of (\d+) tokens \(\d\.\d\d\)", t) for t in titles if "kept" in t]
    counts = [(int(m.group(1)), int(m.group(2))) for m in kept if m]
    assert [c[1] for c in counts] == [h * w for h, w in grids]
    assert sum(c[0] for c in counts) == int(120 * 0.2) + 1 == 25
    assert {ax.get_ylabel() for ax in fig.axes} >= {"score (sigmoid)", "DAM (last level)"}  # the colour bars
    import matplotlib.pyplot as plt
    plt.close(fig)

"""inference.py: the Detector API on every input kind, class names, config scripts and weight choice."""
import json

import numpy as np
import PIL.Image
import pytest
import torch

from main import parse_args
from models import build_model
from inference import Detector, to_pil
from model_config import config_script_flags
from tiny_flags import PREDICT_TINY as TINY
from util.errors import InputError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model saved as training saves it, plus a copy whose EMA weights differ from the raw ones."""
    folder = tmp_path_factory.mktemp("ckpt")
    args = parse_args(TINY + ["--val_size", "64", "--max_size", "96"])
    torch.manual_seed(0)
    model, _, _ = build_model(args, load_backbone_weights=False)
    state = model.state_dict()
    torch.save({"model": state, "args": args}, folder / "checkpoint.pth")
    ema = {k: v + 0.05 if v.is_floating_point() else v for k, v in state.items()}
    torch.save({"model": state, "model_ema": ema, "args": args}, folder / "with_ema.pth")
    return folder


@pytest.fixture(scope="module")
def image():
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, 60, 90), generator=g, dtype=torch.uint8)
    return pixels


def test_every_input_kind_gives_the_same_detections_in_pixels(checkpoint, image, tmp_path):
    """Catches: boxes left normalised or in the resized image's pixels, tensors preprocessed another way than
    files, a batch that mixes up its images, the stored --val_size ignored."""
    detector = Detector.from_checkpoint(checkpoint / "checkpoint.pth")
    pil = PIL.Image.fromarray(image.permute(1, 2, 0).numpy())
    pil.save(tmp_path / "a.png")
    other = PIL.Image.new("RGB", (40, 70), (10, 200, 30))
    results = detector([tmp_path / "a.png", pil, image, image.float() / 255, other])
    assert len(results) == 5
    for result in results[1:4]:
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(result[key], results[0][key]), key
    assert not torch.equal(results[4]["scores"], results[0]["scores"])
    # By hand: the model's output on the validation-resized image (shorter side 64), boxes scaled to 90x60.
    samples, sizes = detector.preprocess([pil])
    assert samples.tensors.shape[-2:] == (64, 96) and sizes.tolist() == [[60, 90]]
    with torch.no_grad():
        out = detector.model(samples)
    best = out["pred_logits"].sigmoid().flatten(1).argmax(1).item()
    cx, cy, w, h = out["pred_boxes"][0, best // out["pred_logits"].shape[2]].tolist()
    expected = torch.tensor([(cx - w / 2) * 90, (cy - h / 2) * 60, (cx + w / 2) * 90, (cy + h / 2) * 60])
    assert torch.allclose(results[0]["boxes"][0], expected, atol=1e-4)
    assert results[0]["scores"].tolist() == sorted(results[0]["scores"].tolist(), reverse=True)
    # A [B, 3, H, W] tensor is a batch; the threshold drops the rest.
    batch = detector(torch.stack([image, image]), threshold=float(results[0]["scores"][2]))
    assert len(batch) == 2 and len(batch[0]["scores"]) == 3


def test_class_names_from_categories_coco_or_ids(checkpoint, image):
    """Catches: names that do not follow the labels, COCO names given to a 5-class model."""
    by_id = Detector.from_checkpoint(checkpoint / "checkpoint.pth")(image)[0]
    assert by_id["names"] == [str(label) for label in by_id["labels"].tolist()]
    categories = {"categories": [{"id": i, "name": f"class{i}"} for i in range(5)]}
    named = Detector.from_checkpoint(checkpoint / "checkpoint.pth", categories=categories)(image)[0]
    assert named["names"] == [f"class{label}" for label in named["labels"].tolist()]
    from datasets.coco_names import category_names
    assert category_names(91, None)[18] == "dog" and category_names(5, None) == {}


def test_ema_weights_are_chosen_or_refused(checkpoint, image):
    """Catches: weights="ema" silently loading the raw weights, or an EMA-less checkpoint loading anything."""
    raw = Detector.from_checkpoint(checkpoint / "with_ema.pth")(image)[0]
    ema = Detector.from_checkpoint(checkpoint / "with_ema.pth", weights="ema")(image)[0]
    assert not torch.equal(raw["scores"], ema["scores"])
    with pytest.raises(InputError, match=r"holds no moving average of the weights \(no 'model_ema'"):
        Detector.from_checkpoint(checkpoint / "checkpoint.pth", weights="ema")


def test_official_checkpoint_with_flags_or_config_script(checkpoint, tmp_path):
    """Catches: a config script's flags misread (the shell's line continuations, "$@", --output_dir), flags
    ignored for a weights-only checkpoint."""
    assert config_script_flags("configs/r50_sparse_detr_rho_0.1.sh") == [
        "--with_box_refine", "--two_stage", "--eff_query_init", "--eff_specific_head", "--rho", "0.1",
        "--use_enc_aux_loss"]
    state = torch.load(checkpoint / "checkpoint.pth", weights_only=False)["model"]
    torch.save({"model": state}, tmp_path / "official.pth")
    script = tmp_path / "tiny.sh"
    script.write_text('#!/usr/bin/env bash\nexec python "$(dirname "$0")/../main.py" \\\n    --output_dir exps/x \\\n'
                      + "".join(f"    {flag} \\\n" for flag in TINY) + '    "$@"\n')
    from_script = Detector.from_checkpoint(tmp_path / "official.pth", flags=script)
    from_list = Detector.from_checkpoint(tmp_path / "official.pth", flags=TINY)
    assert from_script.model.transformer.d_model == from_list.model.transformer.d_model == 64
    with pytest.raises(InputError, match="do not fit"):
        Detector.from_checkpoint(tmp_path / "official.pth", flags=TINY + ["--with_box_refine"])
    with pytest.raises(InputError, match="config script not found"):
        Detector.from_checkpoint(tmp_path / "official.pth", flags=tmp_path / "missing.sh")


def test_predict_weights_flag_reaches_the_model(checkpoint, image, tmp_path):
    """Catches: tools/predict.py --weights ema ignored (raw weights loaded), or a checkpoint without an average
    loading silently."""
    from tools import predict
    PIL.Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "a.png")
    scores = {}
    for weights in ("raw", "ema"):
        out = tmp_path / f"out_{weights}"
        predict.main(["--resume", str(checkpoint / "with_ema.pth"), str(tmp_path / "a.png"), "--out", str(out),
                      "--threshold", "0", "--device", "cpu", "--size", "64", "--weights", weights])
        scores[weights] = [d["score"] for d in json.loads((out / "detections.json").read_text())]
    assert scores["raw"] != scores["ema"]
    with pytest.raises(SystemExit, match="holds no moving average"):
        predict.main(["--resume", str(checkpoint / "checkpoint.pth"), str(tmp_path / "a.png"), "--out",
                      str(tmp_path / "out_none"), "--device", "cpu", "--weights", "ema"])


def test_float_images_off_the_8_bit_grid_are_rounded_not_truncated(checkpoint, image):
    """Catches a float tensor truncated to 8 bits (``int(t * 255)``) instead of rounded: ``(x + 0.6) / 255`` must
    give the detections of the uint8 image ``x + 1``, and a grey of 0.5 (127.5) the pixel 128."""
    below_white = image.clamp(max=254)
    floats = (below_white.float() + 0.6) / 255
    rounded = below_white + 1
    assert np.array_equal(np.asarray(to_pil(floats)), rounded.permute(1, 2, 0).numpy())
    assert np.asarray(to_pil(torch.full((3, 2, 2), 0.5))).tolist() == [[[128] * 3] * 2] * 2
    detector = Detector.from_checkpoint(checkpoint / "checkpoint.pth")
    from_floats, from_rounded, from_truncated = detector([floats, rounded, below_white])
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(from_floats[key], from_rounded[key]), key
    assert not torch.equal(from_floats["scores"], from_truncated["scores"])  # one level off changes them

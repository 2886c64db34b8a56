"""inference.py on a user's mistakes: each gives one line naming the problem and the fix, never a traceback from
deep inside or silently other numbers (issue "Reliability, round 3": BAD 7-9 and the API arguments)."""
from __future__ import annotations

import json
import logging

import numpy as np
import PIL.Image
import pytest
import torch

from inference import Detector, to_pil
from tiny_flags import PREDICT_TINY
from util.errors import InputError

FLAGS = [*PREDICT_TINY, "--val_size", "64", "--max_size", "96"]


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector.from_flags(FLAGS)


@pytest.fixture(scope="module")
def checkpoint(detector, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    torch.save({"model": detector.model.state_dict(), "model_description": detector.description.to_dict()},
               folder / "checkpoint.pth")
    return folder / "checkpoint.pth"


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_16_bit_pil_image_is_scaled_as_its_file_is(tmp_path, detector):
    """BAD 7: a 16-bit PIL image object became pure white; the same file by path was right."""
    pixels = (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 21).astype(np.uint16)
    image = PIL.Image.fromarray(pixels)  # mode I;16
    image.save(tmp_path / "deep.png")
    from_object, from_file = to_pil(image), to_pil(tmp_path / "deep.png")
    assert from_object.mode == "RGB" and np.array_equal(np.asarray(from_object), np.asarray(from_file))
    assert len(np.unique(np.asarray(from_object))) > 200  # not a white (or black) frame
    first, second = detector([image, tmp_path / "deep.png"])
    assert torch.allclose(first["scores"], second["scores"], atol=1e-6)  # same pixels (batch rows may round apart)


def test_a_float_tensor_in_0_255_is_refused_not_clamped():
    """BAD 8: read_image(...).float() was clamped to [0, 1]: every non-zero pixel white, other detections."""
    image = torch.randint(0, 256, (3, 20, 30)).float()
    with pytest.raises(InputError) as error:
        to_pil(image)
    assert one_line(error).startswith("a float image tensor must hold values in [0, 1], got 0..255")
    with pytest.raises(InputError, match=r"values in \[0, 1\], got nan"):
        to_pil(torch.full((3, 4, 4), float("nan")))
    assert np.asarray(to_pil(image / 255)).max() == 255  # the documented way


@pytest.mark.parametrize("batch_size", [-1, 0, 2.5, "4", True])
def test_batch_size_below_one_or_not_a_count_is_refused(detector, batch_size):
    """BAD 9: batch_size=-1 returned [] silently, 0 raised range()'s error."""
    with pytest.raises(InputError) as error:
        Detector(model=detector.model, postprocessor=detector.postprocessor, description=detector.description,
                 batch_size=batch_size)
    assert one_line(error) == f"batch_size must be a whole number >= 1, got {batch_size!r}"


@pytest.mark.parametrize("threshold", ["0.5", 50, float("nan"), -0.1, None])
def test_threshold_outside_zero_one_is_refused(detector, threshold):
    """"0.5" was a TypeError deep inside; 50 and NaN silently gave nothing."""
    with pytest.raises(InputError) as error:
        detector(torch.zeros(3, 32, 32, dtype=torch.uint8), threshold=threshold)
    assert one_line(error) == f"threshold must be a score in [0, 1], got {threshold!r}"


@pytest.mark.parametrize("device", ["gpu", "CPU", "mps", 0])
def test_unknown_devices_are_refused_before_loading(checkpoint, device):
    with pytest.raises(InputError) as error:
        Detector.from_checkpoint(checkpoint, device=device)
    assert one_line(error) == f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}"


def test_a_torch_device_is_accepted(checkpoint):
    assert Detector.from_checkpoint(checkpoint, device=torch.device("cpu")).device == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_names_the_fix(checkpoint):
    with pytest.raises(InputError, match="CUDA is not available here .*use 'cpu'"):
        Detector.from_checkpoint(checkpoint, device="cuda")


@pytest.mark.parametrize("content,message", [
    ("not json", "is not JSON"),
    (json.dumps({"categories": [{"id": 1}]}), "categories must hold a COCO 'categories' list of {id, name} entries"),
])
def test_bad_categories_files(checkpoint, tmp_path, content, message):
    path = tmp_path / "categories.json"
    path.write_text(content)
    with pytest.raises(InputError) as error:
        Detector.from_checkpoint(checkpoint, categories=path)
    assert message in one_line(error)


def test_categories_as_a_list_is_refused(checkpoint):
    with pytest.raises(InputError) as error:
        Detector.from_checkpoint(checkpoint, categories=[{"id": 1, "name": "a"}])
    assert one_line(error) == "categories must be a COCO-format annotation file or its dict, got a list"


@pytest.mark.parametrize("value", ["800", -5, 0, 12.5])
def test_bad_sizes(checkpoint, value):
    with pytest.raises(InputError) as error:
        Detector.from_checkpoint(checkpoint, val_size=value)
    assert one_line(error) == f"val_size must be a positive whole number of pixels, got {value!r}"


def test_trust_accepts_only_a_bool(checkpoint):
    """trust="no" is truthy: it would unpickle without restriction."""
    with pytest.raises(InputError) as error:
        Detector.from_checkpoint(checkpoint, trust="no")
    assert one_line(error) == "trust must be True or False, got 'no'"


def test_a_config_script_path_works_from_another_folder(checkpoint, monkeypatch, tmp_path):
    """flags="configs/...sh" from another folder failed with "not found" while listing that very file."""
    monkeypatch.chdir(tmp_path)
    detector = Detector.from_flags("configs/r50_deformable_detr.sh", device="cpu")
    assert detector.description.num_queries == 300


def test_non_finite_weights_warn(detector, tmp_path, caplog):
    """NaN weights gave 0 detections silently."""
    state = {k: v.clone() for k, v in detector.model.state_dict().items()}
    state["class_embed.0.bias"][:] = float("nan")
    torch.save({"model": state, "model_description": detector.description.to_dict()}, tmp_path / "nan.pth")
    with caplog.at_level(logging.WARNING):
        Detector.from_checkpoint(tmp_path / "nan.pth")
    assert "holds non-finite weights in 1 tensors (e.g. ['class_embed.0.bias'])" in caplog.text

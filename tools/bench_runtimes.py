"""Other runtimes of a benchmarked model, timed beside PyTorch eager by ``benchmark.py model --runtimes``.

* ``onnxruntime``: the model exported by ``models.export`` (dynamo exporter, the attention's pure-PyTorch
  reference as ONNX GridSample), run by onnxruntime's CPU provider with as many intra-op threads as torch
  uses;
* ``compile``: ``torch.compile(model)`` (default mode); a row only where compiling succeeds.

Each is first checked against eager on the benchmark image: a runtime whose logits or boxes differ by more
than ``TOLERANCE`` (``models.export.DEFAULT_TOLERANCE``, that of ``export_onnx.py --verify``) gets no FPS (a
fast wrong answer is no result), only a note.
"""
from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.export import DEFAULT_TOLERANCE as TOLERANCE, OnnxDetector, export_onnx  # noqa: E402
from models.export_check import matched_differences  # noqa: E402
from models.heads import PostProcess  # noqa: E402
from util.misc import NestedTensor  # noqa: E402

logger = logging.getLogger(__name__)

RUNTIMES = ("eager", "onnxruntime", "compile")


class OnnxRuntimeModel:
    """An ONNX file run by onnxruntime, called like the model: NestedTensor of unpadded images (mask all
    False) -> ``{"pred_logits", "pred_boxes"}`` tensors."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, samples: NestedTensor) -> dict[str, torch.Tensor]:
        if samples.mask is not None and bool(samples.mask.any()):
            raise ValueError("the benchmark's ONNX graph takes unpadded batches (no pixel_mask input)")
        logits, boxes = self.session.run(["pred_logits", "pred_boxes"], {"images": samples.tensors.cpu().numpy()})
        return {"pred_logits": torch.from_numpy(logits), "pred_boxes": torch.from_numpy(boxes)}


def max_differences(expected: dict, got: dict) -> tuple[float, float]:
    """Max abs differences of logits and of boxes over the batch, each image's queries paired with their
    counterparts as ``export_onnx.py --verify`` pairs them (near-tied two-stage proposals may swap places)."""
    logits_diff = boxes_diff = 0.0
    for image in range(expected["pred_logits"].shape[0]):
        image_logits_diff, image_boxes_diff, _ = matched_differences(
            expected["pred_logits"][image].cpu(), expected["pred_boxes"][image].cpu(),
            got["pred_logits"][image].cpu(), got["pred_boxes"][image].cpu())
        logits_diff, boxes_diff = max(logits_diff, image_logits_diff), max(boxes_diff, image_boxes_diff)
    return logits_diff, boxes_diff


def runtime_models(name: str, model: torch.nn.Module, samples: NestedTensor, runtimes: list[str],
                   notes: list[str], workdir: Path) -> dict[str, Callable]:
    """``{"<name> (<runtime>)": callable}`` for each runtime of ``runtimes`` but eager that runs ``model`` (eval
    mode; the benchmark's models are all of the focal Deformable DETR family) and agrees with it on
    ``samples`` within ``TOLERANCE``; a note for each one that fails or differs."""
    with torch.no_grad():
        expected = model(samples)
    variants = {}
    for runtime in runtimes:
        if runtime == "eager":
            continue
        try:
            if runtime == "onnxruntime":
                if samples.tensors.device.type != "cpu":
                    notes.append(f"{name} (onnxruntime): skipped (the CPU provider only; use --device cpu)")
                    continue
                path = workdir / f"{name}.onnx"
                detector = OnnxDetector(model=model, postprocessor=PostProcess(focal=True)).eval()
                export_onnx(detector, path, example_size=tuple(samples.tensors.shape[-2:]))
                candidate = OnnxRuntimeModel(path, torch.get_num_threads())
            else:
                candidate = torch.compile(model)
            with torch.no_grad():
                got = candidate(samples)
        except Exception as error:  # noqa: BLE001 - whatever the exporter or compiler raises: a note, no row
            notes.append(f"{name} ({runtime}): failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
            continue
        logits_diff, boxes_diff = max_differences(expected, got)
        agreement = f"max |logits diff| {logits_diff:.1e}, max |boxes diff| {boxes_diff:.1e} from eager"
        if max(logits_diff, boxes_diff) > TOLERANCE:
            notes.append(f"{name} ({runtime}): not timed: {agreement}, over {TOLERANCE:g}")
            continue
        notes.append(f"{name} ({runtime}): {agreement}")
        variants[f"{name} ({runtime})"] = candidate
    return variants


def temporary_folder() -> tempfile.TemporaryDirectory:
    """Where the exported ONNX files live during the benchmark."""
    return tempfile.TemporaryDirectory(prefix="bench_onnx_")

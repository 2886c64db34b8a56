"""ONNX export of every detector of the family, and its check in onnxruntime against PyTorch.

The graph (:class:`OnnxDetector`) takes ``images`` [B, 3, H, W] float32, already preprocessed: RGB in [0, 1]
resized (shorter side 800, longer at most 1333 for the published models), minus the ImageNet mean
(0.485, 0.456, 0.406), divided by its std (0.229, 0.224, 0.225); B, H and W are dynamic. With
``with_mask`` it also takes ``pixel_mask`` [B, H, W] bool, True on padding (images of several sizes padded
at the bottom and right into one batch); without it every pixel is image. Outputs (boxes normalised to each
image's unpadded size: multiply x by its width and y by its height for pixels):

    pred_logits [B, Q, K] class logits, pred_boxes [B, Q, 4] (cx, cy, w, h);
    scores [B, N], labels [B, N] int64, boxes [B, N, 4] (x0, y0, x1, y1): the post-processed detections,
        N = 100 best (query, class) pairs for the Deformable DETR family, N = Q for DETR / SDETR;
    kept_counts [B] int32 (Sparse DETR): how many tokens each image's encoder updated;
    kept_tokens [B, K] int64 (Sparse DETR): which (flat indices over the levels, best first; K the batch's
        largest count, image b's are its first kept_counts[b]).

The file's ``metadata_props`` say how to feed it (:func:`onnx_metadata`: classes, size rule, mean and std,
the model's arguments, rho, opset); ``tools/onnx_predict.py`` reads them.

It is exported by ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` underneath): the multi-scale
deformable attention takes its pure-PyTorch reference (``grid_sample``: the ONNX GridSample operator, opset
>= 16), and Sparse DETR's kept-token count stays a function of each image's valid tokens (a TopK whose k
the graph computes). The TorchScript exporter (``dynamo=False``) is deprecated since torch 2.9 and records
Python ints as constants: it froze the level sizes and the kept count at the example's.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from util.errors import InputError
from util.misc import NestedTensor

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
MIN_OPSET = 16  # GridSample
DEFAULT_TOLERANCE = 1e-4  # max abs difference of logits and boxes, float32
MAX_SIDE = 4096
INPUT_NAMES = ("images", "pixel_mask")
METADATA_VERSION = 1


class OnnxDetector(nn.Module):
    """What the exported graph computes (see the module docstring): ``model`` on a preprocessed batch, plus
    the post-processing of ``postprocessor`` (``models.heads.PostProcess``) before scaling to pixels."""

    def __init__(self, *, model: nn.Module, postprocessor: nn.Module):
        super().__init__()
        self.model = model
        self.postprocessor = postprocessor

    def forward(self, images: Tensor, pixel_mask: Optional[Tensor] = None) -> dict[str, Tensor]:
        """images [B, 3, H, W] normalised; pixel_mask [B, H, W] bool, True on padding (None: no padding)."""
        if pixel_mask is None:
            pixel_mask = torch.zeros_like(images[:, 0], dtype=torch.bool)
        return self.select_outputs(self.model(NestedTensor(images, pixel_mask)))

    def select_outputs(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        """The graph's outputs (module docstring) of the model's output dict ``out``."""
        result = {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}
        result.update(self.postprocessor.select(out["pred_logits"], out["pred_boxes"]))
        if "sparse_token_nums" in out:
            result["kept_counts"] = out["sparse_token_nums"]
            result["kept_tokens"] = out["backbone_topk_proposals"]
        return result


def level_strides(model: nn.Module) -> list[int]:
    """The strides of the feature maps the transformer reads (DETR / SDETR: the backbone's last)."""
    strides = list(model.backbone.strides)
    levels = getattr(model, "num_feature_levels", None)
    if levels is None:
        return strides[-1:]
    strides = strides[:levels]
    while len(strides) < levels:
        strides.append(strides[-1] * 2)
    return strides


def min_side(model: nn.Module) -> int:
    """The smallest H and W the graph accepts: 64 px (the deepest map needs 2 px), more for two-stage models,
    whose images must give at least as many tokens as queries."""
    side = 64
    if two_stage(model):
        strides = level_strides(model)
        while sum(math.ceil(side / s) ** 2 for s in strides) < model.transformer.two_stage_num_proposals:
            side += 32
    return side


def output_names(detector: OnnxDetector, example: Tensor) -> list[str]:
    with torch.no_grad():
        return list(detector(example[:1]).keys())


def export_onnx(detector: OnnxDetector, out: str | Path, *, example_size: tuple[int, int], opset: int = DEFAULT_OPSET,
                with_mask: bool = False, seed: int = 0, metadata: Optional[Mapping[str, str]] = None,
                progress: Optional[Progress] = None, verbose: bool = False) -> list[str]:
    """Write ``detector`` (in eval mode, on the CPU) to ``out`` as ONNX with dynamic batch, H and W (from
    :func:`min_side` to 4096 px); traced on a batch of two random images of ``example_size`` (H, W).
    ``metadata`` (see :func:`onnx_metadata`) is stored in the file's ``metadata_props``. ``progress(step,
    seconds)`` is called as each step (trace, convert, optimize, write) starts (``seconds`` None) and ends.
    The exporter's own messages (e.g. one "Skipping constant folding" warning per Split) are shown only with
    ``verbose``. Returns the output names."""
    if opset < MIN_OPSET:
        raise InputError(f"--opset {opset}: the deformable attention needs GridSample, opset {MIN_OPSET} or later")
    low = min_side(detector.model)
    if min(example_size) < low or max(example_size) > MAX_SIDE:
        raise InputError(f"export size {example_size[0]}x{example_size[1]}: each side must be in [{low}, {MAX_SIDE}] "
                         "for this model")
    generator = torch.Generator().manual_seed(seed)
    # Two images: a batch of one would make torch.export fix B at 1.
    images = torch.randn(2, 3, *example_size, generator=generator)
    batch = torch.export.Dim("batch", min=1, max=64)
    height = torch.export.Dim("height", min=low, max=MAX_SIDE)
    width = torch.export.Dim("width", min=low, max=MAX_SIDE)
    args: tuple = (images,)
    shapes: tuple = ({0: batch, 2: height, 3: width},)
    if with_mask:
        args += (torch.zeros(2, *example_size, dtype=torch.bool),)
        shapes += ({0: batch, 1: height, 2: width},)
    names = output_names(detector, images)
    detector.eval()
    step = _Steps(progress)
    with torch.no_grad(), _exporter_messages(verbose):
        with step("trace"):
            exported = torch.export.export(detector, args, dynamic_shapes=shapes)
        with step("convert"):
            program = torch.onnx.export(exported, args, dynamo=True, opset_version=opset, optimize=False,
                                        input_names=list(INPUT_NAMES[:len(args)]), output_names=names,
                                        verbose=verbose)
        with step("optimize"):
            program.optimize()
    with step("write"):
        program.model.metadata_props.update(metadata or {})
        program.save(str(out))
    return names


Progress = Callable[[str, Optional[float]], None]


class _Steps:
    """``with steps("name"):`` calls ``progress("name", None)`` before and ``progress("name", seconds)`` after."""

    def __init__(self, progress: Optional[Progress]):
        self.progress = progress

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.progress:
            self.progress(name, None)
        start = time.perf_counter()
        yield
        if self.progress:
            self.progress(name, time.perf_counter() - start)


@contextlib.contextmanager
def _exporter_messages(verbose: bool) -> Iterator[None]:
    """Unless ``verbose``, silence the exporter's warnings (onnxscript's optimizer logs one per Split it cannot
    fold, torch.export warns about deprecated paths): they say nothing about the exported graph's correctness,
    which ``--verify`` checks."""
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export",
                                                    "torch._dynamo", "torch.fx.experimental.symbolic_shapes")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def onnx_metadata(*, class_names: Mapping[int, str], num_classes: int, val_size: int, max_size: int,
                  mean: Sequence[float], std: Sequence[float], description: Mapping[str, Any], rho: float,
                  opset: int, inputs: Sequence[str]) -> dict[str, str]:
    """The ``metadata_props`` of an exported file (ONNX allows string values only; lists and maps are JSON):

    ``class_names`` {"id": "name"} (the ids the model's labels mean; empty when unknown), ``num_classes``;
    ``val_size``, ``max_size`` (the size rule: shorter side ``val_size``, longer at most ``max_size``, sides
    truncated as datasets/transforms.py ``get_resize_hw``); ``mean``, ``std`` [3] (RGB in [0, 1]);
    ``description``: the model's main.py arguments; ``rho``; ``opset``; ``inputs`` (comma-separated);
    ``metadata_version``. ``tools/onnx_predict.py read_metadata`` reads them back."""
    return {
        "metadata_version": str(METADATA_VERSION),
        "class_names": json.dumps({str(int(k)): str(v) for k, v in sorted(class_names.items())}),
        "num_classes": str(int(num_classes)), "val_size": str(int(val_size)), "max_size": str(int(max_size)),
        "mean": json.dumps([float(v) for v in mean]), "std": json.dumps([float(v) for v in std]),
        "description": json.dumps(description, sort_keys=True, default=str), "rho": repr(float(rho)),
        "opset": str(int(opset)), "inputs": ",".join(inputs),
    }


def two_stage(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "transformer", None), "two_stage", False))

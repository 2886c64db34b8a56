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
    kept_counts [B] int32 (Sparse DETR): the tokens each image's encoder updated.

It is exported by ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` underneath): the multi-scale
deformable attention takes its pure-PyTorch reference (``grid_sample``: the ONNX GridSample operator, opset
>= 16), and Sparse DETR's kept-token count stays a function of each image's valid tokens (a TopK whose k
the graph computes). The TorchScript exporter (``dynamo=False``) is deprecated since torch 2.9 and records
Python ints as constants: it froze the level sizes and the kept count at the example's.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional, Sequence

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
        out = self.model(NestedTensor(images, pixel_mask))
        result = {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}
        result.update(self.postprocessor.select(out["pred_logits"], out["pred_boxes"]))
        if "sparse_token_nums" in out:
            result["kept_counts"] = out["sparse_token_nums"]
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
                with_mask: bool = False, seed: int = 0) -> list[str]:
    """Write ``detector`` (in eval mode, on the CPU) to ``out`` as ONNX with dynamic batch, H and W (from
    :func:`min_side` to 4096 px); traced on a batch of two random images of ``example_size`` (H, W).
    Returns the output names."""
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
    with torch.no_grad():
        program = torch.onnx.export(detector, args, dynamo=True, dynamic_shapes=shapes, opset_version=opset,
                                    input_names=list(INPUT_NAMES[:len(args)]), output_names=names,
                                    verbose=False)
    program.save(str(out))
    return names


def verify_onnx(path: str | Path, detector: OnnxDetector, sizes: Sequence[tuple[int, int]], *,
                tolerance: float = DEFAULT_TOLERANCE, batch: int = 1, with_mask: bool = False, threads: int = 0,
                seed: int = 1) -> list[dict]:
    """Run the ONNX file in onnxruntime (CPU) and ``detector`` in PyTorch on random normalised images of each
    (H, W) in ``sizes`` (``batch`` images each; with ``with_mask`` the images after the first are padded: their
    bottom and right quarter are masked). Returns one record per size: ``size``, ``logits_diff``,
    ``boxes_diff`` (max abs differences of each query and its counterpart, see :func:`matched_differences`),
    ``reordered_queries``, the kept counts of both (Sparse DETR) and ``ok`` (diffs within ``tolerance`` and
    equal kept counts).

    Two-stage models rank every token's proposal, padding included, as the reference does; all padding
    tokens score alike, and where that score reaches the top (random weights) the tie is broken differently
    by PyTorch and onnxruntime. Their padded images are therefore left out of the diffs (reported as
    ``padded_logits_diff``); the kept counts of every image are still compared."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    names = [o.name for o in session.get_outputs()]
    generator = torch.Generator().manual_seed(seed)
    records = []
    for h, w in sizes:
        images = torch.randn(batch, 3, h, w, generator=generator)
        mask = torch.zeros(batch, h, w, dtype=torch.bool)
        if with_mask and batch > 1:
            mask[1:, 3 * h // 4:] = True
            mask[1:, :, 3 * w // 4:] = True
            images = images.masked_fill(mask[:, None], 0.0)
        feed = {"images": images.numpy()}
        if "pixel_mask" in inputs:
            feed["pixel_mask"] = mask.numpy()
        with torch.no_grad():
            expected = detector(images, mask if "pixel_mask" in inputs else None)
        got = dict(zip(names, session.run(None, feed)))
        diffs = [matched_differences(expected["pred_logits"][i], expected["pred_boxes"][i],
                                     torch.from_numpy(got["pred_logits"][i]), torch.from_numpy(got["pred_boxes"][i]))
                 for i in range(batch)]
        strict = ~mask.flatten(1).any(1) if two_stage(detector.model) else torch.ones(batch, dtype=torch.bool)
        held = [d for d, keep in zip(diffs, strict.tolist()) if keep]
        record = {"size": (h, w), "logits_diff": max(d[0] for d in held), "boxes_diff": max(d[1] for d in held),
                  "reordered_queries": sum(d[2] for d in held)}
        if not strict.all():
            record["padded_logits_diff"] = max(d[0] for d, keep in zip(diffs, strict.tolist()) if not keep)
        ok = record["logits_diff"] <= tolerance and record["boxes_diff"] <= tolerance
        if "kept_counts" in expected:
            record["kept_counts"] = expected["kept_counts"].tolist()
            record["onnx_kept_counts"] = got["kept_counts"].tolist()
            ok = ok and record["kept_counts"] == record["onnx_kept_counts"]
        record["ok"] = ok
        records.append(record)
    return records


def matched_differences(logits: Tensor, boxes: Tensor, other_logits: Tensor, other_boxes: Tensor
                        ) -> tuple[float, float, int]:
    """(max abs logits difference, max abs boxes difference, queries that changed place) of one image's two
    sets of predictions [Q, K] and [Q, 4], each query compared with its counterpart in the other set.

    The predictions are a set: in two-stage models the queries are the proposals in score order, and two
    proposals whose scores differ by rounding (1e-6 among 17,000 tokens) can swap places between PyTorch and
    onnxruntime. Counterparts are therefore paired by a minimum-cost assignment of the max abs difference;
    without such swaps the pairing is the identity."""
    from scipy.optimize import linear_sum_assignment
    cost = torch.maximum(torch.cdist(logits.double(), other_logits.double(), p=float("inf")),
                         torch.cdist(boxes.double(), other_boxes.double(), p=float("inf")))
    rows, cols = linear_sum_assignment(cost.numpy())
    rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
    return (float((logits[rows] - other_logits[cols]).abs().max()), float((boxes[rows] - other_boxes[cols]).abs().max()),
            int((rows != cols).sum()))


def two_stage(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "transformer", None), "two_stage", False))


def default_verify_sizes(example_size: tuple[int, int], low: int) -> list[tuple[int, int]]:
    """Three (H, W) other than ``example_size``: smaller and wider, larger and taller, and transposed-ish,
    each side at least ``low`` and a multiple of 8 off the export size."""
    h, w = example_size
    candidates = [(h - max(8, h // 8), w + max(16, w // 6)), (h + max(24, h // 5), w - max(8, w // 10)),
                  (w - max(8, w // 10), h + max(8, h // 10))]
    sizes = []
    for ch, cw in candidates:
        size = (max(low, ch), max(low, cw))
        while size == tuple(example_size) or size in sizes:
            size = (size[0] + 8, size[1] + 16)
        sizes.append(size)
    return sizes

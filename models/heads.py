"""Prediction heads of the detectors and the post-processing of their outputs.

Boxes are normalised (cx, cy, w, h), relative to each image's unpadded size; box "logits" are the
same boxes before the sigmoid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from util import box_ops
from util.misc import inverse_sigmoid


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them: [..., input_dim] -> [..., output_dim]."""

    def __init__(self, *, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def refine_box_logits(delta: Tensor, reference: Tensor) -> Tensor:
    """Box logits [..., 4]: a box head's output ``delta`` [..., 4] added to the logits of ``reference``,
    boxes [..., 4] or centres [..., 2] in sigmoid space (a centre has no size: the size is ``delta``'s)."""
    if reference.shape[-1] == 4:
        return delta + inverse_sigmoid(reference)
    return torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1)


def prediction_dict(logits: Tensor | list[Tensor], boxes: Tensor | list[Tensor], aux_loss: bool) -> dict:
    """Per-layer logits [B, Q, K] and boxes [B, Q, 4] (stacked or in a list, first layer first) -> the
    output dict of the last layer, with the other layers as ``aux_outputs`` when ``aux_loss``."""
    out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
    if aux_loss:
        out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
    return out


class PostProcess(nn.Module):
    """Model outputs -> per-image detections in absolute xyxy pixels of ``target_sizes``.

    Focal (sigmoid) models keep the ``num_select`` best (query, class) pairs; softmax models (DETR)
    keep every query with its best real class.
    """

    def __init__(self, *, focal: bool = True, num_select: int = 100):
        super().__init__()
        self.focal = focal
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """target_sizes: [B, 2] (h, w) of the original images. Returns B dicts of ``scores`` [N],
        ``labels`` [N] and ``boxes`` [N, 4] (xyxy, pixels)."""
        logits = outputs["pred_logits"]
        if len(logits) != len(target_sizes) or target_sizes.shape[1] != 2:
            raise ValueError(f"target_sizes must be [{len(logits)}, 2], got {list(target_sizes.shape)}")
        dets = self.select(logits, outputs["pred_boxes"])
        img_h, img_w = target_sizes.unbind(1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1).to(dets["boxes"].dtype)
        boxes = dets["boxes"] * scale[:, None, :]
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(dets["scores"], dets["labels"], boxes)]

    def select(self, logits: Tensor, boxes: Tensor) -> dict[str, Tensor]:
        """The batch's detections before scaling: ``scores`` [B, N], ``labels`` [B, N] and ``boxes`` [B, N, 4]
        (xyxy, normalised to each image), N = ``num_select`` (focal) or Q (softmax), from ``pred_logits``
        [B, Q, K] and ``pred_boxes`` [B, Q, 4] (cxcywh)."""
        boxes = box_ops.box_cxcywh_to_xyxy(boxes)
        if self.focal:
            num_classes = logits.shape[2]
            scores, index = torch.topk(logits.sigmoid().flatten(1), min(self.num_select, logits[0].numel()), dim=1)
            query_index = torch.div(index, num_classes, rounding_mode="floor")
            labels = index % num_classes
            boxes = torch.gather(boxes, 1, query_index.unsqueeze(-1).expand(-1, -1, 4))
        else:
            scores, labels = logits.softmax(-1)[..., :-1].max(-1)
        return {"scores": scores, "labels": labels, "boxes": boxes}

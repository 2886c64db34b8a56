"""Model zoo: ``build_model(args) -> (model, criterion, postprocessors)``."""
from __future__ import annotations

from torch import nn

from .criterion import SetCriterion
from .deformable_detr import build_deformable_detr
from .detr import build_detr, build_sdetr


def build_model(args) -> tuple[nn.Module, SetCriterion, dict[str, nn.Module]]:
    """Build the model selected by ``args.model``; ``postprocessors["bbox"]`` turns outputs into
    absolute xyxy detections."""
    if args.model == "deformable":
        return build_deformable_detr(args)
    if args.model == "detr":
        return build_detr(args)
    if args.model == "sdetr":
        return build_sdetr(args)
    raise ValueError(f"unknown --model {args.model!r}; choose deformable, detr or sdetr")

"""Model zoo: ``build_model(args) -> (model, criterion, postprocessors)``."""
from __future__ import annotations

from torch import nn

from .criterion import SetCriterion
from .deformable_detr import build_deformable_detr
from .detr import build_detr, build_sdetr


def build_model(args, *, load_backbone_weights: bool = True) -> tuple[nn.Module, SetCriterion, dict[str, nn.Module]]:
    """Build the model selected by ``args.model``; ``postprocessors["bbox"]`` turns outputs into
    absolute xyxy detections. ``load_backbone_weights=False`` when a checkpoint will replace every
    weight: the backbone's ImageNet weights are then not fetched."""
    builders = {"deformable": build_deformable_detr, "detr": build_detr, "sdetr": build_sdetr}
    if args.model in builders:
        return builders[args.model](args, load_backbone_weights=load_backbone_weights)
    raise ValueError(f"unknown --model {args.model!r}; choose deformable, detr or sdetr")

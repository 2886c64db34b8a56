"""What the ResNet and Swin backbones (and the detectors' extra levels) share: the padding mask of a
feature map, and the check that a file's weights fit a network."""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from util.errors import InputError
from util.misc import NestedTensor


def masked_map(x: Tensor, image_mask: Tensor) -> NestedTensor:
    """A feature map [B, C, h, w] with its padding mask [B, h, w] (True on padding): the images' mask
    [B, H, W] resized to the map by nearest-neighbour sampling."""
    mask = F.interpolate(image_mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
    return NestedTensor(x, mask)


def check_weights_fit(own: Mapping[str, Tensor], weights: Mapping[str, Tensor], *, what: str, fix: str,
                      optional: Optional[Callable[[str], object]] = None) -> None:
    """Raise an InputError ``"{what}: N tensors missing (...), M of another shape (...). {fix}"`` unless
    ``weights`` holds every tensor of the state dict ``own`` in its shape; names for which ``optional``
    is true may be missing (the network keeps its own initialisation of those)."""
    missing = [k for k in own if k not in weights and not (optional is not None and optional(k))]
    reshaped = [f"{k}: {tuple(weights[k].shape)} in the file, {tuple(own[k].shape)} in the model"
                for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if missing or reshaped:
        raise InputError(f"{what}: {len(missing)} tensors missing (e.g. {missing[:3]}), {len(reshaped)} of another "
                         f"shape (e.g. {reshaped[:2]}). {fix}")

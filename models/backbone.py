"""Backbones: a torchvision ResNet (frozen or trainable BatchNorm) or a Swin Transformer (``models/swin.py``),
joined with a position encoding."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d

from util.checkpoint import torch_load
from util.errors import InputError
from util.misc import NestedTensor

from .activation_checkpoint import checkpointing, run_block, trains
from .backbone_common import check_weights_fit, masked_map
from .position_encoding import build_position_encoding
from .swin import SWINS, SwinBackbone

logger = logging.getLogger(__name__)

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
BACKBONES = RESNETS + SWINS


class WeightsUnavailableError(InputError, RuntimeError):
    """Raised when pretrained backbone weights can neither be downloaded nor found in the cache."""


def _stage_channels(stage: nn.Sequential) -> int:
    """Output channels of a ResNet stage: those of the last conv of its last block."""
    convs = [m for m in stage[-1].modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def _load_imagenet_weights(name: str) -> dict[str, Tensor]:
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False)
    except Exception as err:  # network errors come in many types (URLError, OSError, ...)
        raise WeightsUnavailableError(
            f"Could not get the ImageNet weights of {name} ({weights.url}): {err}.\n"
            f"Fix: download that file and pass it with --backbone_weights PATH, place it in "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'}, or train without them with --backbone_from_scratch."
        ) from err


def read_weights_file(path: str | Path, *, trust: bool = False) -> dict[str, Tensor]:
    """The state dict in a local weights file (``--backbone_weights``): a bare state dict, or one under
    ``model`` (the official Swin release, our checkpoints) or ``state_dict``; ``.safetensors`` files too.
    Loaded without running code from the file unless ``trust`` (``--trust_checkpoint``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--backbone_weights {path}: no such file. Pass the path of a local weights file "
                                f"(e.g. torchvision's resnet50-0676ba61.pth, or swin_tiny_patch4_window7_224.pth "
                                f"of the official Swin release).")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    checkpoint = torch_load(path, trust=trust)
    for key in ("model", "state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    if not isinstance(checkpoint, dict):
        raise InputError(f"--backbone_weights {path}: expected a state dict, got a {type(checkpoint).__name__}. "
                         "Pass a file saved with torch.save(model.state_dict(), path).")
    return checkpoint


def _load_scrl_weights(path: str, *, trust: bool = False) -> dict[str, Tensor]:
    """Map an SCRL checkpoint (``online_network_state_dict``, ``encoder.<i>``) to torchvision names."""
    checkpoint = torch_load(Path(path), trust=trust)
    if "online_network_state_dict" not in checkpoint:
        raise InputError(f"--scrl_pretrained_path {path}: not an SCRL checkpoint (no 'online_network_state_dict'); "
                         "for a plain ResNet-50 state dict use --backbone_weights.")
    renames = {"encoder.0.": "conv1.", "encoder.1.": "bn1.", "encoder.4.": "layer1.", "encoder.5.": "layer2.",
               "encoder.6.": "layer3.", "encoder.7.": "layer4."}
    state_dict = {}
    for key, value in checkpoint["online_network_state_dict"].items():
        for old, new in renames.items():
            if key.startswith(old):
                state_dict[new + key[len(old):]] = value
    return state_dict


def conv_frozen_bn(x: Tensor, conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> Tensor:
    """``bn(conv(x))`` as one convolution: the frozen scale folded into the (bias-free) weights, the shift
    as the bias. Equal up to float rounding, without the two passes over the activations that
    ``FrozenBatchNorm2d`` makes; gradients still reach ``conv.weight``."""
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    shift = bn.bias - bn.running_mean * scale
    return F.conv2d(x, conv.weight * scale.view(-1, 1, 1, 1), shift, conv.stride, conv.padding, conv.dilation,
                    conv.groups)


def conv_norm(x: Tensor, conv: nn.Conv2d, norm: nn.Module) -> Tensor:
    """``norm(conv(x))``: one folded convolution for a frozen BatchNorm (:func:`conv_frozen_bn`), the two
    modules in turn for a trainable ``BatchNorm2d`` (``--backbone_norm batch``)."""
    if isinstance(norm, FrozenBatchNorm2d):
        return conv_frozen_bn(x, conv, norm)
    return norm(conv(x))


def residual_block(block: nn.Module, x: Tensor) -> Tensor:
    """A torchvision ``BasicBlock`` or ``Bottleneck``, every conv + frozen BatchNorm pair as one convolution.

    In-place ReLUs and sum, as torchvision's own forward: no convolution or BatchNorm needs its output for
    backward.
    """
    num_convs = 3 if isinstance(block, Bottleneck) else 2
    out = x
    for i in range(1, num_convs + 1):
        out = conv_norm(out, getattr(block, f"conv{i}"), getattr(block, f"bn{i}"))
        if i < num_convs:
            out = out.relu_()
    identity = x if block.downsample is None else conv_norm(x, block.downsample[0], block.downsample[1])
    return out.add_(identity).relu_()


def resnet_stage(stage: nn.Sequential, x: Tensor) -> Tensor:
    """The residual blocks of one ResNet stage (see :func:`residual_block`)."""
    for block in stage:
        x = residual_block(block, x)
    return x


class ResNetBackbone(nn.Module):
    """A torchvision ResNet returning the maps of the stages ``return_layers`` (2: C3, 3: C4, 4: C5)
    with their padding masks, shallowest first.

    ``strides`` and ``num_channels`` describe the returned maps, in order. The forward folds each
    frozen BatchNorm into the convolution before it (:func:`conv_frozen_bn`); the modules and the
    state dict's names and shapes stay torchvision's. ``channels_last`` keeps the convolution weights,
    and runs the convolutions, in channels-last memory format: oneDNN's fast layout on CPU (see
    docs/benchmarks.md) and the one GPU tensor cores prefer under AMP. The maps then come out
    channels-last too; the detectors' input projections take either layout, and flattening such a
    map to tokens (``flatten(2).transpose(1, 2)``) is a free view. ``grad_checkpoint``: activation
    checkpointing of each stage that trains, in training (``models/activation_checkpoint.py``).
    ``batch_norm``: trainable ``BatchNorm2d`` layers instead of frozen ones (``--backbone_norm batch``, for
    training from scratch: a frozen norm at its initial statistics is the identity), each process
    normalising with its own batch's statistics in training.
    """

    def __init__(self, *, name: str = "resnet50", train_backbone: bool = True,
                 return_layers: Sequence[int] = (2, 3, 4), dilation: bool = False, freeze_early_layers: bool = True,
                 state_dict: Optional[dict[str, Tensor]] = None, channels_last: bool = True,
                 grad_checkpoint: bool = False, batch_norm: bool = False):
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"unknown ResNet {name!r}; choose one of {', '.join(RESNETS)}")
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(f"--dilation needs a bottleneck ResNet (resnet50/101), not {name}")
        resnet = getattr(torchvision.models, name)(weights=None, replace_stride_with_dilation=[False, False, dilation],
                                                   norm_layer=nn.BatchNorm2d if batch_norm else FrozenBatchNorm2d)
        if state_dict is not None:
            # The classifier goes unused; BatchNorm's step counter is not a weight.
            own = {k: v for k, v in resnet.state_dict().items()
                   if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
            check_weights_fit(own, state_dict, what=f"the backbone weights do not fit {name}",
                              fix=f"Pass the ImageNet weights of {name} (torchvision's layout) or choose the matching "
                                  f"--backbone.")
            resnet.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
        for param_name, param in resnet.named_parameters():
            # The reference trains layer2-4 only (stem and layer1 stay frozen), unless asked otherwise.
            early = not param_name.startswith(("layer2", "layer3", "layer4"))
            if not train_backbone or (freeze_early_layers and early):
                param.requires_grad_(False)
        layer_ids = tuple(sorted(set(return_layers)))
        if not layer_ids or not set(layer_ids) <= {1, 2, 3, 4}:
            raise ValueError(f"return_layers must name ResNet stages among 1-4, got {tuple(return_layers)}")
        self.body = IntermediateLayerGetter(resnet, return_layers={f"layer{n}": str(i) for i, n in enumerate(layer_ids)})
        self.num_channels = [_stage_channels(getattr(resnet, f"layer{n}")) for n in layer_ids]
        self.strides = [2 ** (n + 1) for n in layer_ids]
        if dilation and layer_ids[-1] == 4:
            self.strides[-1] //= 2
        self.channels_last = channels_last
        self.grad_checkpoint = grad_checkpoint
        if channels_last:
            self.body.to(memory_format=torch.channels_last)

    def feature_maps(self, x: Tensor) -> list[Tensor]:
        """The maps of the returned stages for images [B, 3, H, W], shallowest first."""
        body = self.body
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = body.maxpool(conv_norm(x, body.conv1, body.bn1).relu_())
        checkpointed = checkpointing(self, self.grad_checkpoint)
        maps = []
        for name, stage in body.named_children():
            if name.startswith("layer"):
                x = run_block(resnet_stage, stage, x, active=checkpointed and trains(stage))
                if name in body.return_layers:
                    maps.append(x)
        return maps

    def forward(self, images: NestedTensor) -> list[NestedTensor]:
        """The returned stages' maps [B, C_l, H_l, W_l] with their padding masks [B, H_l, W_l]."""
        return [masked_map(x, images.mask) for x in self.feature_maps(images.tensors)]


class Joiner(nn.Sequential):
    """``backbone`` followed by ``position_encoding`` (a Sequential, for the reference's key names
    ``backbone.0.body.*``); returns the feature maps and their position encodings."""

    def __init__(self, *, backbone: nn.Module, position_encoding: nn.Module):
        super().__init__(backbone, position_encoding)
        self.strides = backbone.strides
        self.num_channels = backbone.num_channels

    def forward(self, images: NestedTensor) -> tuple[list[NestedTensor], list[Tensor]]:
        """Returns features (NestedTensor [B, C_l, H_l, W_l] each) and positions ([B, hidden, H_l, W_l],
        in the features' dtype)."""
        features = self[0](images)
        positions = [self[1](f).to(f.tensors.dtype) for f in features]
        return features, positions

    def position_encoding(self, features: NestedTensor) -> Tensor:
        """Position encoding [B, hidden, H, W] of one more map (the detectors' extra levels)."""
        return self[1](features).to(features.tensors.dtype)


def backbone_layers(model: str, num_feature_levels: int) -> tuple[int, ...]:
    """Backbone stages (ResNet numbering, also for Swin) the detector ``model`` reads, finest first.

    Deformable family: the ``num_feature_levels`` coarsest of C3-C5 (further levels are strided
    convolutions on C5), so 4 levels read C3-C5 and 2 levels C4-C5; SDETR: C4 and C5 (stage 2
    runs on C4, stage 1 on C5); DETR: C5.
    """
    if model == "sdetr":
        return (3, 4)
    if model == "deformable":
        return (2, 3, 4)[-min(num_feature_levels, 3):]
    return (4,)


def build_backbone(args, *, load_weights: bool = True) -> Joiner:
    """The backbone of ``args``. ``load_weights=False`` skips reading its initial weights (a
    checkpoint will replace them) but freezes layers as if they had been loaded."""
    swin = args.backbone in SWINS
    if swin and args.dilation:
        raise ValueError(f"--dilation applies to ResNets (resnet50/101), not --backbone {args.backbone}")
    pretrained = not args.backbone_from_scratch
    state_dict = None
    if not load_weights:
        pass  # a checkpoint will replace every weight
    elif args.backbone_weights:
        state_dict = read_weights_file(args.backbone_weights, trust=args.trust_checkpoint)
    elif swin and pretrained:
        raise WeightsUnavailableError(
            f"--backbone {args.backbone} has no downloadable ImageNet weights here. Fix: pass the Swin-T "
            f"ImageNet checkpoint (swin_tiny_patch4_window7_224.pth of the official Swin release, or a timm "
            f"one) with --backbone_weights PATH, or train without it with --backbone_from_scratch (also the "
            f"flag to use when a checkpoint's weights replace the backbone's anyway).")
    elif not swin and args.scrl_pretrained_path:
        state_dict = _load_scrl_weights(args.scrl_pretrained_path, trust=args.trust_checkpoint)
    elif not swin and pretrained:
        state_dict = _load_imagenet_weights(args.backbone)
    options = dict(name=args.backbone, train_backbone=args.lr_backbone > 0,
                   return_layers=backbone_layers(args.model, args.num_feature_levels),
                   freeze_early_layers=pretrained and not args.finetune_early_layers, state_dict=state_dict,
                   grad_checkpoint=args.grad_checkpoint)
    if swin:
        backbone = SwinBackbone(**options, source=f"--backbone_weights {args.backbone_weights}")
    else:
        backbone = ResNetBackbone(**options, dilation=args.dilation, batch_norm=args.backbone_norm == "batch")
    return Joiner(backbone=backbone, position_encoding=build_position_encoding(args))

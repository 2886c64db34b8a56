"""Swin Transformer backbone (Swin-T) for the detectors, built on timm's ``SwinTransformer``.

It computes what Sparse DETR's detection Swin computes (the variant of the Swin detection code base):

* any input size: the image is padded bottom/right to a multiple of the patch size, every block pads its
  (normalised) tokens to a multiple of the window with zeros *before* the cyclic shift, and the shifted-window
  attention mask is built on that padded grid; patch merging pads odd sizes;
* every stage, the last included, uses 7x7 windows and shifts its odd blocks by 3, however small the map;
* the output of stage ``i`` is taken before its patch merging and normalised by its own LayerNorm ``norm{i}``;
* stochastic depth rises linearly from 0 to 0.2 over the 12 blocks;
* with ImageNet weights, the patch embedding and the whole first stage (its blocks and the patch merging that
  ends it) are frozen unless ``--finetune_early_layers``; from scratch nothing is frozen.

timm runs each stage's patch merging at the start of the next stage, the detection code at the end of the
previous one, so the names differ: official ``layers.{i}.downsample`` is timm's ``layers.{i+1}.downsample``, and
the official layout also stores each window attention's ``relative_position_index`` (timm derives it).
``state_dict`` gives the official names and order, and ``load_state_dict`` takes them, so checkpoints are
interchangeable with the released Swin-T Sparse DETR models.
"""
from __future__ import annotations

import inspect
import logging
import re
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer
from torch import Tensor, nn

from util.misc import NestedTensor

from .activation_checkpoint import checkpointing, run_block, trains
from .backbone_common import check_weights_fit, masked_map

logger = logging.getLogger(__name__)

PATCH_SIZE = 4
SWIN_CONFIGS = {
    "swin_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7,
                      drop_path_rate=0.2),
}
SWINS = tuple(SWIN_CONFIGS)

_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")
_INDEX_SUFFIX = "attn.relative_position_index"
_TABLE_SUFFIX = "attn.relative_position_bias_table"


def _shift_downsample(name: str, offset: int) -> str:
    """Move a ``layers.{i}.downsample.*`` name to stage ``i + offset``; other names are unchanged."""
    return _DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + offset}.downsample.", name)


def timm_to_official(name: str) -> str:
    return _shift_downsample(name, -1)


def official_to_timm(name: str) -> str:
    return _shift_downsample(name, +1)


def partition_windows(x: Tensor, window: int) -> Tensor:
    """[B, H, W, C] (H, W multiples of ``window``) -> [B * windows, window², C], windows in row-major order."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window, window, width // window, window, channels).transpose(2, 3)
    return x.reshape(-1, window * window, channels)


def merge_windows(windows: Tensor, window: int, height: int, width: int) -> Tensor:
    """The inverse of :func:`partition_windows`: [B * windows, window², C] -> [B, height, width, C]."""
    channels = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, channels).transpose(2, 3)
    return x.reshape(-1, height, width, channels)


def shifted_window_mask(height: int, width: int, window: int, shift: int, *, device=None,
                        dtype=torch.float32) -> Tensor:
    """[windows, window², window²] attention bias of the shifted windows of a ``height`` x ``width`` map padded
    to window multiples: 0 between tokens of the same region of the padded map, -100 between tokens that only
    the cyclic shift brought into one window."""
    padded_h, padded_w = -(-height // window) * window, -(-width // window) * window
    region = torch.zeros(padded_h, padded_w, device=device)
    label = 0
    for h0, h1 in ((0, padded_h - window), (padded_h - window, padded_h - shift), (padded_h - shift, padded_h)):
        for w0, w1 in ((0, padded_w - window), (padded_w - window, padded_w - shift), (padded_w - shift, padded_w)):
            region[h0:h1, w0:w1] = label
            label += 1
    windows = region.view(padded_h // window, window, padded_w // window, window).permute(0, 2, 1, 3)
    windows = windows.reshape(-1, window * window)
    different = windows[:, None, :] != windows[:, :, None]
    return torch.zeros(different.shape, device=device, dtype=dtype).masked_fill(different, -100.0)


class SwinBody(SwinTransformer):
    """timm's SwinTransformer run the detection way, returning the maps of stages ``out_indices`` (0-3, NCHW).

    The classifier's final norm and head are removed; ``norm{i}`` normalises the output of stage ``i``.
    """

    def __init__(self, *, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int], window_size: int,
                 drop_path_rate: float, out_indices: Sequence[int] = (1, 2, 3), grad_checkpoint: bool = False):
        # Where timm knows them, these options make its own forward shift every stage and accept any size too;
        # ``forward`` below does not depend on them.
        supported = inspect.signature(SwinTransformer.__init__).parameters
        options = {k: v for k, v in (("always_partition", True), ("strict_img_size", False)) if k in supported}
        super().__init__(img_size=224, patch_size=PATCH_SIZE, num_classes=0, global_pool="", embed_dim=embed_dim,
                         depths=tuple(depths), num_heads=tuple(num_heads), window_size=window_size,
                         drop_path_rate=drop_path_rate, **options)
        self.patch_embed.strict_img_size = False
        for stage in self.layers:
            for block in stage.blocks:
                # Derived from the window size: ``state_dict`` adds it under the official name, loading skips it.
                block.attn.register_buffer("relative_position_index", block.attn.relative_position_index,
                                           persistent=False)
        out_indices = tuple(sorted(set(out_indices)))
        if not out_indices or not set(out_indices) <= set(range(len(depths))):
            raise ValueError(f"out_indices must name Swin stages among 0-{len(depths) - 1}, got {out_indices}")
        self.window = window_size
        self.shift = window_size // 2
        self.grad_checkpoint = grad_checkpoint
        self.out_indices = out_indices
        self.norm = nn.Identity()
        self.head = nn.Identity()
        widths = [embed_dim * 2 ** i for i in range(len(depths))]
        for i in out_indices:
            norm = nn.LayerNorm(widths[i])
            self.add_module(f"norm{i}", norm)
        self.widths = [widths[i] for i in out_indices]
        self.reductions = [PATCH_SIZE * 2 ** i for i in out_indices]
        self.register_state_dict_post_hook(_state_dict_to_official)
        self.register_load_state_dict_pre_hook(_load_official_state_dict)

    def _block(self, block: nn.Module, x: Tensor, shift: int, mask: Optional[Tensor]) -> Tensor:
        """One Swin block on [B, H, W, C] tokens, padding after the norm and before the shift."""
        batch, height, width, channels = x.shape
        window = self.window
        y = F.pad(block.norm1(x), (0, 0, 0, (-width) % window, 0, (-height) % window))
        padded_h, padded_w = y.shape[1:3]
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        windows = block.attn(partition_windows(y, window), mask=mask if shift else None)
        y = merge_windows(windows, window, padded_h, padded_w)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        x = x + block.drop_path1(y[:, :height, :width])
        return x + block.drop_path2(block.mlp(block.norm2(x)))

    def _stage(self, stage: nn.Module, x: Tensor) -> Tensor:
        """One stage on [B, H, W, C] tokens: its patch merging (identity for the first), then its blocks, every
        other one shifted."""
        x = stage.downsample(x)
        mask = None
        if len(stage.blocks) > 1:
            mask = shifted_window_mask(x.shape[1], x.shape[2], self.window, self.shift, device=x.device,
                                       dtype=x.dtype)
        for j, block in enumerate(stage.blocks):
            x = self._block(block, x, self.shift if j % 2 else 0, mask)
        return x

    def forward(self, x: Tensor) -> list[Tensor]:
        """[B, 3, H, W] images -> [B, C_i, ceil(H / s_i), ceil(W / s_i)] for each stage of ``out_indices``
        (s_i = 4 * 2^i). With ``grad_checkpoint``, each stage that trains is checkpointed in training."""
        x = F.pad(x, (0, (-x.shape[-1]) % PATCH_SIZE, 0, (-x.shape[-2]) % PATCH_SIZE))
        x = self.patch_embed(x)  # [B, H/4, W/4, C]
        checkpointed = checkpointing(self, self.grad_checkpoint)
        outputs = []
        for i, stage in enumerate(self.layers):
            x = run_block(self._stage, stage, x, active=checkpointed and trains(stage))
            if i in self.out_indices:
                outputs.append(getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2).contiguous())
        return outputs

    def early_parameter_names(self) -> list[str]:
        """Parameters the reference freezes with ImageNet weights: the patch embedding and the first stage,
        whose patch merging timm holds in the second stage."""
        return [name for name, _ in self.named_parameters()
                if name.startswith(("patch_embed.", "layers.0.", "layers.1.downsample."))]


def _state_dict_to_official(module: SwinBody, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """Rename the body's entries to the official names and order, adding each ``relative_position_index``."""
    entries = [(key[len(prefix):], state_dict.pop(key)) for key in [k for k in state_dict if k.startswith(prefix)]]
    pending_norms: list[tuple[str, Tensor]] = []  # the official patch merging lists its reduction first
    for name, value in entries:
        official = timm_to_official(name)
        if ".downsample.norm." in official:
            pending_norms.append((official, value))
            continue
        state_dict[prefix + official] = value
        if official.endswith(".downsample.reduction.weight"):
            for norm_name, norm_value in pending_norms:
                state_dict[prefix + norm_name] = norm_value
            pending_norms = []
        if name.endswith(_TABLE_SUFFIX):
            attention = module.get_submodule(name[:-len(_TABLE_SUFFIX)] + "attn")
            state_dict[prefix + official[:-len(_TABLE_SUFFIX)] + _INDEX_SUFFIX] = \
                attention.relative_position_index.detach()
    for norm_name, norm_value in pending_norms:
        state_dict[prefix + norm_name] = norm_value


def _load_official_state_dict(module: SwinBody, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """Rename official entries to timm's; ``relative_position_index`` is derived from the window size, so a
    stored one is only checked for its shape."""
    entries = [(key[len(prefix):], state_dict.pop(key)) for key in [k for k in state_dict if k.startswith(prefix)]]
    for name, value in entries:
        timm_name = official_to_timm(name)
        if name.endswith(_INDEX_SUFFIX):
            try:
                own = module.get_submodule(timm_name[:-len(_INDEX_SUFFIX)] + "attn").relative_position_index
            except AttributeError:
                unexpected_keys.append(prefix + name)
                continue
            if tuple(value.shape) != tuple(own.shape):
                error_msgs.append(f"size mismatch for {prefix + name}: copying a param with shape "
                                  f"{tuple(value.shape)}, the shape in current model is {tuple(own.shape)}.")
            continue
        state_dict[prefix + timm_name] = value


def official_swin_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official Swin names for a Swin state dict: the official ImageNet release (``layers.0.downsample``), timm's
    (``layers.1.downsample`` first), or a detector checkpoint (``backbone.0.body.*``); DDP prefixes dropped."""
    state_dict = dict(state_dict)
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    body = "backbone.0.body."
    if any(k.startswith(body) for k in state_dict):
        state_dict = {k[len(body):]: v for k, v in state_dict.items() if k.startswith(body)}
    downsample_stages = {int(m.group(1)) for m in map(_DOWNSAMPLE.match, state_dict) if m}
    if downsample_stages and 0 not in downsample_stages:  # timm: no patch merging in the first stage
        state_dict = {timm_to_official(k): v for k, v in state_dict.items()}
    return state_dict


class SwinBackbone(nn.Module):
    """A Swin Transformer returning the maps of the stages ``return_layers`` (numbered like ResNet's: 2: stride
    8, 3: stride 16, 4: stride 32) with their padding masks, shallowest first.

    ``state_dict``: ImageNet weights in official, timm or detector names (see :func:`official_swin_state_dict`);
    classifier entries are ignored and the per-output norms keep their initialisation. ``grad_checkpoint``:
    activation checkpointing of each stage that trains, in training.
    """

    def __init__(self, *, name: str = "swin_tiny", train_backbone: bool = True,
                 return_layers: Sequence[int] = (2, 3, 4), freeze_early_layers: bool = True,
                 state_dict: Optional[Mapping[str, Tensor]] = None, source: str = "the backbone weights",
                 grad_checkpoint: bool = False):
        super().__init__()
        if name not in SWIN_CONFIGS:
            raise ValueError(f"unknown Swin {name!r}; choose one of {', '.join(SWINS)}")
        layer_ids = tuple(sorted(set(return_layers)))
        if not layer_ids or not set(layer_ids) <= {1, 2, 3, 4}:
            raise ValueError(f"return_layers must name Swin stages among 1-4, got {tuple(return_layers)}")
        self.body = SwinBody(**SWIN_CONFIGS[name], out_indices=[n - 1 for n in layer_ids],
                             grad_checkpoint=grad_checkpoint)
        if state_dict is not None:
            self.load_imagenet_weights(state_dict, source)
        early = set(self.body.early_parameter_names())
        for param_name, param in self.body.named_parameters():
            if not train_backbone or (freeze_early_layers and param_name in early):
                param.requires_grad_(False)
        self.num_channels = list(self.body.widths)
        self.strides = list(self.body.reductions)

    def load_imagenet_weights(self, state_dict: Mapping[str, Tensor], source: str) -> None:
        weights = official_swin_state_dict(state_dict)
        own = self.body.state_dict()
        # The per-output norms are the detector's own; the index is derived from the window size.
        optional = re.compile(r"norm\d\.(weight|bias)$|.*\.relative_position_index$")
        check_weights_fit(own, weights, what=f"{source} does not hold {type(self).__name__} weights of this size",
                          fix="Pass the weights of the --backbone you chose (e.g. swin_tiny_patch4_window7_224.pth "
                              "for swin_tiny) with --backbone_weights.", optional=optional.match)
        ignored = [k for k in weights if k not in own]
        if ignored:
            logger.info("%s: ignoring %d tensors the detector has no use for (e.g. %s)", source, len(ignored),
                        ignored[:3])
        self.body.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)

    def forward(self, images: NestedTensor) -> list[NestedTensor]:
        """The returned stages' maps [B, C_l, H_l, W_l] with their padding masks [B, H_l, W_l]."""
        return [masked_map(x, images.mask) for x in self.body(images.tensors)]


"""Model zoo: ``build_model(args) -> (model, criterion, postprocessors)``, and what a checkpoint that does not
fit the built model says about the flags (``checkpoint_mismatch_causes``)."""
from __future__ import annotations

import argparse
import re
from typing import Any, Iterable, Mapping

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


# Flags that change the model's tensors; compared with a checkpoint's args when its weights do not fit.
ARCHITECTURE_FLAGS = (
    "model", "backbone", "dilation", "num_feature_levels", "hidden_dim", "dim_feedforward", "nheads", "enc_layers",
    "dec_layers", "num_queries", "enc_n_points", "dec_n_points", "num_classes", "with_box_refine", "two_stage",
    "eff_query_init", "eff_specific_head", "rho", "use_enc_aux_loss", "position_embedding", "pre_norm",
)
# (key pattern, likely cause) for weights that are missing, unexpected or of another shape.
KEY_HINTS = (
    (r"transformer\.decoder\.bbox_embed", "--with_box_refine differs"),
    (r"enc_output|pos_trans|^query_embed|transformer\.reference_points", "--two_stage differs"),
    (r"enc_mask_predictor", "--rho differs (Sparse DETR's scoring network exists with --rho > 0 only)"),
    (r"transformer\.encoder\.(class|bbox)_embed", "--use_enc_aux_loss differs"),
    (r"transformer\.encoder\.layers\.\d+", "--enc_layers differs"),
    (r"transformer\.decoder\.layers\.\d+", "--dec_layers differs"),
    (r"input_proj|level_embed", "--num_feature_levels differs"),
    (r"backbone\.0\.body", "--backbone / --dilation differs"),
    (r"class_embed", "--num_classes or the number of heads (--dec_layers, --two_stage, --use_enc_aux_loss) differs"),
    (r"query_embed|tgt_embed", "--num_queries or --hidden_dim differs"),
)


def checkpoint_mismatch_causes(keys: Iterable[str], checkpoint_args: Any, *,
                               current_flags: Mapping[str, Any]) -> list[str]:
    """Human-readable guesses of why the state-dict ``keys`` of a checkpoint do not fit the model built from
    ``current_flags`` (``vars(args)``): the architecture flags that differ from the checkpoint's saved args
    (a Namespace or a dict, None for official checkpoints), else the causes their key names suggest."""
    causes = []
    if checkpoint_args is not None:
        saved = vars(checkpoint_args) if isinstance(checkpoint_args, argparse.Namespace) else dict(checkpoint_args)
        for flag in ARCHITECTURE_FLAGS:
            if flag in saved and flag in current_flags and saved[flag] != current_flags[flag]:
                causes.append(f"--{flag} is {saved[flag]!r} in the checkpoint but {current_flags[flag]!r} now")
    if not causes:
        keys = list(keys)
        causes = list(dict.fromkeys(hint for pattern, hint in KEY_HINTS if any(re.search(pattern, k) for k in keys)))
    return causes

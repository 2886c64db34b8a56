"""Model zoo: ``build_model(args) -> (model, criterion, postprocessors)`` for training,
``build_inference_model(description) -> (model, postprocessors)`` from a stored :class:`ModelDescription`, and
what a checkpoint that does not fit the built model says about the flags (``checkpoint_mismatch_causes``,
``load_weights_strict``)."""
from __future__ import annotations

import argparse
import re
from dataclasses import asdict
from typing import Any, Iterable, Mapping

from torch import nn

from util.checkpoint import load_model_strict, strip_ddp_prefix

from .criterion import SetCriterion
from .description import SHAPE_FIELDS, ModelDescription
from .deformable_detr import build_deformable_detr
from .detr import build_detr, build_sdetr
from .token_selection import RULES as TOKEN_SELECTION_RULES


def build_model(args, *, load_backbone_weights: bool = True) -> tuple[nn.Module, SetCriterion, dict[str, nn.Module]]:
    """Build the model selected by ``args.model``; ``postprocessors["bbox"]`` turns outputs into
    absolute xyxy detections. ``load_backbone_weights=False`` when a checkpoint will replace every
    weight: the backbone's ImageNet weights are then not fetched."""
    builders = {"deformable": build_deformable_detr, "detr": build_detr, "sdetr": build_sdetr}
    if args.model in builders:
        return builders[args.model](args, load_backbone_weights=load_backbone_weights)
    raise ValueError(f"unknown --model {args.model!r}; choose deformable, detr or sdetr")


# How a model whose every weight comes from a checkpoint is built: no initial weights are read, nothing is
# frozen for training, no activation checkpointing.
INFERENCE_BUILD = dict(backbone_from_scratch=True, backbone_weights="", scrl_pretrained_path="", trust_checkpoint=False,
                       lr_backbone=0.0, finetune_early_layers=False, grad_checkpoint=False)


def build_inference_model(description: ModelDescription) -> tuple[nn.Module, dict[str, nn.Module]]:
    """``(model, postprocessors)`` of ``description``, with random weights for a checkpoint to replace; no
    criterion (training flags such as the loss weights are not part of a description)."""
    flags = argparse.Namespace(**asdict(description), **INFERENCE_BUILD)
    builders = {"deformable": build_deformable_detr, "detr": build_detr, "sdetr": build_sdetr}
    return builders[description.model](flags, load_backbone_weights=False, with_criterion=False)[::2]


# Besides the fields that fix the tensors' shapes, those that change the tensors' meaning; compared with a
# checkpoint's description when its weights do not fit.
ARCHITECTURE_FLAGS = (*SHAPE_FIELDS, "dilation", "num_queries", "eff_specific_head", "rho", "pre_norm")
# (key pattern, likely cause) for weights that are missing, unexpected or of another shape.
KEY_HINTS = (
    (r"transformer\.decoder\.bbox_embed", "--with_box_refine differs"),
    (r"enc_output|pos_trans|^query_embed|transformer\.reference_points", "--two_stage differs"),
    (r"transformer\.(%s)\." % "|".join(sorted({rule.STATE_NAME for rule in TOKEN_SELECTION_RULES.values()})),
     "--rho differs or --token_selection differs (Sparse DETR's token selector exists with --rho > 0 only, with "
     "the parameters of its rule)"),
    (r"transformer\.encoder\.(class|bbox)_embed", "--use_enc_aux_loss differs"),
    (r"transformer\.encoder\.layers\.\d+", "--enc_layers differs"),
    (r"transformer\.decoder\.layers\.\d+", "--dec_layers differs"),
    (r"input_proj|level_embed", "--num_feature_levels differs"),
    (r"backbone\.0\.body", "--backbone / --dilation differs"),
    (r"class_embed", "--num_classes or the number of heads (--dec_layers, --two_stage, --use_enc_aux_loss) differs"),
    (r"query_embed|tgt_embed", "--num_queries or --hidden_dim differs"),
)


def checkpoint_num_classes(state_dict: Mapping[str, Any], model: str) -> int | None:
    """The ``--num_classes`` a checkpoint's classifier was built with, from its (last) ``class_embed`` weight:
    its outputs, less DETR's and SDETR's no-object class; None when the state dict has no classifier."""
    weights = [v for k, v in state_dict.items() if re.search(r"(^|\.)class_embed(\.\d+)?\.weight$", k)]
    if not weights:
        return None
    return int(weights[-1].shape[0]) - (1 if model in ("detr", "sdetr") else 0)


def checkpoint_mismatch_causes(keys: Iterable[str], checkpoint_args: Any, *, current_flags: Mapping[str, Any],
                               state_dict: Mapping[str, Any] | None = None) -> list[str]:
    """Human-readable guesses of why the state-dict ``keys`` of a checkpoint do not fit the model built from
    ``current_flags`` (``vars(args)`` or a description's fields): the architecture flags that differ from the
    checkpoint's description or saved args (a dict or a Namespace, None for official checkpoints), else the
    classifier size read from the checkpoint's ``state_dict`` (official checkpoints hold no args) and the causes
    the key names suggest."""
    causes = []
    if checkpoint_args is not None:
        saved = vars(checkpoint_args) if isinstance(checkpoint_args, argparse.Namespace) else dict(checkpoint_args)
        for flag in ARCHITECTURE_FLAGS:
            if flag in saved and flag in current_flags and saved[flag] != current_flags[flag]:
                causes.append(f"--{flag} is {saved[flag]!r} in the checkpoint but {current_flags[flag]!r} now")
    if causes:
        return causes
    keys = list(keys)
    saved_classes = checkpoint_num_classes(state_dict or {}, current_flags.get("model", "deformable"))
    if saved_classes is not None and saved_classes != current_flags.get("num_classes"):
        causes.append(f"the checkpoint's classifier predicts {saved_classes} classes but the model was built with "
                      f"--num_classes {current_flags.get('num_classes')}: pass --num_classes {saved_classes}")
    causes += [hint for pattern, hint in KEY_HINTS if any(re.search(pattern, k) for k in keys)]
    return list(dict.fromkeys(causes))


def load_weights_strict(model: nn.Module, checkpoint: Mapping[str, Any], source: Any, *,
                        current_flags: Mapping[str, Any], built_as: str) -> None:
    """``util.checkpoint.load_model_strict`` of ``checkpoint`` into ``model``, explaining a mismatch by
    :func:`checkpoint_mismatch_causes` against ``current_flags`` (``vars(args)``); ``built_as`` says where the
    model's flags came from (e.g. "--model deformable")."""
    state_dict = strip_ddp_prefix(checkpoint["model"])
    saved = checkpoint.get("model_description") or checkpoint.get("args")
    load_model_strict(model, checkpoint, source, built_as=built_as,
                      explain=lambda keys: checkpoint_mismatch_causes(keys, saved, current_flags=current_flags,
                                                                      state_dict=state_dict))

"""Train and evaluate the Deformable DETR family (Deformable, Efficient, Sparse DETR), DETR and SDETR.

    python main.py --coco_path data/coco --output_dir exps/run        # train
    python main.py --coco_path data/coco --eval --resume ckpt.pth      # evaluate

A checkpoint of this codebase describes its model (``model_description``): with ``--resume`` / ``--eval`` the
model flags left out take its values, and with ``--finetune`` the architecture flags do (model_config.py).

Exit status: 0 done; 1 an ``error: ...`` line (bad input, or too many non-finite steps in a row);
128 + the signal number (143 SIGTERM, 130 SIGINT) when a stop signal ended training after it saved
<output_dir>/checkpoint.pth: the same command with ``--resume auto`` continues it.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from model_config import adopt_checkpoint_flags, backbone_name, config_script_flags, explicit_flags
from models.description import BACKBONES
from models.token_selection import RULES as TOKEN_SELECTION_RULES


# Defaults that depend on --model; flags left at None take them. Values are the references'.
MODEL_DEFAULTS = {
    "deformable": dict(lr=2e-4, lr_backbone=2e-5, batch_size=2, epochs=50, lr_drop=40, num_queries=300,
                       dim_feedforward=1024, set_cost_class=2.0, cls_loss_coef=2.0, lr_scaling="sqrt",
                       checkpoint_every=5, lr_backbone_names=["backbone.0"]),
    "detr": dict(lr=1e-4, lr_backbone=1e-5, batch_size=2, epochs=300, lr_drop=200, num_queries=100,
                 dim_feedforward=2048, set_cost_class=1.0, cls_loss_coef=1.0, lr_scaling="none",
                 checkpoint_every=100, lr_backbone_names=["backbone"]),
    "sdetr": dict(lr=1e-4, lr_backbone=1e-5, batch_size=4, epochs=300, lr_drop=100, num_queries=100,
                  dim_feedforward=2048, set_cost_class=1.0, cls_loss_coef=1.0, lr_scaling="none",
                  checkpoint_every=100, lr_backbone_names=["backbone"]),
}

# SDETR's per-stage layer and head counts (the reference hard-codes these values).
SDETR_STAGE_DEFAULTS = {
    "sdetr_stage1_enc_layers": 3, "sdetr_stage1_enc_heads": 8,
    "sdetr_stage1_dec_layers": 3, "sdetr_stage1_dec_heads": 8,
    "sdetr_stage2_enc_layers": 3, "sdetr_stage2_enc_heads": 1,
    "sdetr_stage2_dec_layers": 3, "sdetr_stage2_dec_heads": 8,
}

RESNET_NAMES = tuple(name for name in BACKBONES if name.startswith("resnet"))

DEFORMABLE_ONLY_FLAGS = ("with_box_refine", "two_stage", "eff_query_init", "eff_specific_head", "use_enc_aux_loss")


def _model_default(name: str) -> str:
    return ", ".join(f"{value:g} ({model})" if isinstance(value, float) else f"{value} ({model})"
                     for model, defaults in MODEL_DEFAULTS.items() for key, value in defaults.items() if key == name)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Sparse DETR and family", add_help=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="deformable", choices=tuple(MODEL_DEFAULTS),
                        help="detector: the Deformable DETR family (incl. Efficient and Sparse DETR), DETR or SDETR")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--lr", default=None, type=float, help=f"learning rate; default {_model_default('lr')}")
    g.add_argument("--lr_backbone_names", default=None, type=str, nargs="+",
                   help="parameters whose name contains one of these train at --lr_backbone; default "
                        f"{_model_default('lr_backbone_names')}: DETR's learned position embedding "
                        "(backbone.1) trains at --lr_backbone as in DETR, the deformable family's at --lr")
    g.add_argument("--lr_backbone", default=None, type=float,
                   help=f"backbone learning rate, 0 freezes it; default {_model_default('lr_backbone')}")
    g.add_argument("--lr_linear_proj_names", default=["reference_points", "sampling_offsets"], type=str, nargs="+",
                   help="parameters whose name contains one of these train at --lr x --lr_linear_proj_mult")
    g.add_argument("--lr_linear_proj_mult", default=0.1, type=float, help="learning-rate factor of those parameters")
    g.add_argument("--batch_size", default=None, type=int,
                   help=f"images per process; default {_model_default('batch_size')}")
    g.add_argument("--weight_decay", default=1e-4, type=float, help="AdamW / SGD weight decay")
    g.add_argument("--epochs", default=None, type=int, help=f"training epochs; default {_model_default('epochs')}")
    g.add_argument("--lr_drop", default=None, type=int,
                   help=f"divide the learning rates by 10 every this many epochs; default {_model_default('lr_drop')}")
    g.add_argument("--clip_max_norm", default=0.1, type=float, help="gradient clipping max norm (0 disables)")
    g.add_argument("--sgd", action="store_true", help="SGD with momentum 0.9 instead of AdamW")

    g = parser.add_argument_group("Deformable DETR variants")
    g.add_argument("--with_box_refine", action="store_true",
                   help="iterative bounding-box refinement: each decoder layer refines the previous boxes")
    g.add_argument("--two_stage", action="store_true",
                   help="two-stage: queries start from the top-scoring encoder proposals (needs --with_box_refine)")

    g = parser.add_argument_group("backbone")
    g.add_argument("--backbone", default="resnet50", type=backbone_name,
                   choices=BACKBONES,
                   help="torchvision ResNet (BatchNorm: see --backbone_norm), or Swin-T (swin-t, the reference's "
                        "spelling, also works; needs --backbone_weights or --backbone_from_scratch: no downloadable "
                        "weights)")
    g.add_argument("--dilation", action="store_true",
                   help="replace the stride of the last stage by dilation (DC5)")
    g.add_argument("--position_embedding", default="sine", choices=("sine", "learned"),
                   help="position encoding of the feature maps")
    g.add_argument("--position_embedding_scale", default=2 * math.pi, type=float,
                   help="sine encoding: normalised position x this scale")
    g.add_argument("--num_feature_levels", default=4, type=int,
                   help="feature levels of the deformable family (C3-C5 plus extra stride-2 levels)")
    g.add_argument("--backbone_from_scratch", action="store_true",
                   help="random backbone initialisation (no ImageNet weights); trains every layer")
    g.add_argument("--backbone_norm", default="frozen", choices=("frozen", "batch"),
                   help="ResNet normalisation: frozen (BatchNorm with fixed statistics and scale, the reference's; "
                        "what ImageNet weights need) or batch (BatchNorm2d that trains: batch statistics in "
                        "training, running ones in evaluation; for a ResNet trained from scratch, whose frozen "
                        "norms would be identities)")
    g.add_argument("--finetune_early_layers", action="store_true",
                   help="also train the stem and layer1 (Swin: patch embedding and stage 1), frozen by default")
    g.add_argument("--scrl_pretrained_path", default="", type=str,
                   help="initialise the ResNet-50 from an SCRL self-supervised checkpoint")
    g.add_argument("--backbone_weights", default="", type=str,
                   help="initialise the backbone from this local file (e.g. torchvision's resnet50-0676ba61.pth; "
                        "for Swin-T the official release's swin_tiny_patch4_window7_224.pth or a timm checkpoint)")

    g = parser.add_argument_group("transformer")
    g.add_argument("--enc_layers", default=6, type=int,
                   help="encoder layers (SDETR ignores it: see --sdetr_stage{1,2}_enc_layers)")
    g.add_argument("--dec_layers", default=6, type=int,
                   help="decoder layers (SDETR ignores it: see --sdetr_stage{1,2}_dec_layers)")
    g.add_argument("--dim_feedforward", default=None, type=int,
                   help=f"feed-forward width; default {_model_default('dim_feedforward')}")
    g.add_argument("--hidden_dim", default=256, type=int, help="transformer width")
    g.add_argument("--dropout", default=0.1, type=float, help="dropout in the transformer")
    g.add_argument("--nheads", default=8, type=int,
                   help="attention heads (SDETR ignores it: see --sdetr_stage{1,2}_{enc,dec}_heads)")
    g.add_argument("--num_queries", default=None, type=int,
                   help=f"object queries (two-stage: proposals); default {_model_default('num_queries')}")
    g.add_argument("--dec_n_points", default=4, type=int, help="sampling points per head and level, decoder")
    g.add_argument("--enc_n_points", default=4, type=int, help="sampling points per head and level, encoder")

    g = parser.add_argument_group("DETR / SDETR")
    g.add_argument("--pre_norm", action="store_true",
                   help="DETR/SDETR: LayerNorm before each attention / feed-forward block (and after the encoder) "
                        "instead of after each residual sum")
    stage_help = {
        "sdetr_stage1_enc_layers": "SDETR stage 1 (on C5): encoder layers",
        "sdetr_stage1_enc_heads": "SDETR stage 1: attention heads of the encoder layers",
        "sdetr_stage1_dec_layers": "SDETR stage 1: decoder layers",
        "sdetr_stage1_dec_heads": "SDETR stage 1: attention heads of the decoder layers",
        "sdetr_stage2_enc_layers": "SDETR stage 2 (on C4): encoder layers",
        "sdetr_stage2_enc_heads": "SDETR stage 2: attention heads of the encoder layers (single-head in the paper)",
        "sdetr_stage2_dec_layers": "SDETR stage 2: decoder layers (its decoder starts from stage 1's last output)",
        "sdetr_stage2_dec_heads": "SDETR stage 2: attention heads of the decoder layers",
    }
    for flag, default in SDETR_STAGE_DEFAULTS.items():
        g.add_argument(f"--{flag}", default=default, type=int, metavar="N",
                       help=f"{stage_help[flag]}; default {default} (the reference's)")

    g = parser.add_argument_group("Efficient DETR and Sparse DETR")
    g.add_argument("--eff_query_init", action="store_true",
                   help="Efficient DETR: decoder query contents are the top-k encoder tokens (needs --two_stage)")
    g.add_argument("--eff_specific_head", action="store_true",
                   help="Efficient DETR: class-specific proposal head, ranked by the best class (needs --two_stage)")
    g.add_argument("--rho", default=0.0, type=float,
                   help="Sparse DETR: fraction of tokens the encoder updates, in (0, 1]; 0 = dense encoder "
                        "(needs --two_stage)")
    g.add_argument("--token_selection", default="dam", choices=tuple(TOKEN_SELECTION_RULES),
                   help="Sparse DETR: the rule choosing the --rho tokens the encoder updates: dam, the paper's scoring "
                        "network trained on the decoder attention map; objectness, the paper's objectness-score "
                        "baseline (a detection head on the backbone tokens, Hungarian loss of the _backbone group); "
                        "see docs/token_selection.md (needs --rho > 0); default dam")
    g.add_argument("--use_enc_aux_loss", action="store_true",
                   help="Sparse DETR: detection heads and losses after every encoder layer but the last")

    g = parser.add_argument_group("losses and matching")
    g.add_argument("--no_aux_loss", dest="aux_loss", action="store_false",
                   help="disable the losses on every decoder layer but the last")
    g.add_argument("--set_cost_class", default=None, type=float,
                   help=f"class weight in the matching cost; default {_model_default('set_cost_class')}")
    g.add_argument("--set_cost_bbox", default=5.0, type=float, help="L1 box weight in the matching cost")
    g.add_argument("--set_cost_giou", default=2.0, type=float, help="GIoU weight in the matching cost")
    g.add_argument("--cls_loss_coef", default=None, type=float,
                   help=f"classification loss weight; default {_model_default('cls_loss_coef')}")
    g.add_argument("--bbox_loss_coef", default=5.0, type=float, help="L1 box loss weight")
    g.add_argument("--giou_loss_coef", default=2.0, type=float, help="GIoU loss weight")
    g.add_argument("--mask_prediction_coef", default=1.0, type=float,
                   help="Sparse DETR: weight of the scoring network's DAM loss")
    g.add_argument("--focal_alpha", default=0.25, type=float, help="alpha of the sigmoid focal loss")
    g.add_argument("--eos_coef", default=0.1, type=float,
                   help="DETR/SDETR: weight of the no-object class in the cross-entropy")

    g = parser.add_argument_group("data")
    g.add_argument("--dataset_file", default="coco", choices=("coco",),
                   help="dataset format: COCO (the references' flag; datasets.build_dataset dispatches on it)")
    g.add_argument("--coco_path", default="./data/coco", type=str,
                   help="folder with train2017/, val2017/ and annotations/instances_{train,val}2017.json")
    g.add_argument("--num_classes", default=91, type=int,
                   help="classifier outputs, indexed by category id (COCO's ids go up to 90); a dataset with "
                        "larger ids fails when it loads, naming the value to pass")
    g.add_argument("--cache_mode", action="store_true", help="keep the encoded images in memory")
    g.add_argument("--num_workers", default=2, type=int, help="data-loading processes")
    g.add_argument("--strict_data", action="store_true",
                   help="fail on data that would otherwise be skipped with a warning: images missing on disk, "
                        "image files that cannot be decoded, boxes that are not 4 finite numbers "
                        "(tools/check_dataset.py lists every problem without training)")

    g = parser.add_argument_group(
        "training loop", "see runner.py; --resume auto continues from <output_dir>/checkpoint.pth when it exists")
    g.add_argument("--lr_scaling", default=None, choices=("sqrt", "none"),
                   help="sqrt: multiply --lr and --lr_backbone by sqrt(global batch / 16), as Sparse DETR's "
                        f"reference does; none: use them as given (DETR's references); default "
                        f"{_model_default('lr_scaling')}")
    g.add_argument("--amp", default="off", choices=("off", "fp16", "bf16"),
                   help="mixed precision: autocast the model to fp16 (with gradient scaling) or bf16")
    g.add_argument("--log_every", default=50, type=int, metavar="N",
                   help="a progress line every N training (and evaluation) steps")
    g.add_argument("--eval_every", default=1, type=int, metavar="N",
                   help="evaluate every N epochs (and always after the last one)")
    g.add_argument("--max_nonfinite", default=10, type=int, metavar="N",
                   help="a step whose loss or gradient norm is not finite is skipped (with a warning); after N "
                        "such steps in a row training stops with a resumable checkpoint and an error")
    g.add_argument("--grad_checkpoint", action="store_true",
                   help="activation checkpointing of the encoder and decoder layers and of the backbone stages that "
                        "train: less training memory for about one more forward of them per step; same gradients")
    g.add_argument("--ema_decay", default=None, type=float, metavar="D",
                   help="keep an exponential moving average of the weights, avg = D * avg + (1 - D) * weights after "
                        "every applied optimiser step (e.g. 0.9998); it is saved in the checkpoints (model_ema) and "
                        "evaluated beside the weights (test_ema_* in log.txt); off by default")
    g.add_argument("--finetune", default="", metavar="PATH",
                   help="initialise from this checkpoint's weights only, skipping tensors whose shape differs "
                        "(e.g. class heads of another --num_classes); ignored when --resume finds a checkpoint")

    g = parser.add_argument_group("data augmentation")
    g.add_argument("--scales", default=None, type=int, nargs="+", metavar="PX",
                   help="training shorter-side sizes picked at random; default the reference's 480, 512, ..., 800")
    g.add_argument("--max_size", default=1333, type=int, metavar="PX", help="longest image side after resizing")
    g.add_argument("--val_size", default=800, type=int, metavar="PX", help="evaluation shorter-side size")

    g = parser.add_argument_group("run")
    g.add_argument("--output_dir", default="", help="where checkpoints and logs go; empty saves nothing")
    g.add_argument("--device", default=None, help="cuda or cpu; default cuda when available")
    g.add_argument("--seed", default=42, type=int, help="random seed (plus the process rank)")
    g.add_argument("--resume", default="",
                   help="checkpoint to resume from (or evaluate with --eval); its stored model description gives the "
                        "model flags left out")
    g.add_argument("--config", default="", metavar="SCRIPT",
                   help="take the model flags of a configs/*.sh script (e.g. to evaluate an official checkpoint, which "
                        "stores no description); flags given on the command line win")
    g.add_argument("--checkpoint_every", default=None, type=int, metavar="N",
                   help="besides checkpoint.pth, keep checkpoint<epoch>.pth every N epochs and before each lr drop; "
                        f"default {_model_default('checkpoint_every')} (the references')")
    g.add_argument("--trust_checkpoint", action="store_true",
                   help="unpickle --resume / --finetune / --backbone_weights files without restriction (legacy files "
                        "holding other objects than weights and settings); a checkpoint can carry code that then "
                        "runs: only for files from a source you trust")
    g.add_argument("--overwrite", action="store_true",
                   help="start a fresh run (or continue another folder's --resume PATH) in an --output_dir that "
                        "holds one: its files are moved aside into <output_dir>/overwritten-<time>/, not deleted")
    g.add_argument("--start_epoch", default=0, type=int, metavar="N", help="first epoch (set by --resume)")
    g.add_argument("--eval", action="store_true", help="evaluate the --resume checkpoint and exit")
    g.add_argument("--eval_weights", default="raw", choices=("raw", "ema"),
                   help="--eval: the checkpoint's trained weights (raw) or their moving average (ema, from a run "
                        "with --ema_decay)")
    g.add_argument("--eval_split", default="val", choices=("val", "test-dev"),
                   help="--eval: val, or COCO test-dev (test2017/ and annotations/image_info_test-dev2017.json: no "
                        "ground truth, so no metrics; needs --save_detections)")
    g.add_argument("--save_detections", action="store_true",
                   help="--eval: also write the COCO results file <output_dir>/detections_<split>.json (what the "
                        "COCO evaluation server takes)")
    g.add_argument("--eval_backend", default="pycocotools", choices=("pycocotools", "faster_coco_eval"),
                   help="COCO evaluation: pycocotools (the references') or faster-coco-eval (pip install "
                        "faster-coco-eval: the same 12 numbers, faster; docs/benchmarks.md)")
    g.add_argument("--per_class", action="store_true",
                   help="print the AP of every class after an evaluation (default: the 5 best and 5 worst)")
    g.add_argument("--deterministic", action="store_true",
                   help="bitwise repeatable runs: on CPU (same machine, torch and thread count) exactly; on GPU "
                        "through torch.use_deterministic_algorithms, deterministic cuDNN and cuBLAS, and the "
                        "deformable attention's gather path, slower (an op without a deterministic version "
                        "raises)")

    g = parser.add_argument_group("logging", "a progress line every --log_every steps; every metric in "
                                             "<output_dir>/log.txt (JSON lines)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard scalars to <output_dir>/tb: the progress line's numbers every "
                        "--log_every steps, every averaged loss and metric and the 12 COCO stats every epoch "
                        "(needs the tensorboard package and --output_dir)")
    g.add_argument("--tensorboard_images", default=0, type=int, metavar="N",
                   help="with --tensorboard: the first N val images with their detections at each evaluation")
    g.add_argument("--log_level", default="INFO", choices=("DEBUG", "INFO", "WARNING"),
                   help="console detail of rank 0 (the other processes log warnings only); DEBUG adds pycocotools' "
                        "own table and the averaged stats")
    return parser


def validate_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill --model-dependent defaults and reject flag combinations that cannot work, naming the fix."""
    for key, value in MODEL_DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    import torch
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    errors = []
    errors += [f"--{flag} must be a finite number, got {value}" for flag, value in vars(args).items()
               if isinstance(value, float) and not math.isfinite(value)]
    if args.model != "deformable":
        errors += [f"--{flag} belongs to the Deformable DETR family: drop it or use --model deformable"
                   for flag in DEFORMABLE_ONLY_FLAGS if getattr(args, flag)]
        if args.rho:
            errors.append("--rho belongs to Sparse DETR: drop it or use --model deformable")
    if args.model == "deformable" and args.pre_norm:
        errors.append("--pre_norm belongs to DETR/SDETR (the deformable transformer is post-norm): drop it or use "
                      "--model detr / sdetr")
    if args.model != "sdetr":
        errors += [f"--{flag} belongs to SDETR: drop it or use --model sdetr"
                   for flag, default in SDETR_STAGE_DEFAULTS.items() if getattr(args, flag) != default]
    else:
        for flag in SDETR_STAGE_DEFAULTS:
            value = getattr(args, flag)
            if value < 1:
                errors.append(f"--{flag} must be at least 1, got {value}")
            elif flag.endswith("_heads") and args.hidden_dim % value:
                errors.append(f"--hidden_dim {args.hidden_dim} must be divisible by --{flag} {value}")
    if not 0.0 <= args.rho <= 1.0:
        errors.append(f"--rho must be in [0, 1] (a fraction of tokens), got {args.rho}")
    if args.rho and not args.two_stage:
        errors.append("--rho needs --two_stage --with_box_refine (Sparse DETR scores tokens with the two-stage "
                      "token projection); see configs/r50_sparse_detr_rho_0.1.sh")
    if args.token_selection != "dam" and not args.rho:
        errors.append(f"--token_selection {args.token_selection} chooses the tokens of Sparse DETR's sparse encoder: "
                      "it needs --rho > 0 (e.g. --rho 0.1); drop it for a dense encoder")
    if args.eff_query_init and not args.two_stage:
        errors.append("--eff_query_init needs --two_stage --with_box_refine (queries come from encoder proposals)")
    if args.eff_specific_head and not args.two_stage:
        errors.append("--eff_specific_head needs --two_stage --with_box_refine (it is the proposal head)")
    if args.two_stage and not args.with_box_refine:
        errors.append("--two_stage needs --with_box_refine (the decoder refines the proposal boxes, as in every "
                      "published two-stage config)")
    if args.nheads < 1:
        errors.append(f"--nheads must be at least 1, got {args.nheads}")
    elif args.model != "sdetr" and args.hidden_dim % args.nheads:
        errors.append(f"--hidden_dim {args.hidden_dim} must be divisible by --nheads {args.nheads}")
    if args.model == "deformable" and args.hidden_dim % 32:
        errors.append(f"--hidden_dim {args.hidden_dim} must be a multiple of 32 (GroupNorm of 32 groups)")
    for flag in ("enc_layers", "dec_layers", "num_queries", "batch_size", "epochs", "num_feature_levels"):
        if getattr(args, flag) < 1:
            errors.append(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.num_classes < 1:
        errors.append(f"--num_classes must be at least 1, got {args.num_classes}")
    if args.num_workers < 0:
        errors.append(f"--num_workers must be >= 0 (0 loads data in the main process), got {args.num_workers}")
    if not 0.0 <= args.dropout < 1.0:
        errors.append(f"--dropout must be in [0, 1) (a probability), got {args.dropout}")
    for flag in ("lr", "lr_backbone", "weight_decay", "lr_linear_proj_mult"):
        if getattr(args, flag) < 0:
            zero = " (0 freezes the backbone)" if flag == "lr_backbone" else ""
            errors.append(f"--{flag} must be >= 0{zero}, got {getattr(args, flag)}")
    if args.backbone_from_scratch and (args.backbone_weights or args.scrl_pretrained_path):
        errors.append("--backbone_from_scratch contradicts --backbone_weights / --scrl_pretrained_path: keep one")
    if args.backbone_weights and args.scrl_pretrained_path:
        errors.append("--backbone_weights and --scrl_pretrained_path both initialise the backbone: keep one")
    if args.scrl_pretrained_path and args.backbone != "resnet50":
        errors.append("--scrl_pretrained_path holds ResNet-50 weights: use --backbone resnet50")
    if args.backbone_norm == "batch" and args.backbone not in RESNET_NAMES:
        errors.append(f"--backbone_norm batch applies to ResNets; --backbone {args.backbone} has its own LayerNorms: "
                      f"drop --backbone_norm")
    if args.backbone_norm == "batch" and args.grad_checkpoint:
        errors.append("--backbone_norm batch with --grad_checkpoint: recomputing a backbone stage in backward would "
                      "update the BatchNorm running statistics twice per step; drop one of the two")
    if args.dilation and args.backbone not in ("resnet50", "resnet101"):
        errors.append(f"--dilation needs a bottleneck ResNet (resnet50/101), not --backbone {args.backbone}")
    if args.eval and not args.resume:
        errors.append("--eval evaluates a checkpoint: add --resume PATH")
    for flag in ("log_every", "eval_every", "lr_drop", "max_size", "val_size", "max_nonfinite", "checkpoint_every"):
        if getattr(args, flag) < 1:
            errors.append(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.scales is not None and min(args.scales) < 1:
        errors.append(f"--scales must be positive sizes in pixels, got {args.scales}")
    if args.clip_max_norm < 0:
        errors.append(f"--clip_max_norm must be >= 0 (0 disables clipping), got {args.clip_max_norm}")
    if args.resume == "auto" and not args.output_dir:
        errors.append("--resume auto looks for <output_dir>/checkpoint.pth: add --output_dir")
    if args.finetune and args.resume not in ("", "auto"):
        errors.append("--finetune and --resume PATH both load weights: keep one (--resume restores a whole run)")
    if args.overwrite and (args.resume == "auto" or args.eval or not args.output_dir):
        errors.append("--overwrite starts a fresh training run in --output_dir (or one that continues another "
                      "folder's --resume PATH): it goes with --output_dir, without --resume auto or --eval")
    elif args.overwrite and args.resume and Path(args.resume).resolve().parent == Path(args.output_dir).resolve():
        errors.append(f"--overwrite would move aside {args.resume}, the checkpoint --resume continues: drop "
                      "--overwrite to continue the folder's run")
    if args.start_epoch < 0:
        errors.append(f"--start_epoch must be >= 0, got {args.start_epoch}")
    elif not args.eval and args.start_epoch >= args.epochs:
        errors.append(f"--start_epoch {args.start_epoch} is not below --epochs {args.epochs}: no epoch would train; "
                      f"raise --epochs (the last epoch trained is --epochs - 1)")
    if args.tensorboard and args.eval:
        errors.append("--tensorboard logs training runs: drop it with --eval")
    elif args.tensorboard and not args.output_dir:
        errors.append("--tensorboard writes into <output_dir>/tb: add --output_dir")
    if args.tensorboard_images < 0:
        errors.append(f"--tensorboard_images must be >= 0, got {args.tensorboard_images}")
    elif args.tensorboard_images and not args.tensorboard:
        errors.append("--tensorboard_images draws detections into TensorBoard: add --tensorboard")
    if args.ema_decay is not None and not 0.0 < args.ema_decay < 1.0:
        errors.append(f"--ema_decay must be in (0, 1) (the average keeps this fraction each step, e.g. 0.9998), "
                      f"got {args.ema_decay}")
    if args.ema_decay is not None and args.eval:
        errors.append("--ema_decay averages weights while training: with --eval, choose the checkpoint's average "
                      "with --eval_weights ema instead")
    if args.eval_weights != "raw" and not args.eval:
        errors.append(f"--eval_weights {args.eval_weights} chooses the weights --eval evaluates: add --eval, or drop "
                      "it (training evaluates both when --ema_decay is set)")
    if args.finetune and args.eval:
        errors.append("--eval evaluates the --resume checkpoint: drop --finetune")
    if args.save_detections and not (args.eval and args.output_dir):
        errors.append("--save_detections writes <output_dir>/detections_<split>.json of --eval: add --eval and "
                      "--output_dir")
    if args.eval_split != "val" and not (args.eval and args.save_detections):
        errors.append(f"--eval_split {args.eval_split} has no ground truth: its detections are all you get; add "
                      "--eval --save_detections --output_dir DIR")
    if args.eval_backend == "faster_coco_eval":
        import importlib.util
        if importlib.util.find_spec("faster_coco_eval") is None:
            errors.append("--eval_backend faster_coco_eval needs the faster-coco-eval package: pip install "
                          "faster-coco-eval, or drop the flag (pycocotools)")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        errors.append(f"--device {args.device}: use cuda, cuda:N (a GPU's index) or cpu"
                      + (f" (lower case: --device {args.device.lower()})" if args.device.lower() in ("cpu", "cuda")
                         else ""))
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        errors.append(f"--device {args.device}: CUDA is not available here (no GPU, or a CPU-only PyTorch); use "
                      "--device cpu")
    if errors:
        raise SystemExit("Invalid arguments:\n  " + "\n  ".join(errors))
    from models.description import ModelDescription
    from util.errors import InputError
    try:  # the bounds on sizes and counts, before anything is allocated
        ModelDescription.from_flags(vars(args))
    except InputError as err:
        raise SystemExit(f"Invalid arguments:\n  {err}") from None
    return args


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each default; a default of None means "per --model", which the flag's help spells out."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def start_warnings(args: argparse.Namespace) -> list[str]:
    """Flags that are valid together but probably not what the user wants; logged at start-up (``runner.run``)."""
    warnings = []
    if not args.output_dir and not args.eval:
        warnings.append("no --output_dir: this run saves nothing (no checkpoint, no log.txt); add --output_dir DIR "
                        "to keep its results")
    if (args.backbone_from_scratch and args.backbone in RESNET_NAMES and args.backbone_norm == "frozen"
            and args.lr_backbone > 0):
        warnings.append(f"--backbone_from_scratch with --backbone_norm frozen: the frozen BatchNorms of a random "
                        f"{args.backbone} are identities, so its trained layers (--lr_backbone {args.lr_backbone:g}) "
                        "cannot normalise their activations; add --backbone_norm batch")
    return warnings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate main.py's flags; a checkpoint to resume, evaluate or fine-tune supplies the model
    flags left out (``model_config.adopt_checkpoint_flags``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="main.py", parents=[get_args_parser()], formatter_class=HelpFormatter,
                                     description=__doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    if args.config:
        from util.errors import InputError
        try:
            argv = [*config_script_flags(args.config), *argv]
        except InputError as err:
            raise SystemExit(f"error: --config: {err}") from None
        args = parser.parse_args(argv)
    adopt_checkpoint_flags(args, explicit_flags(parser, argv))
    return validate_args(args)


def main(args: argparse.Namespace) -> None:
    """Run, turning problems with the user's files and setup into a one-paragraph error, and a stop signal
    (already logged) into its exit status."""
    from runner import run
    from util.errors import InputError
    from util.process import TrainingStopped
    try:
        run(args, warnings=start_warnings(args))
    except (FileNotFoundError, InputError) as err:
        raise SystemExit(f"error: {err}") from None
    except TrainingStopped as stop:
        raise SystemExit(stop.exit_code) from None


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))

#!/usr/bin/env bash
# Efficient DETR (top-k query init, class-specific proposal head), Swin-T. Swin-T has no downloadable weights
# here: add --backbone_weights swin_tiny_patch4_window7_224.pth (the official Swin ImageNet release) or
# --backbone_from_scratch.
set -euo pipefail
exec "${PYTHON:-python}" -u "$(dirname "$0")/../main.py" \
    --output_dir exps/swint_efficient_detr \
    --backbone swin_tiny \
    --with_box_refine \
    --two_stage \
    --eff_query_init \
    --eff_specific_head \
    "$@"

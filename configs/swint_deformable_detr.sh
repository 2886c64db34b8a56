#!/usr/bin/env bash
# Deformable DETR, Swin-T (published: 45.7 AP, 50 epochs). Swin-T has no downloadable weights here: add
# --backbone_weights swin_tiny_patch4_window7_224.pth (the official Swin ImageNet release) or --backbone_from_scratch.
set -euo pipefail
exec "${PYTHON:-python}" -u "$(dirname "$0")/../main.py" \
    --output_dir exps/swint_deformable_detr \
    --backbone swin_tiny \
    "$@"

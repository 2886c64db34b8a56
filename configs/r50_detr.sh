#!/usr/bin/env bash
# DETR, ResNet-50: the published 42.0 AP model (facebookresearch/detr model zoo) trained 500 epochs with the lr
# drop at 400, on 8 GPUs x 2 images.
set -euo pipefail
exec "${PYTHON:-python}" -u "$(dirname "$0")/../main.py" \
    --output_dir exps/r50_detr \
    --model detr \
    --batch_size 2 \
    --epochs 500 \
    --lr_drop 400 \
    "$@"

#!/usr/bin/env bash
# SDETR (Stacked DETR), ResNet-50 (shengwenyuan/sdetr README: 150 epochs, lr drop at 100, 4 GPUs x 4 images).
set -euo pipefail
exec "${PYTHON:-python}" -u "$(dirname "$0")/../main.py" \
    --output_dir exps/r50_sdetr \
    --model sdetr \
    --batch_size 4 \
    --epochs 150 \
    --lr_drop 100 \
    "$@"

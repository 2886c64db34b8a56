#!/usr/bin/env bash
# Deformable DETR, ResNet-50 (published: 43.9 AP, 50 epochs).
set -euo pipefail
exec "${PYTHON:-python}" -u "$(dirname "$0")/../main.py" \
    --output_dir exps/r50_deformable_detr \
    "$@"

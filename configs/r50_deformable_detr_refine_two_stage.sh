#!/usr/bin/env bash
# Deformable DETR with iterative box refinement and two-stage, ResNet-50 (published: 46.0 AP, 50 epochs).
set -euo pipefail
exec "${PYTHON:-python}" -u "$(dirname "$0")/../main.py" \
    --output_dir exps/r50_deformable_detr_refine_two_stage \
    --with_box_refine \
    --two_stage \
    "$@"

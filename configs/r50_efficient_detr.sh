#!/usr/bin/env bash
# Efficient DETR (top-k query init, class-specific proposal head), ResNet-50.
set -euo pipefail
exec "${PYTHON:-python}" -u "$(dirname "$0")/../main.py" \
    --output_dir exps/r50_efficient_detr \
    --with_box_refine \
    --two_stage \
    --eff_query_init \
    --eff_specific_head \
    "$@"

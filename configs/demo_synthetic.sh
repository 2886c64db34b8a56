#!/usr/bin/env bash
# Sparse DETR (rho 0.3) small enough to train from scratch on a 2-core CPU in about 9.5 minutes: `make demo`
# (tools/make_synthetic_coco.py data, 800 train images: 128-pixel squares, circles and triangles, ids 1-3;
# 11 epochs x 100 steps of 8 images, the learning rate / 10 for the last 3). ResNet-18 from scratch (no ImageNet
# weights) with trainable BatchNorm, at the transformer's learning rate; 128-pixel images throughout. Data is
# loaded in the training process: on 2 cores a loader process competes with the training threads. The learning
# rate is the best of 4e-4, 8e-4, 1.2e-3 and 2e-3 in 10-epoch runs (README, "Demo").
set -euo pipefail
exec "${PYTHON:-python}" -u "$(dirname "$0")/../main.py" \
    --output_dir exps/demo_synthetic \
    --backbone resnet18 \
    --backbone_from_scratch \
    --backbone_norm batch \
    --hidden_dim 128 \
    --nheads 4 \
    --enc_layers 3 \
    --dec_layers 3 \
    --dim_feedforward 512 \
    --dropout 0 \
    --num_queries 30 \
    --num_feature_levels 3 \
    --num_classes 4 \
    --with_box_refine \
    --two_stage \
    --eff_query_init \
    --eff_specific_head \
    --rho 0.3 \
    --use_enc_aux_loss \
    --batch_size 8 \
    --lr 1.2e-3 \
    --lr_backbone 1.2e-3 \
    --lr_scaling none \
    --epochs 11 \
    --lr_drop 8 \
    --scales 128 \
    --val_size 128 \
    --max_size 128 \
    --num_workers 0 \
    --log_every 25 \
    "$@"

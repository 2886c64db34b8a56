#!/usr/bin/env bash
# Launch a training/evaluation command on GPUS processes with torchrun, on one node or several.
#
#   [GPUS_PER_NODE=8] [NODE_RANK=0] [MASTER_ADDR=127.0.0.1] [MASTER_PORT=29500] \
#       tools/run_dist_launch.sh GPUS COMMAND...
#
# COMMAND is a config script (./configs/r50_sparse_detr_rho_0.1.sh ...) or `python main.py ...`.
# Multi-node: run the same line on every node with its NODE_RANK and the first node's MASTER_ADDR.
# Every process gets torchrun's RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT.
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: [GPUS_PER_NODE=8] [NODE_RANK=0] [MASTER_ADDR=...] [MASTER_PORT=...] $0 GPUS COMMAND..." >&2
    exit 2
fi
GPUS=$1
shift
if [ "$GPUS" -lt 8 ]; then
    GPUS_PER_NODE=${GPUS_PER_NODE:-$GPUS}
else
    GPUS_PER_NODE=${GPUS_PER_NODE:-8}
fi
if [ $((GPUS % GPUS_PER_NODE)) -ne 0 ]; then
    echo "GPUS ($GPUS) must be a multiple of GPUS_PER_NODE ($GPUS_PER_NODE)" >&2
    exit 2
fi
NODES=$((GPUS / GPUS_PER_NODE))
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}

launcher=("$PYTHON" -m torch.distributed.run --nnodes "$NODES" --node_rank "$NODE_RANK"
          --nproc_per_node "$GPUS_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
if [ "$1" = "python" ] || [ "$1" = "python3" ] || [ "$1" = "$PYTHON" ]; then
    shift  # torchrun starts Python scripts itself
    exec "${launcher[@]}" "$@"
fi
exec "${launcher[@]}" --no-python "$@"

#!/usr/bin/env bash
# Launch a command on GPUS processes of a Slurm partition with srun (one task per GPU).
#
#   [GPUS_PER_NODE=8] [CPUS_PER_TASK=4] [MASTER_PORT=29500] [SRUN_ARGS=...] \
#       tools/run_dist_slurm.sh PARTITION JOB_NAME GPUS COMMAND...
#
# Each task maps Slurm's variables to the torch.distributed ones main.py reads (RANK, WORLD_SIZE,
# LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR = the first node of the job, MASTER_PORT).
set -euo pipefail

if [ $# -lt 4 ]; then
    echo "usage: [GPUS_PER_NODE=8] [CPUS_PER_TASK=4] $0 PARTITION JOB_NAME GPUS COMMAND..." >&2
    exit 2
fi
PARTITION=$1
JOB_NAME=$2
GPUS=$3
shift 3
if [ "$GPUS" -lt 8 ]; then
    GPUS_PER_NODE=${GPUS_PER_NODE:-$GPUS}
else
    GPUS_PER_NODE=${GPUS_PER_NODE:-8}
fi
CPUS_PER_TASK=${CPUS_PER_TASK:-4}
export MASTER_PORT=${MASTER_PORT:-29500}

# shellcheck disable=SC2086
srun -p "$PARTITION" --job-name="$JOB_NAME" --gres=gpu:"$GPUS_PER_NODE" --ntasks="$GPUS" \
    --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 ${SRUN_ARGS:-} \
    bash -c 'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID LOCAL_WORLD_SIZE=$SLURM_NTASKS_PER_NODE
             export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
             exec "$@"' _ "$@"

#!/usr/bin/env bash
# Distributed testing with torchrun.
#
#   bash tools/dist_test.sh CONFIG CHECKPOINT [GPUS] [test.py args...]
#
# GPUS = processes per node (argument or $GPUS; default: the number of visible CUDA devices,
# or 2 on a machine without CUDA, where tools/test.py uses the gloo backend on CPU).
# Multi-node: run the same command on every node with
#   NNODES=2 NODE_RANK=0|1 MASTER_ADDR=<node 0 address> [MASTER_PORT=29500]
# PORT is accepted as an alias of MASTER_PORT (mmdet's scripts use it).
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG CHECKPOINT [GPUS] [test.py args...]" >&2
  exit 2
fi
CONFIG=$1
CHECKPOINT=$2
shift 2
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
  GPUS=$1
  shift
fi
TOOLS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON=${PYTHON:-python}
if [[ -z "${GPUS:-}" ]]; then
  GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-${PORT:-29500}}

PYTHONPATH="$(dirname "$TOOLS"):${PYTHONPATH:-}" \
exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" \
  --node_rank="$NODE_RANK" \
  --master_addr="$MASTER_ADDR" \
  --master_port="$MASTER_PORT" \
  --nproc_per_node="$GPUS" \
  "$TOOLS/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "$@"

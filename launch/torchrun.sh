#!/usr/bin/env bash
# Launch longctx training with torchrun on one node or many (c10d rendezvous).
#
#   launch/torchrun.sh --config configs/tiny.yaml parallel.cp=2                 # one node, all GPUs
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh --config C ...   # on node 0
#   NNODES=4 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh --config C ...   # on node 1, ...
#
# Environment (defaults in brackets): NNODES [1], NODE_RANK [0], NPROC_PER_NODE [GPUs on this node,
# or 2 without GPUs], MASTER_ADDR [127.0.0.1], MASTER_PORT [29500], RDZV_ID [longctx],
# MAX_RESTARTS [0: a failed worker ends the run; >0 restarts the workers, which resume from the
# latest checkpoint], RDZV_TIMEOUT [900 s for every node to join]. Everything after the script name
# is passed to `longctx train`.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NPROC_PER_NODE=$(nvidia-smi -L | wc -l)
  else
    NPROC_PER_NODE=2
  fi
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

exec "$PY" -m torch.distributed.run \
  --nnodes "$NNODES" \
  --node-rank "$NODE_RANK" \
  --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d \
  --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
  --rdzv-id "${RDZV_ID:-longctx}" \
  --rdzv-conf "timeout=${RDZV_TIMEOUT:-900}" \
  --max-restarts "${MAX_RESTARTS:-0}" \
  -m longctx train "$@"

#!/usr/bin/env bash
# Launch longctx training with the DeepSpeed launcher over the nodes of a hostfile.
#
#   launch/deepspeed.sh --config configs/tiny.yaml parallel.zero_stage=2
#   HOSTFILE=launch/hostfile.example launch/deepspeed.sh --config C parallel.cp=8
#
# HOSTFILE [launch/hostfile; without one, this node only] lists `hostname slots=N` lines (see
# launch/hostfile.example); the launcher reaches the other nodes over passwordless ssh.
# MASTER_ADDR / MASTER_PORT [first host / 29500]. `parallel.engine=deepspeed` is added for you;
# pass parallel.deepspeed_config=FILE to use your own DeepSpeed JSON (without optimizer/scheduler).
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
args=(--master_port "${MASTER_PORT:-29500}")
HOSTFILE=${HOSTFILE:-launch/hostfile}
if [[ -f "$HOSTFILE" ]]; then
  args+=(--hostfile "$HOSTFILE")
  [[ -n "${MASTER_ADDR:-}" ]] && args+=(--master_addr "$MASTER_ADDR")
elif [[ -n "${NPROC_PER_NODE:-}" ]]; then
  args+=(--num_gpus "$NPROC_PER_NODE")
fi

exec "$PY" -m deepspeed.launcher.runner "${args[@]}" --no_local_rank --module longctx train "$@" parallel.engine=deepspeed

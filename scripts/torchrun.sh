#!/usr/bin/env bash
# Launch a recipe with torchrun (PyTorch's elastic launcher, c10d rendezvous); Lightning sees the torchrun
# environment and runs DDP in the launched processes instead of spawning its own.
#
# One machine, NPROC processes (one per GPU; on CPU one per core, gloo):
#   scripts/torchrun.sh 8 recipes/fox_lm.yaml [--trainer.max_steps=1000 ...]
# Several machines: run the same line on every node with the same MASTER_ADDR/MASTER_PORT and NNODES
# (node ranks are assigned by the rendezvous):
#   NNODES=2 MASTER_ADDR=node0 MASTER_PORT=29500 scripts/torchrun.sh 8 recipes/fox_lm.yaml
# Environment: PYTHON (default: python), NNODES (1), MASTER_ADDR / MASTER_PORT (multi-node rendezvous),
# RDZV_ID (job id shared by the nodes, default "recipes"), STRATEGY (default: the recipe's own trainer.strategy,
# i.e. DDP for most recipes and per-block FSDP for fox_125m/360m/760m; set it to override).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NPROC_PER_NODE RECIPE.yaml [--key=value ...]" >&2
  exit 2
fi
NPROC=$1
RECIPE=$2
shift 2
NNODES=${NNODES:-1}
PYTHON=${PYTHON:-python}
if [ "$NNODES" = "1" ] && [ -z "${MASTER_ADDR:-}" ]; then
  RDZV=(--standalone)  # single node: a free local port, no external rendezvous
else
  RDZV=(--rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR:?set MASTER_ADDR for multi-node}:${MASTER_PORT:-29500}"
        --rdzv-id="${RDZV_ID:-recipes}")
fi
STRATEGY_ARG=()
if [ -n "${STRATEGY:-}" ]; then STRATEGY_ARG=(--trainer.strategy="$STRATEGY"); fi
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$NPROC" "${RDZV[@]}" \
  -m recipes fit --config "$RECIPE" "${STRATEGY_ARG[@]}" --trainer.devices="$NPROC" \
  --trainer.num_nodes="$NNODES" "$@"

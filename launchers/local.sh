#!/usr/bin/env bash
# Local launcher for a workstation: N processes with torchrun (gloo on CPU, nccl on GPUs).
#   launchers/local.sh 2 +stage=stage2 model.tensor_model_parallel_size=2 model.sequence_parallel=true
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NPROC="${1:?usage: launchers/local.sh NPROC +stage=<stage> [overrides...]}"
shift
exec "$ROOT/.venv/bin/torchrun" --nproc-per-node="$NPROC" --rdzv-backend=c10d --rdzv-endpoint=localhost:0 \
  -m nemo_pixellm.train "$@"

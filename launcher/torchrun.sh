#!/usr/bin/env bash
# Start N ranks on this node with torchrun.
#   launcher/torchrun.sh N COMMAND [--config FILE] [key=value ...]
#   e.g. launcher/torchrun.sh 2 doctor
# Extra torchrun flags go in TORCHRUN_ARGS (e.g. "--rdzv-backend c10d --rdzv-endpoint host:29500
# --nnodes 2" for a manual multi-node start; slurm/multi-node.sbatch does that for you).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [ $# -lt 2 ]; then echo "usage: $0 NPROC COMMAND [--config FILE] [key=value ...]" >&2; exit 2; fi
nproc=$1; shift
if [ -n "${TORCHRUN_ARGS:-}" ]; then
  # shellcheck disable=SC2086
  exec "$FEDPFT_PYTHON" -m torch.distributed.run --nproc-per-node "$nproc" $TORCHRUN_ARGS -m fedpft_dist "$@"
fi
exec "$FEDPFT_PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$nproc" -m fedpft_dist "$@"

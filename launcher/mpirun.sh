#!/usr/bin/env bash
# Start N ranks with mpirun (MPICH from the virtual environment by default).
#   launcher/mpirun.sh N COMMAND [--config FILE] [key=value ...]
#   MPIRUN       mpirun to use (default: the one next to FEDPFT_PYTHON, else mpirun on PATH)
#   MPIRUN_ARGS  extra mpirun flags, e.g. "-hosts node1,node2" (MPICH) or
#                "--allow-run-as-root --oversubscribe" (Open MPI as root)
# Rank 0 picks a free port and shares it through mpi4py; no MASTER_ADDR/PORT needed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [ $# -lt 2 ]; then echo "usage: $0 NPROC COMMAND [--config FILE] [key=value ...]" >&2; exit 2; fi
nproc=$1; shift
mpirun=${MPIRUN:-$(dirname "$FEDPFT_PYTHON")/mpirun}
[ -x "$mpirun" ] || mpirun=$(command -v mpirun) || { echo "mpirun not found: install mpich (pip) or set MPIRUN" >&2; exit 2; }
# mpirun does not limit threads: give each local rank its share of the cores.
cores=$(nproc)
threads=$(( cores / nproc )); [ "$threads" -ge 1 ] || threads=1
# shellcheck disable=SC2086
exec "$mpirun" -n "$nproc" ${MPIRUN_ARGS:-} env OMP_NUM_THREADS="${OMP_NUM_THREADS:-$threads}" \
  "$FEDPFT_PYTHON" -m fedpft_dist "$@"

#!/usr/bin/env bash
# The per-task entry that `srun` starts: one rank per Slurm task.
#   srun launcher/srun-task.sh COMMAND [--config FILE] [key=value ...]
# Rank, world size and local rank come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; the head
# node is the first host of SLURM_JOB_NODELIST and the port is derived from the job id
# (MASTER_ADDR / MASTER_PORT in the environment override both).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
exec "$FEDPFT_PYTHON" -m fedpft_dist "$@"

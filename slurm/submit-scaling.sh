#!/usr/bin/env bash
# Submit one `fedpft bench` workload at several node counts, one job per size (slurm/multi-node.sbatch
# with --nodes=N, GPUS_PER_NODE ranks on each node), each into its own run directory PARENT/nodes-N;
# then print the `fedpft report` command that makes the scaling table once they have finished.
# Not a job script: run it on the login node, from the repository root.
#
# Usage:
#   slurm/submit-scaling.sh PARENT [--config FILE] [key=value ...]
#   e.g. SCALING_NODES="1 2 4 8" SBATCH_ARGS="--gpus-per-node=8 --cpus-per-task=64 -p gpu" \
#          slurm/submit-scaling.sh runs/scaling-w1 --config configs/bench/w1.yaml
# PARENT should be on the shared file system (a relative path is relative to this directory, where
# the jobs run). A size whose PARENT/nodes-N/bench.json exists is skipped, so running the same command
# again submits only the sizes that failed. The runs must be one workload: give every size the same
# config and overrides (run.dir is set here); `fedpft report` refuses runs whose configs differ.
#
# Variables read (all optional):
#   SCALING_NODES    node counts to submit (default: "1 2 4")
#   SBATCH_ARGS      extra sbatch flags for every job, split on spaces (partition, GPUs, CPUs, time)
#   GPUS_PER_NODE    ranks per node, passed on to slurm/multi-node.sbatch (default there: the GPUs
#                    Slurm gave the job, else 1)
#   FEDPFT_HOME      repository checkout (default: this script's directory's parent)
#   FEDPFT_PYTHON, FEDPFT_LOG_DIR, RDZV_PORT, SRUN_ARGS, OMP_NUM_THREADS: read by the jobs
#                    (slurm/multi-node.sbatch), which sbatch passes the environment to
set -euo pipefail
if [ $# -lt 1 ] || [[ $1 == -* ]] || [[ $1 == *=* ]]; then
  echo "usage: slurm/submit-scaling.sh PARENT [--config FILE] [key=value ...]" >&2
  exit 2
fi
parent=${1%/}; shift
for arg in "$@"; do
  if [[ $arg == run.dir=* ]]; then
    echo "submit-scaling.sh: run.dir is set per size (PARENT/nodes-N); leave it out of the overrides" >&2
    exit 2
  fi
done
FEDPFT_HOME=${FEDPFT_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
sizes=${SCALING_NODES:-1 2 4}
dirs=()
for n in $sizes; do
  run_dir=$parent/nodes-$n
  dirs+=("$run_dir")
  if [ -f "$run_dir/bench.json" ]; then
    echo "nodes=$n: skipped, $run_dir/bench.json exists"
    continue
  fi
  # shellcheck disable=SC2086
  job=$(sbatch --parsable --nodes="$n" --job-name="scaling-$n" ${SBATCH_ARGS:-} \
    "$FEDPFT_HOME/slurm/multi-node.sbatch" bench "$@" "run.dir=$run_dir")
  echo "nodes=$n: job ${job%%;*} -> $run_dir"
done
echo "when the jobs have finished (squeue --me), the scaling table:"
echo "  fedpft report ${dirs[*]} --out $parent/report"

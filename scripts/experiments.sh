#!/usr/bin/env bash
# The runs behind docs/results.md, each a 2-rank job on this machine, then one report over all:
#   tweets (configs/experiments/tweets.yaml), seeds 0-4, about 30 minutes per seed on 2 CPU cores:
#     IID split:               FedPFT, FedPETuning, FedOT, FedPFT without layer-level distillation,
#                              FedPFT without neuron-level alignment
#     Dirichlet alpha=1 split: FedPFT, FedPETuning, FedOT
#   Austen next-token training on SmolLM2-135M (configs/smollm2-austen.yaml), seeds 0-2, about
#   16 minutes per seed: FedPFT, FedPETuning, FedOT (AUSTEN_METHODS to choose); every round's global
#   adapter is kept (round_adapters/: a trajectory for `fedpft fidelity --trajectory`)
#   bash scripts/experiments.sh                       everything, then the report
#   PARTS=tweets SEEDS="0 1" bash scripts/experiments.sh
#   PARTS=austen AUSTEN_METHODS="fedpft fedpetuning" OUT=runs/experiments-refit bash scripts/experiments.sh
# It resumes: a finished run (summary.json) is skipped, an interrupted one continues from its newest
# round checkpoint. Per seed, the proxy is built and distilled once and shared by the FedPFT variants.
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=${PARTS:-tweets austen}
OUT=${OUT:-runs/experiments}
PY=${FEDPFT_PYTHON:-.venv/bin/python}
REPORT=${REPORT:-1}
run() { FEDPFT_PYTHON=$PY launcher/torchrun.sh 2 "$@"; }

# experiment CONFIG OUT "SEEDS" "IID METHODS" "DIRICHLET METHODS" [OVERRIDE ...]
experiment() {
  local config=$1 out=$2 seeds=$3 iid=$4 noniid=$5; shift 5
  local seed shared method
  for seed in $seeds; do
    shared=$out/shared/seed$seed
    if [ ! -f "$shared/proxy_distilled/config.json" ]; then
      run distill --config "$config" run.dir="$shared" run.seed="$seed" "$@"
    fi
    for method in $noniid; do train "$config" "$out" "$seed" dirichlet "$method" "$@"; done
    for method in $iid; do train "$config" "$out" "$seed" iid "$method" "$@"; done
  done
}

train() {  # train CONFIG OUT SEED PARTITION METHOD [OVERRIDE ...]
  local config=$1 out=$2 seed=$3 part=$4 method=$5; shift 5
  local dir=$out/$method-$part-seed$seed shared=$out/shared/seed$seed
  if [ -f "$dir/summary.json" ]; then return; fi
  run train --config "$config" run.dir="$dir" run.seed="$seed" fed.method="$method" fed.partition="$part" \
    fed.resume=true distill.proxy="$shared/proxy" distill.out="$shared/proxy_distilled" "$@"
}

for part in $PARTS; do
  case $part in
    tweets) experiment configs/experiments/tweets.yaml "$OUT/tweets" "${SEEDS:-0 1 2 3 4}" \
              "fedpft fedpetuning fedot fedpft_no_layer_distill fedpft_no_neuron_distill" "fedpft fedpetuning fedot" ;;
    austen) experiment configs/smollm2-austen.yaml "$OUT/austen" "${SEEDS:-0 1 2}" \
              "${AUSTEN_METHODS:-fedpft fedpetuning fedot}" "" fed.checkpoint_every=2 fed.save_round_adapters=true ;;
    *) echo "PARTS: unknown part '$part' (tweets, austen)" >&2; exit 2 ;;
  esac
done
if [ "$REPORT" = 1 ]; then "$PY" -m fedpft_dist report "$OUT/tweets" "$OUT/austen" --out docs/results; fi

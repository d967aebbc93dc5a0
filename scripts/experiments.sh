#!/usr/bin/env bash
# The runs behind docs/results.md: 5 methods x {IID, Dirichlet alpha=1} x seeds 0 1 2, each a
# 2-rank job on this machine, then one report over all of them.
#   bash scripts/experiments.sh            (about 40-60 minutes on 2 CPU cores)
#   SEEDS="0" METHODS="fedpft fedot" bash scripts/experiments.sh
# Per seed, the proxy is built and distilled once and shared by the three fedpft variants.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/experiments/tweets.yaml}
OUT=${OUT:-runs/experiments}
SEEDS=${SEEDS:-0 1 2}
METHODS=${METHODS:-fedpft fedpetuning fedot fedpft_no_layer_distill fedpft_no_neuron_distill}
PARTITIONS=${PARTITIONS:-iid dirichlet}
run() { launcher/torchrun.sh 2 "$@"; }

for seed in $SEEDS; do
  shared=$OUT/shared/seed$seed
  if [ ! -f "$shared/proxy_distilled/config.json" ]; then
    run distill --config "$CONFIG" run.dir="$shared" run.seed="$seed"
  fi
  for part in $PARTITIONS; do
    for method in $METHODS; do
      dir=$OUT/$method-$part-seed$seed
      if [ -f "$dir/summary.json" ]; then continue; fi
      run train --config "$CONFIG" run.dir="$dir" run.seed="$seed" fed.method="$method" fed.partition="$part" \
        distill.proxy="$shared/proxy" distill.out="$shared/proxy_distilled"
    done
  done
done
.venv/bin/fedpft report "$OUT" --out docs/results

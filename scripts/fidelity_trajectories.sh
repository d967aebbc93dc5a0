#!/usr/bin/env bash
# The fixed-trajectory measurements of docs/fidelity.md, each a 2-rank job on this machine:
#   1. trajectories: every round's global adapter of one FedPETuning run on the quick start (MiniLM,
#      tweets, 10 rounds) and on configs/smollm2-austen.yaml (SmolLM2-135M, Austen, 6 rounds);
#   2. client models scored along them with `fedpft fidelity`: the quick start's proxy at probe sizes
#      64, 128 and 256 (the interval's half-width), then per variant at the default probe size;
#   3. SmolLM2: FedPFT trained on the best-scoring proxy, to set beside the trajectory's FedPETuning run.
#   bash scripts/fidelity_trajectories.sh                   everything
#   PARTS=minilm bash scripts/fidelity_trajectories.sh      one model
# It resumes: a trajectory with a summary.json and a score with its JSON are skipped; a variant's
# proxy is built and distilled once in its run directory and reused by fingerprint afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=${PARTS:-minilm smollm2}
OUT=${OUT:-runs/fidelity}
PY=${FEDPFT_PYTHON:-.venv/bin/python}
run() { FEDPFT_PYTHON=$PY launcher/torchrun.sh 2 "$@"; }

trajectory() {  # trajectory CONFIG DIR [OVERRIDE ...]
  local config=$1 dir=$2; shift 2
  if [ -f "$dir/summary.json" ]; then return; fi
  run train --config "$config" run.dir="$dir" fed.method=fedpetuning fed.save_round_adapters=true \
    fed.fidelity_every=0 fed.resume=true "$@"
}

train() {  # train CONFIG RUN_DIR [OVERRIDE ...]: federated training with the client model built in RUN_DIR
  local config=$1 dir=$2; shift 2
  if [ -f "$dir/summary.json" ]; then return; fi
  run train --config "$config" run.dir="$dir" fed.resume=true "$@"
}

score() {  # score CONFIG TRAJECTORY RUN_DIR JSON [OVERRIDE ...]
  local config=$1 traj=$2 dir=$3 json=$4; shift 4
  if [ -f "$json" ]; then return; fi
  run fidelity --config "$config" run.dir="$dir" --trajectory "$traj/round_adapters" --json "$json" "$@"
}

for part in $PARTS; do
  case $part in
    minilm)
      config=configs/quickstart.yaml traj=$OUT/minilm-fedpetuning
      trajectory "$config" "$traj"
      for n in 64 128 256; do
        score "$config" "$traj" "$OUT/minilm-fedpft" "$OUT/minilm-fedpft-probe$n.json" fed.fidelity_examples=$n
      done
      score "$config" "$traj" "$OUT/minilm-undistilled" "$OUT/minilm-undistilled.json" \
        fed.method=fedpft_no_layer_distill
      score "$config" "$traj" "$OUT/minilm-fedot" "$OUT/minilm-fedot.json" fed.method=fedot
      score "$config" "$traj" "$OUT/minilm-keep0.5" "$OUT/minilm-keep0.5.json" proxy.keep_ratio=0.5
      # the proxy's output projections refitted to the whole FFNs (proxy.compensate), neurons ranked
      # by weight or by mean |activation|, with the config's layer-level distillation
      score "$config" "$traj" "$OUT/minilm-comp" "$OUT/minilm-comp.json" \
        proxy.compensate=true proxy.calibration_chunks=256
      score "$config" "$traj" "$OUT/minilm-meanabs-comp" "$OUT/minilm-meanabs-comp.json" \
        proxy.compensate=true proxy.calibration_chunks=256 proxy.saliency=mean_abs
      ;;
    smollm2)
      config=configs/smollm2-austen.yaml traj=$OUT/smollm2-fedpetuning
      trajectory "$config" "$traj" fed.eval_every=6
      score "$config" "$traj" "$OUT/smollm2-fedpft" "$OUT/smollm2-fedpft.json"
      score "$config" "$traj" "$OUT/smollm2-undistilled" "$OUT/smollm2-undistilled.json" \
        fed.method=fedpft_no_layer_distill
      score "$config" "$traj" "$OUT/smollm2-meanabs-comp" "$OUT/smollm2-meanabs-comp.json" \
        fed.method=fedpft_no_layer_distill proxy.saliency=mean_abs proxy.calibration_chunks=256 proxy.compensate=true
      score "$config" "$traj" "$OUT/smollm2-meanabs-comp-distilled" "$OUT/smollm2-meanabs-comp-distilled.json" \
        proxy.saliency=mean_abs proxy.calibration_chunks=256 proxy.compensate=true
      # FedPFT trained on that proxy (seed 0, the trajectory's seed), against the trajectory's FedPETuning run
      train "$config" "$OUT/smollm2-meanabs-comp-distilled" proxy.saliency=mean_abs proxy.calibration_chunks=256 \
        proxy.compensate=true fed.fidelity_every=0
      ;;
    *) echo "unknown part $part (minilm, smollm2)" >&2; exit 2 ;;
  esac
done

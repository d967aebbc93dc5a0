#!/usr/bin/env bash
# The fixed-trajectory measurements of docs/fidelity.md, each a 2-rank job on this machine:
#   1. trajectories: every round's global adapter of one FedPETuning run on the quick start (MiniLM,
#      tweets, 10 rounds) and on configs/smollm2-austen.yaml (SmolLM2-135M, Austen, 6 rounds);
#   2. client models scored along them with `fedpft fidelity`: the quick start's proxy at probe sizes
#      64, 128 and 256 (the interval's half-width), then per variant at the default probe size;
#   MINILM_NOISE: distill.adapter_noise of the perturbed variants (about the scale the trajectory's
#   adapters reach: scripts/adapter_scale.py).
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
MINILM_NOISE=${MINILM_NOISE:-0.1}

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
      # the emulator scores the trajectory's LoRA: LoRA on its adapter layers (full tuning has none)
      score "$config" "$traj" "$OUT/minilm-fedot" "$OUT/minilm-fedot.json" fed.method=fedot fed.fedot_tuning=lora
      score "$config" "$traj" "$OUT/minilm-keep0.5" "$OUT/minilm-keep0.5.json" proxy.keep_ratio=0.5
      # the proxy's output projections refitted to the whole FFNs (proxy.compensate), neurons ranked
      # by weight or by mean |activation|, with the config's layer-level distillation
      score "$config" "$traj" "$OUT/minilm-comp" "$OUT/minilm-comp.json" \
        proxy.compensate=true proxy.calibration_chunks=256
      score "$config" "$traj" "$OUT/minilm-meanabs-comp" "$OUT/minilm-meanabs-comp.json" \
        proxy.compensate=true proxy.calibration_chunks=256 proxy.saliency=mean_abs
      # layer-level distillation with adapter perturbation (at the scale the trajectory's adapters
      # reach), with the derivative term, with both
      score "$config" "$traj" "$OUT/minilm-noise" "$OUT/minilm-noise.json" distill.adapter_noise=$MINILM_NOISE
      score "$config" "$traj" "$OUT/minilm-jvp" "$OUT/minilm-jvp.json" distill.jvp_weight=1
      score "$config" "$traj" "$OUT/minilm-noise-jvp" "$OUT/minilm-noise-jvp.json" \
        distill.adapter_noise=$MINILM_NOISE distill.jvp_weight=1
      # the distillation's budget (4 x the config's 40 steps), alone and with the derivative term
      score "$config" "$traj" "$OUT/minilm-steps160" "$OUT/minilm-steps160.json" distill.steps=160
      score "$config" "$traj" "$OUT/minilm-steps160-jvp" "$OUT/minilm-steps160-jvp.json" distill.steps=160 \
        distill.jvp_weight=1
      # per-layer widths at the same client parameters (1,536 kept neurons over layers 1-4)
      score "$config" "$traj" "$OUT/minilm-width-bottom" "$OUT/minilm-width-bottom.json" \
        "proxy.keep_ratios=[1,0.375,0.3125,0.1875,0.125,1]"
      score "$config" "$traj" "$OUT/minilm-width-top" "$OUT/minilm-width-top.json" \
        "proxy.keep_ratios=[1,0.125,0.1875,0.3125,0.375,1]"
      # in-domain public text: the tweets the config's data.max_train leaves out, instead of Austen
      if [ ! -f "$OUT/tweets-public.jsonl" ]; then
        "$PY" scripts/in_domain_text.py --config "$config" --out "$OUT/tweets-public.jsonl"
      fi
      score "$config" "$traj" "$OUT/minilm-tweets-text" "$OUT/minilm-tweets-text.json" \
        public_text.source="$OUT/tweets-public.jsonl"
      score "$config" "$traj" "$OUT/minilm-tweets-text-steps160-jvp" "$OUT/minilm-tweets-text-steps160-jvp.json" \
        public_text.source="$OUT/tweets-public.jsonl" distill.steps=160 distill.jvp_weight=1
      ;;
    smollm2)
      # The trajectory: FedPETuning with FFN LoRA on every layer (fed.lora_ffn_layers=all; the config's
      # default now puts it on the proxy's retained layers only, as FedPFT's clients do)
      config=configs/smollm2-austen.yaml traj=$OUT/smollm2-fedpetuning
      paper="proxy.saliency=weight proxy.calibration_chunks=32 proxy.compensate=false"
      trajectory "$config" "$traj" fed.eval_every=6 fed.lora_ffn_layers=all
      # $paper: the paper's construction (weight saliency, no refit)
      score "$config" "$traj" "$OUT/smollm2-fedpft" "$OUT/smollm2-fedpft.json" $paper
      score "$config" "$traj" "$OUT/smollm2-undistilled" "$OUT/smollm2-undistilled.json" \
        fed.method=fedpft_no_layer_distill $paper
      # the config's construction (mean |activation|, output projections refitted), then with the
      # config's distillation, with the derivative term
      score "$config" "$traj" "$OUT/smollm2-meanabs-comp" "$OUT/smollm2-meanabs-comp.json" \
        fed.method=fedpft_no_layer_distill
      # (the distilled variants start from the undistilled row's proxy: it is built once)
      proxy=distill.proxy=$OUT/smollm2-meanabs-comp/proxy
      score "$config" "$traj" "$OUT/smollm2-meanabs-comp-distilled" "$OUT/smollm2-meanabs-comp-distilled.json" $proxy
      score "$config" "$traj" "$OUT/smollm2-jvp" "$OUT/smollm2-jvp.json" $proxy distill.jvp_weight=1
      ;;
    *) echo "unknown part $part (minilm, smollm2)" >&2; exit 2 ;;
  esac
done

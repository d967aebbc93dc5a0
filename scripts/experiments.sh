#!/usr/bin/env bash
# The runs behind docs/results.md, each a 2-rank job on this machine, then one report per comparison:
#   decoder: SmolLM2-135M-Instruct, seeds 0-4, about 36 minutes per seed on 2 CPU cores; per seed one
#     proxy (built and distilled once) and one FedOT emulator serve both tasks:
#     tweets as sequence classification (configs/experiments/smollm2-tweets.yaml)
#       IID split:               FedOT, FedPFT, FedPETuning, FedPFT without layer-level distillation,
#                                FedPFT without neuron-level alignment
#       Dirichlet alpha=1 split: FedPFT, FedPETuning, FedOT
#     Austen next-token training (configs/experiments/smollm2-austen.yaml): FedPFT, FedPETuning, FedOT
#     -> docs/results/decoder/
#   tweets: all-MiniLM-L6-v2 on tweets (configs/experiments/tweets.yaml), seeds 0-4, about 30 minutes
#     per seed: the five methods on the IID split, FedPFT, FedPETuning and FedOT on the Dirichlet split
#   austen: Austen next-token training with configs/smollm2-austen.yaml, seeds 0-2, about 16 minutes
#     per seed: FedPFT, FedPETuning, FedOT (AUSTEN_METHODS to choose); every round's adapter is kept
#     -> docs/results/ (tweets and austen together)
#   bash scripts/experiments.sh                       the decoder comparison, then its report
#   PARTS="tweets austen" bash scripts/experiments.sh
#   PARTS=decoder SEEDS="0 1" REPORT=0 bash scripts/experiments.sh
# It resumes: a finished run (summary.json) is skipped, an interrupted one continues from its newest
# round checkpoint, a finished proxy or emulator is reused. The decoder part also keeps each finished
# run's summary.json, metrics.jsonl and config.yaml (and a FedOT run's emulator distillation: distill.json,
# emulator.json) under docs/results/decoder/runs/ (ARCHIVE=...), and each seed's proxy distillation
# under docs/results/decoder/runs/proxy/:
# those are all that `fedpft report` reads, the report is drawn from them, and a run kept there is not
# run again, so the comparison resumes on a fresh clone once the kept files are committed. A seed fixes the data split, the partition,
# the head's initialisation, the client sample, the proxy's calibration text and both distillations'
# data order, the same for every method, so the seeds pair the runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=${PARTS:-decoder}
OUT=${OUT:-runs/experiments}
PY=${FEDPFT_PYTHON:-.venv/bin/python}
REPORT=${REPORT:-1}
ARCHIVE=${ARCHIVE:-docs/results/decoder/runs}
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

train() {  # train CONFIG OUT SEED PARTITION METHOD [OVERRIDE ...]  (the proxy and emulator of $SHARED)
  local config=$1 out=$2 seed=$3 part=$4 method=$5; shift 5
  local name=$method-$part-seed$seed
  local dir=$out/$name shared=${SHARED:-$out/shared}/seed$seed kept=${KEEP:+$KEEP/$(basename "$out")/$name}
  if [ -n "$kept" ] && [ -f "$kept/summary.json" ]; then return; fi
  if [ ! -f "$dir/summary.json" ]; then
    run train --config "$config" run.dir="$dir" run.seed="$seed" fed.method="$method" fed.partition="$part" \
    fed.resume=true distill.proxy="$shared/proxy" distill.out="$shared/proxy_distilled" \
    distill.emulator_out="$shared/emulator_distilled" "$@"
  fi
  if [ -n "$kept" ]; then
    mkdir -p "$kept"
    cp "$dir/summary.json" "$dir/metrics.jsonl" "$dir/config.yaml" "$kept/"
    for f in distill.json distill_log.jsonl emulator.json; do  # a FedOT run's emulator and its distillation
      if [ -f "$dir/$f" ]; then cp "$dir/$f" "$kept/"; fi
    done
  fi
}

decoder() {  # decoder OUT "SEEDS"
  local out=$1 seed method tweets=configs/experiments/smollm2-tweets.yaml austen=configs/experiments/smollm2-austen.yaml
  for seed in $2; do
    if [ ! -f "$ARCHIVE/smollm2-austen/fedot-iid-seed$seed/summary.json" ] \
       && [ ! -f "$out/shared/seed$seed/proxy_distilled/config.json" ]; then
      run distill --config "$tweets" run.dir="$out/shared/seed$seed" run.seed="$seed"
    fi
    if [ -f "$out/shared/seed$seed/distill.json" ]; then  # the proxy's distillation, before/after fidelity
      mkdir -p "$ARCHIVE/proxy/seed$seed"
      cp "$out/shared/seed$seed/distill.json" "$out/shared/seed$seed/distill_log.jsonl" "$ARCHIVE/proxy/seed$seed/"
    fi
    for method in fedot fedpft fedpetuning fedpft_no_layer_distill fedpft_no_neuron_distill; do
      KEEP=$ARCHIVE SHARED=$out/shared train "$tweets" "$out/smollm2-tweets" "$seed" iid "$method"
    done
    for method in fedpft fedpetuning fedot; do
      KEEP=$ARCHIVE SHARED=$out/shared train "$tweets" "$out/smollm2-tweets" "$seed" dirichlet "$method"
    done
    for method in fedpft fedpetuning fedot; do
      KEEP=$ARCHIVE SHARED=$out/shared train "$austen" "$out/smollm2-austen" "$seed" iid "$method"
    done
  done
}

for part in $PARTS; do
  case $part in
    decoder) decoder "$OUT/decoder" "${SEEDS:-0 1 2 3 4}"
             if [ "$REPORT" = 1 ]; then
               "$PY" -m fedpft_dist report "$ARCHIVE/smollm2-tweets" "$ARCHIVE/smollm2-austen" --out docs/results/decoder
             fi ;;
    tweets) experiment configs/experiments/tweets.yaml "$OUT/tweets" "${SEEDS:-0 1 2 3 4}" \
              "fedpft fedpetuning fedot fedpft_no_layer_distill fedpft_no_neuron_distill" "fedpft fedpetuning fedot" ;;
    austen) experiment configs/smollm2-austen.yaml "$OUT/austen" "${SEEDS:-0 1 2}" \
              "${AUSTEN_METHODS:-fedpft fedpetuning fedot}" "" fed.checkpoint_every=2 fed.save_round_adapters=true ;;
    *) echo "PARTS: unknown part '$part' (decoder, tweets, austen)" >&2; exit 2 ;;
  esac
done
case " $PARTS " in *" tweets "*|*" austen "*)
  if [ "$REPORT" = 1 ]; then "$PY" -m fedpft_dist report "$OUT/tweets" "$OUT/austen" --out docs/results; fi ;;
esac

#!/usr/bin/env bash
# The GPU check: one command on a machine with a CUDA device, 660 s of phase limits, everything it
# writes under OUTDIR (gpu-check.json with every phase's result and log tail, summary.md, the full
# log gpu-check.log), a summary table printed last. Nothing is downloaded: the models are built from
# config.json with seeded random weights (random:DIR model paths), and what the machine's image lacks
# comes from the kit (scripts/gpu-kit.sh, default .gpu-kit), installed into a temporary directory.
#
#   scripts/gpu-check.sh OUTDIR            FEDPFT_PYTHON picks the interpreter (default: python3)
#                                          FEDPFT_GPU_KIT the kit (default: .gpu-kit)
#
# Phases, each under its own time limit (660 s in all):
#   probe        30 s  versions; fused AdamW, SDPA, NCCL, DeepSpeed's accelerator, FSDP2, peft LoRA in
#                      bf16, the Triton driver, each tried on the device
#   kernels      60 s  compiled Triton against the PyTorch references at LLaMA-2-7B and 70B widths:
#                      exactness, GB/s against a measured device-to-device copy
#   distill      80 s  layer-level distillation of the SmolLM2-135M-shaped proxy at ZeRO-3 in bf16,
#                      with a checkpoint half way
#   resume       60 s  the same distillation resumed from that checkpoint: the distilled proxy must
#                      equal the uninterrupted run's bit for bit
#   pipeline-z0  80 s  fedpft bench on that decoder in bf16: rounds, an alignment at ZeRO-0,
#                      evaluation and the fidelity monitor; limit ratios, tokens/s, peak memory
#                      against fedpft memory-plan; the evaluation FM's LoRA keeps its dtype
#   pipeline-z3  80 s  the same with the alignment at ZeRO-3
#   client-step  60 s  one client LoRA step on the LLaMA-2-7B-shaped decoder's proxy at 4x512 and
#                      1x4096 tokens, with and without activation checkpointing: tokens/s, MFU, peak
#                      memory against memory-plan
#   doctor       30 s  fedpft doctor, one rank per local GPU (at one GPU it says that no collective ran)
#   tests       180 s  tests/test_gpu.py on the kit's random SmolLM2-shaped decoder: the quick tests, then
#                      the tiny pipeline at ZeRO-3 with checkpoint and resume, bf16, a server optimizer
#                      with a stop signal, ZeRO-0; the ones for two GPUs skip on one
# Without a CUDA device it writes {"cuda": false} to OUTDIR/gpu-check.json and exits 0 at once.
# FEDPFT_GPU_CHECK_DEVICE=cpu runs every phase on the CPU at small sizes: a rehearsal of the script
# itself (its numbers say nothing about a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
PY=${FEDPFT_PYTHON:-python3}
kit=${FEDPFT_GPU_KIT:-$repo/.gpu-kit}
[ $# -eq 1 ] || { echo "usage: scripts/gpu-check.sh OUTDIR" >&2; exit 2; }
outdir=$1
mkdir -p "$outdir" || exit 2
outdir=$(cd "$outdir" && pwd)
device=${FEDPFT_GPU_CHECK_DEVICE:-cuda}
# The limits are a GPU's; the CPU rehearsal runs the same phases slower.
scale=$([ "$device" = cuda ] && echo 1 || echo "${FEDPFT_GPU_CHECK_SCALE:-8}")

if [ "$device" = cuda ]; then
  gpus=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
  if [ "$gpus" = 0 ]; then
    echo "gpu-check: no CUDA device here; nothing to check"
    echo '{"cuda": false}' > "$outdir/gpu-check.json"
    exit 0
  fi
else
  gpus=1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log=$outdir/gpu-check.log
: > "$log"
say() { echo "gpu-check: $*" | tee -a "$log"; }
say "$gpus device(s), $device; work in $work"

# The tree is the code: fedpft_kernels is kernels/ under its installed name.
mkdir -p "$work/py" && ln -s "$repo/kernels" "$work/py/fedpft_kernels"
site=""
if [ -d "$kit/wheels" ] && ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
  site=$work/site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$kit"/wheels/*.whl \
    >>"$log" 2>&1 || { say "installing the kit from $kit failed (see $log)"; exit 1; }
  say "kit installed from $kit"
fi
export PYTHONPATH="$repo:$work/py${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 FEDPFT_CACHE=$work/cache TOKENIZERS_PARALLELISM=false
if [ "$device" = cuda ]; then unset DS_ACCELERATOR; else export DS_ACCELERATOR=cpu; fi
[ -f "$kit/models/smollm2-135m/config.json" ] || { say "no model directories in $kit/models: run scripts/gpu-kit.sh"; exit 1; }
smol="random:$kit/models/smollm2-135m"
fedpft=("$PY" -m fedpft_dist)

# The SmolLM2-shaped pipeline: configs/smollm2-tiny.yaml's run on the random decoder, bf16 on a GPU.
if [ "$device" = cuda ]; then
  dtype=bfloat16; kernel_sizes=(sal:11008x4096:gated sal:28672x8192:gated act:4x512x11008 act:1x4096x28672)
  size=(public_text.max_length=256 data.max_length=256 distill.steps=8 distill.checkpoint_every=4
        distill.batch_size=8 distill.micro_batch=8 distill.max_chunks=256 data.max_train=64 data.max_test=64 fed.batch_size=4)
  client_model="$kit/models/llama2-7b/config.json"; client_shapes=(4x512 1x4096)
else
  dtype=float32; kernel_sizes=(sal:512x128:gated act:2x64x512)
  size=(distill.steps=4 distill.checkpoint_every=2)
  client_model="$work/tiny-llama/config.json"; client_shapes=(2x32 1x64)
  mkdir -p "$work/tiny-llama"
  echo '{"model_type": "llama", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}' > "$work/tiny-llama/config.json"
fi
common=(--config configs/smollm2-tiny.yaml "model.path=$smol" "model.dtype=$dtype" "${size[@]}")

order=0
phase() {  # phase NAME LIMIT CMD...: run CMD under LIMIT seconds, its output to NAME.log, its record to NAME.phase.json
  local name=$1 limit=$(($2 * scale)); shift 2
  local t0=$SECONDS rc
  order=$((order + 1))
  say "$name (limit $limit s) ..."
  timeout --kill-after=5 "$limit" "$@" > "$work/$name.log" 2>&1
  rc=$?
  [ $rc = 124 ] && echo "gpu-check: $name ran past its $limit s limit" >> "$work/$name.log"
  { echo "===== $name (exit $rc, $((SECONDS - t0)) s)"; cat "$work/$name.log"; } >> "$log"
  echo "{\"name\": \"$name\", \"order\": $order, \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"limit_s\": $limit}" \
    > "$work/$name.phase.json"
  say "$name: exit $rc in $((SECONDS - t0)) s"
}
copy() { [ -f "$1" ] && cp "$1" "$2"; }

phase probe 30 "$PY" scripts/gpu_check.py probe "$work/probe.json" --device "$device"

if [ "$device" = cuda ]; then
  phase kernels 60 "$PY" -m fedpft_kernels.bench --out "$work/kernels.json" --device cuda \
    --sizes "${kernel_sizes[@]}" --dtypes bf16 fp32 --warmup 3 --repeat 10 --copy-baseline
else
  phase kernels 60 env TRITON_INTERPRET=1 "$PY" -m fedpft_kernels.bench --out "$work/kernels.json" --device cpu \
    --sizes "${kernel_sizes[@]}" --dtypes fp32 --warmup 1 --repeat 2 --interpret --copy-baseline
fi

phase distill 80 "${fedpft[@]}" distill "${common[@]}" "run.dir=$work/distill" distill.zero_stage=3
copy "$work/distill/distill.json" "$work/distill.json"

# The resumed run: the uninterrupted run's checkpoints, its newest one removed, so the resume starts
# half way and runs the second half again.
mkdir -p "$work/resume/checkpoints"
cp -r "$work/distill/checkpoints/distill" "$work/resume/checkpoints/" 2>/dev/null
newest=$(ls -d "$work"/resume/checkpoints/distill/step-* 2>/dev/null | sort | tail -n +2 | tail -1)
[ -n "$newest" ] && rm -rf "$newest"
phase resume 60 bash -c "$(printf '%q ' "${fedpft[@]}" distill "${common[@]}" "run.dir=$work/resume" \
  distill.zero_stage=3 distill.resume=true) && $(printf '%q ' "$PY" scripts/gpu_check.py same-weights \
  "$work/distill/proxy_distilled" "$work/resume/proxy_distilled" "$work/resume.json")"

for stage in 0 3; do
  run=("${common[@]}" "run.dir=$work/bench-z$stage" "distill.out=$work/distill/proxy_distilled"
       "distill.zero_stage=$stage" fed.fidelity_every=1 bench.limit_reps=1 bench.allreduce_iters=3 bench.stats_steps=2)
  phase "pipeline-z$stage" 80 bash -c "$(printf '%q ' "${fedpft[@]}" bench "${run[@]}") && \
    $(printf '%q ' "${fedpft[@]}" memory-plan "${run[@]}" --world-size 1 --json "$work/pipeline-z$stage.plan.json")"
  copy "$work/bench-z$stage/bench.json" "$work/pipeline-z$stage.json"
done

phase client-step 60 "$PY" scripts/gpu_check.py client-step "$work/client-step.json" --model-config "$client_model" \
  --plan-config configs/large/llama-7b.yaml --shapes "${client_shapes[@]}" --device "$device" \
  --dtype "$([ "$device" = cuda ] && echo bfloat16 || echo float32)"

phase doctor 30 "${fedpft[@]}" doctor "run.dir=$work/doctor" "doctor.local_ranks=$gpus" \
  "doctor.allreduce_mb=$([ "$device" = cuda ] && echo 256 || echo 4)" doctor.iters=10
copy "$work/doctor/doctor.json" "$work/doctor.json"

# tests/test_gpu.py on the kit's random decoder (its docstring says which runs), the quick tests
# first, then the ones that each start several runs: a test the limit cuts off is reported as not run.
tests=(test_neuron_split_on_cuda_statistics_and_weights test_a_collective_the_device_never_completes_is_named_at_the_timeout
       test_compiled_triton_kernels_match_the_references "test_tiny_pipeline_on_cuda[3]"
       test_bf16_distillation_keeps_frozen_neurons_exact test_server_optimizer_fedprox_and_a_stop_signal_on_cuda
       "test_tiny_pipeline_on_cuda[0]" test_two_ranks_equal_one_on_cuda test_a_client_group_on_cuda_equals_one_rank)
phase tests 180 env FEDPFT_GPU_KIT="$kit" FEDPFT_TEST_PYTHONPATH="$work/py${site:+:$site}" "$PY" -m pytest -v \
  -p no:cacheprovider --junitxml="$work/tests.xml" "${tests[@]/#/tests/test_gpu.py::}"

"$PY" scripts/gpu_check.py summary "$work" "$outdir"

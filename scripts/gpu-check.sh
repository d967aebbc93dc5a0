#!/usr/bin/env bash
# The GPU check, one command for a machine with CUDA devices (about 5 minutes on one GPU):
#   1. tests/test_gpu.py: the tiny pipeline on CUDA (ZeRO 0 and 3, alignment, evaluation, fidelity,
#      checkpoint + resume), bf16, device placement of the alignment path, compiled Triton kernels;
#   2. python -m fedpft_kernels.bench: compiled Triton against the PyTorch references;
#   3. fedpft doctor on every local GPU: NCCL all-reduce check and bandwidth;
#   4. a bf16 layer-level distillation of the tiny proxy (seconds per step, peak memory).
# Writes one JSON (default gpu-check.json) that gathers the four results.
#   scripts/gpu-check.sh [OUT.json]          FEDPFT_PYTHON picks the interpreter (default: python3)
# Without a CUDA device it says so, writes {"cuda": false} and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${FEDPFT_PYTHON:-python3}
out=${1:-gpu-check.json}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

gpus=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
if [ "$gpus" = 0 ]; then
  echo "gpu-check: no CUDA device here; nothing to check"
  echo '{"cuda": false}' > "$out"
  exit 0
fi
echo "gpu-check: $gpus CUDA device(s)"

step() {  # step NAME SECONDS CMD...: run with a time limit, keep the log, record the exit code
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$work/$name.log" 2>&1
  local rc=$?
  echo "{\"rc\": $rc, \"seconds\": $((SECONDS - t0))}" > "$work/$name.rc"
  echo "gpu-check: $name exit $rc ($((SECONDS - t0)) s)"
}

step tests 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py -rs
step kernels 60 "$PY" -m fedpft_kernels.bench --out "$work/kernels.json" --device cuda --warmup 3 --repeat 10
step nccl 60 "$PY" -m torch.distributed.run --standalone --nproc-per-node "$gpus" -m fedpft_dist doctor \
  "run.dir=$work/doctor" doctor.allreduce_mb=256 doctor.iters=10
step bf16 120 "$PY" -m fedpft_dist distill --config configs/tiny.yaml "run.dir=$work/bf16" model.dtype=bfloat16 \
  distill.zero_stage=0 distill.steps=8

"$PY" - "$work" "$out" <<'PY'
import json, pathlib, sys
work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
def load(p):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None
report = {"cuda": True}
for name in ("tests", "kernels", "nccl", "bf16"):
    report[name] = load(work / f"{name}.rc") or {}
    report[name]["log_tail"] = (work / f"{name}.log").read_text(errors="replace")[-3000:] if (work / f"{name}.log").exists() else ""
report["kernels"]["report"] = load(work / "kernels.json")
report["nccl"]["doctor"] = load(work / "doctor" / "doctor.json")
d = load(work / "bf16" / "distill.json") or {}
report["bf16"]["distill"] = {k: d.get(k) for k in ("finite", "steps", "step_seconds_median", "peak_memory_mb_per_rank",
                                                    "hidden_error_before", "hidden_error_after", "loss_first", "loss_last")}
out.write_text(json.dumps(report, indent=2) + "\n")
print(f"gpu-check: wrote {out}")
PY

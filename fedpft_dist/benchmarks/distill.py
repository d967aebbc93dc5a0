"""Distillation memory and speed: ZeRO stage 0 vs 3, 1 vs 2 ranks, per model.

    python -m fedpft_dist.benchmarks.distill --out runs/bench/distill.json [--models minilm smollm2]
        [--stages 0 3] [--ranks 1 2] [--steps 6] [--max-length 128] [--micro-batch 2]

(--micro-batch is per rank: a point with W ranks uses distill.batch_size = micro-batch x W.)

Each point is a real `fedpft distill` job started with torchrun (one thread per rank); the numbers
come from its distill.json: peak memory per rank (RSS on CPU, allocated on GPU), median step time,
and the teacher bytes each rank holds. The proxy of each model is built once and reused.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def _run(cmd: list[str], env: dict) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"benchmark step failed ({proc.returncode}): {' '.join(cmd)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", nargs="+", default=["minilm", "smollm2"])
    ap.add_argument("--stages", nargs="+", type=int, default=[0, 3])
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--work-dir", default=None, help="run directories (default: next to --out)")
    args = ap.parse_args(argv)

    out = Path(args.out)
    work = Path(args.work_dir or out.parent / f"{out.stem}-runs")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    py = sys.executable
    common = [f"public_text.max_length={args.max_length}", f"distill.steps={args.steps}",
              "distill.eval_chunks=4", "distill.max_chunks=256",
              "proxy.eval_chunks=2", "proxy.sample_tokens=0", "dist.threads_per_rank=1"]
    points = []
    for model in args.models:
        proxy_run = work / model / "proxy"
        if not (proxy_run / "proxy" / "config.json").exists():
            print(f"[bench] building the {model} proxy", flush=True)
            _run([py, "-m", "fedpft_dist", "proxy", f"model.path={model}", f"run.dir={proxy_run}", *common], env)
        for stage in args.stages:
            for ranks in args.ranks:
                run_dir = work / model / f"zero{stage}-ranks{ranks}"
                print(f"[bench] {model}: ZeRO-{stage} on {ranks} rank(s)", flush=True)
                t0 = time.perf_counter()
                _run([py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                      "-m", "fedpft_dist", "distill", f"model.path={model}", f"run.dir={run_dir}",
                      f"distill.proxy={proxy_run / 'proxy'}", f"distill.zero_stage={stage}",
                      f"distill.batch_size={args.micro_batch * ranks}", f"distill.micro_batch={args.micro_batch}", *common], env)
                d = json.loads((run_dir / "distill.json").read_text())
                points.append({
                    "model": model, "zero_stage": stage, "world_size": ranks,
                    "step_seconds_median": d["step_seconds_median"],
                    "peak_memory_mb_per_rank": d["peak_memory_mb_per_rank"],
                    "teacher_bytes_held_per_rank": d["teacher_bytes_held_per_rank"],
                    "teacher_bytes_full": d["teacher_bytes_full"],
                    "trainable_params": d["trainable_params"], "steps": d["steps"],
                    "hidden_error_before": d["hidden_error_before"], "hidden_error_after": d["hidden_error_after"],
                    "job_seconds": time.perf_counter() - t0})
    import torch

    result = {"benchmark": "distill", "device": "cuda" if torch.cuda.is_available() else "cpu",
              "host": platform.node(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "settings": vars(args), "points": points}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for p in points:
        mem = "/".join(f"{m:.0f}" for m in p["peak_memory_mb_per_rank"])
        held = "/".join(f"{b / 2**20:.0f}" for b in p["teacher_bytes_held_per_rank"])
        print(f"{p['model']:<8} ZeRO-{p['zero_stage']} x{p['world_size']}: step {p['step_seconds_median']:.3f} s, "
              f"peak MB per rank {mem}, teacher MiB held per rank {held} of {p['teacher_bytes_full'] / 2**20:.0f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

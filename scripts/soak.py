"""The soak: a long tiny run, uninterrupted and stopped every few rounds, to show that nothing drifts.

  .venv/bin/python scripts/soak.py [--rounds 100] [--every 10] [--ranks 2] [--out runs/soak]

1. The uninterrupted run: configs/tiny.yaml (FedPFT, alignment every 5 rounds at ZeRO-3, evaluation and
   the fidelity monitor every 10) for ``--rounds`` rounds on ``--ranks`` ranks. While it runs, each
   rank's resident set is read from /proc every 0.2 s; its peak so far (the largest read, or the
   kernel's high-water mark when larger), resident set and open file descriptors are recorded after
   round ``--every`` and after the second-to-last round.
2. The interrupted run: the same, with a stop signal (SIGTERM to rank 0, sent by the rank itself at the
   end of every ``--every``-th round: FEDPFT_FAULT) and a resume (fed.resume=true) each time.
3. Checks: the two final adapters are equal; each rank's peak resident set grows less than 5 % from
   round ``--every`` to the end; the open descriptors do not grow; no temporary file or directory is
   left in either run directory or in the temporary directory (torchrun's own log directories,
   torchelastic_*, one per launch, are counted apart).

Writes ``OUT/soak.json`` and prints it; exits 1 when a check fails. It takes about 15 minutes on 2 CPU
cores, so it is not part of `make test`: `make soak` runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ("fed.align_every=5", "fed.eval_every=10", "fed.checkpoint_every=10", "dist.threads_per_rank=1",
            "fed.fidelity_examples=16")


def command(ranks: int, run_dir: Path, rounds: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
            "-m", "fedpft_dist", "train", "--config", "configs/tiny.yaml", f"run.dir={run_dir}",
            f"fed.rounds={rounds}", *SETTINGS, *extra]


def env(**extra: str) -> dict:
    out = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out.update(extra)
    return out


def rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return sum(1 for line in path.read_text().splitlines() if line.endswith("}")) if path.exists() else 0


def workers(launcher: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True).stdout.split()
    return sorted(int(p) for p in out)


def sample(pid: int) -> dict:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    kib = lambda key: int(status[key].split()[0])  # noqa: E731
    return {"peak_rss_mb": kib("VmHWM") / 1024, "rss_mb": kib("VmRSS") / 1024,
            "open_fds": len(os.listdir(f"/proc/{pid}/fd"))}


def uninterrupted(args, run_dir: Path) -> dict:
    """The whole run in one job. Every 0.2 s each rank's resident set is read; its peak so far is the
    largest of those reads and of the kernel's high-water mark (VmHWM, which the run itself sets back
    at the start of each phase to measure that phase's peak), so a peak between two reads counts too.
    Recorded after round ``every`` and after round rounds - 1."""
    proc = subprocess.Popen(command(args.ranks, run_dir, args.rounds), cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples: dict[str, list[dict]] = {}
    marks = {args.every: "early", args.rounds - 1: "late"}
    peak: dict[int, float] = {}
    while proc.poll() is None:
        done = rows(run_dir)
        now = {}
        for p in workers(proc.pid):
            try:
                now[p] = sample(p)
            except (OSError, KeyError):   # a worker that just ended
                continue
            peak[p] = max(peak.get(p, 0.0), now[p]["peak_rss_mb"], now[p]["rss_mb"])
        for mark, name in marks.items():
            if done >= mark and name not in samples and now:
                samples[name] = [{**now[p], "peak_rss_mb": peak[p]} for p in sorted(now)]
                samples[name + "_round"] = done
        time.sleep(0.2)
    err = proc.stderr.read()
    if proc.returncode != 0 or set(samples) != {"early", "late", "early_round", "late_round"}:
        raise SystemExit(f"soak: the uninterrupted run failed (exit {proc.returncode}, samples {sorted(samples)}):\n"
                         f"{err[-3000:]}")
    return samples


def interrupted(args, run_dir: Path) -> int:
    """Stopped by a signal every ``every`` rounds and resumed; returns the number of jobs."""
    jobs = 0
    for stop in range(args.every, args.rounds + args.every, args.every):
        fault = {"FEDPFT_FAULT": f"recording@{stop}:sigterm"} if stop < args.rounds else {}
        proc = subprocess.run(command(args.ranks, run_dir, args.rounds, "fed.resume=true"), cwd=REPO,
                              env=env(**fault), capture_output=True, text=True)
        jobs += 1
        if stop < args.rounds and f"stopped after round {stop} of {args.rounds}" not in proc.stderr:
            raise SystemExit(f"soak: job {jobs} did not stop after round {stop}:\n{proc.stderr[-3000:]}")
        if stop >= args.rounds and proc.returncode != 0:
            raise SystemExit(f"soak: the last job failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return jobs


def leftovers(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
                  if p.name.startswith(".") and p.name not in (".fedpft.lock",))


def adapter_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "adapter" / "adapter_model.safetensors")), load_file(str(b / "adapter" / "adapter_model.safetensors"))
    if sorted(x) != sorted(y):
        return float("inf")
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", default="runs/soak")
    args = ap.parse_args()
    out = REPO / args.out
    shutil.rmtree(out, ignore_errors=True)
    tmp_before = set(os.listdir(tempfile.gettempdir()))
    t0 = time.perf_counter()
    samples = uninterrupted(args, out / "full")
    t1 = time.perf_counter()
    jobs = interrupted(args, out / "stopped")
    t2 = time.perf_counter()
    early, late = samples["early"], samples["late"]
    growth = [b["peak_rss_mb"] / a["peak_rss_mb"] - 1 for a, b in zip(early, late)]
    # torchrun makes a log directory of its own in the temporary directory for every launch
    # (torchelastic_*; its --log-dir moves them): counted apart, not ours to remove
    tmp_new = sorted(set(os.listdir(tempfile.gettempdir())) - tmp_before)
    torchrun_dirs = [n for n in tmp_new if n.startswith("torchelastic_")]
    tmp_new = [n for n in tmp_new if n not in torchrun_dirs]
    result = {
        "rounds": args.rounds, "every": args.every, "ranks": args.ranks, "jobs_interrupted_run": jobs,
        "adapter_max_abs_difference": adapter_difference(out / "full", out / "stopped"),
        "sampled_after_rounds": [samples["early_round"], samples["late_round"]],
        "per_rank_early": early, "per_rank_late": late,
        "peak_rss_growth_per_rank": growth,
        "open_fds_growth_per_rank": [b["open_fds"] - a["open_fds"] for a, b in zip(early, late)],
        "leftovers": {"full": leftovers(out / "full"), "stopped": leftovers(out / "stopped"), "tmp": tmp_new},
        "torchrun_log_dirs_in_tmp": len(torchrun_dirs),
        "seconds": {"uninterrupted": t1 - t0, "interrupted": t2 - t1},
    }
    checks = {"same adapter": result["adapter_max_abs_difference"] == 0.0,
              "peak RSS grows < 5 %": all(g < 0.05 for g in growth),
              "no descriptors gained": all(d <= 0 for d in result["open_fds_growth_per_rank"]),
              "no temporary files left": not any(result["leftovers"].values())}
    result["checks"] = checks
    (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        print(f"soak: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"soak: passed ({args.rounds} rounds, stopped and resumed {jobs - 1} times)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

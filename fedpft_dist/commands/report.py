"""``fedpft report RUN_DIR...``: runs to a Markdown table, a CSV file and PNG plots.

Runs that differ only in ``run.seed`` (and in where they write) form one group: mean ± std over seeds.
Every other config key whose value differs between the runs (a sweep's keys) gets a column of the
table, beside the method / partition label. Plots: accuracy per round for every group, final accuracy
against client-side cost (parameters a client holds and training FLOPs per example) and, when there
are swept keys, final accuracy against each of them.

Causal-LM runs (``"task": "causal-lm"`` in summary.json) show perplexity instead (lower is better): the
table has final and best perplexity, final next-token accuracy and, when ``fed.eval_initial`` was on,
the FM's perplexity before training; the plots draw perplexity. Runs of different tasks get a table
and plots each, under a heading per task; runs from before the ``task`` key are classification.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..errors import UserError
from ..sweep import short_names


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


# Keys that say where a run writes or how its job runs, not what it computes: runs that differ only
# in these are repeats of one setting. A key ending in "." covers its whole section.
NOT_SETTINGS = ("run.dir", "run.seed", "run.log_level", "dist.", "doctor.", "proxy.out", "distill.proxy",
                "distill.out", "distill.checkpoint_every", "distill.resume", "data.cache_dir",
                "fed.checkpoint_every", "fed.resume", "fed.stop_after", "fed.eval_batch_size",
                "fed.eval_initial")  # an extra evaluation before round 1: the rounds are the same
# In the method / partition label; fed.alpha too, unless it differs between the runs (then it is a column).
LABEL_KEYS = ("fed.method", "fed.partition")
ALPHA = "fed.alpha"


# summary.json's "task" values (as in data/tasks.py, not imported: it pulls in torch).
CLASSIFICATION, CAUSAL_LM = "sequence-classification", "causal-lm"


@dataclass(frozen=True)
class Metric:
    """A number of a run: its key, its column header or axis label, and how it is shown (value x
    ``scale``, ``digits`` decimals)."""
    key: str
    header: str
    scale: float = 100.0
    digits: int = 1
    optional: bool = False  # a table column only when some run has it (initial_*: fed.eval_initial)


@dataclass(frozen=True)
class TaskView:
    """What a report shows for one task: the table's metric columns, the CSV's metrics, the metric per
    round (metrics.jsonl) and the final one (summary.json) that the plots draw, and the plot files."""
    title: str
    columns: tuple[Metric, ...]
    csv_metrics: tuple[str, ...]
    per_round: Metric
    final: Metric
    initial: Optional[str]  # summary key of the FM before training, drawn at round 0 when present
    plots: tuple[tuple[str, str], ...]  # (file, alt text) of the per-round, cost and swept plots


# Gradient fidelity of the client model (proxy or emulator) against the FM, per round and at the end.
GRAD_COSINE = Metric("grad_cosine", "cosine of client-model and FM LoRA gradients", 1.0, 3)
FINAL_GRAD_COSINE = Metric("final_grad_cosine", "LoRA gradient cosine with the FM", 1.0, 3, optional=True)

VIEWS = {
    CLASSIFICATION: TaskView(
        title="Sequence classification",
        columns=(Metric("final_accuracy", "final accuracy (%)"), Metric("best_accuracy", "best accuracy (%)"),
                 Metric("final_macro_f1", "final macro-F1 (%)"), FINAL_GRAD_COSINE),
        csv_metrics=("final_accuracy", "best_accuracy", "final_macro_f1", "final_grad_cosine"),
        per_round=Metric("accuracy", "test accuracy of the FM with the global adapter (%)"),
        final=Metric("final_accuracy", "final accuracy (%)"),
        initial=None,
        plots=(("accuracy.png", "accuracy per round"), ("cost.png", "accuracy against client cost"),
               ("swept.png", "final accuracy against the swept keys"))),
    CAUSAL_LM: TaskView(
        title="Causal LM",
        columns=(Metric("initial_perplexity", "initial perplexity", 1.0, 2, optional=True),
                 Metric("final_perplexity", "final perplexity", 1.0, 2),
                 Metric("best_perplexity", "best perplexity", 1.0, 2),
                 Metric("final_next_token_accuracy", "final next-token accuracy (%)"), FINAL_GRAD_COSINE),
        csv_metrics=("final_perplexity", "best_perplexity", "final_next_token_accuracy", "final_test_loss",
                     "initial_perplexity", "initial_next_token_accuracy", "final_grad_cosine"),
        per_round=Metric("perplexity", "test perplexity of FM + adapter (lower is better)", 1.0, 2),
        final=Metric("final_perplexity", "final perplexity (lower is better)", 1.0, 2),
        initial="initial_perplexity",
        plots=(("perplexity.png", "perplexity per round"), ("perplexity-cost.png", "perplexity against client cost"),
               ("perplexity-swept.png", "final perplexity against the swept keys"))),
}


def task_of(run: dict) -> str:
    """The run's task; summaries written before the "task" key are classification."""
    return CAUSAL_LM if run["summary"].get("task") == CAUSAL_LM else CLASSIFICATION


def runs_by_task(runs: Sequence[dict]) -> "OrderedDict[str, list[dict]]":
    """Runs split by task, in VIEWS' order (classification first), whatever the directories' names."""
    tasks: "OrderedDict[str, list[dict]]" = OrderedDict()
    for task in VIEWS:
        mine = [run for run in runs if task_of(run) == task]
        if mine:
            tasks[task] = mine
    return tasks


def group_key(run: dict, with_alpha: bool = True) -> str:
    s, fed = run["summary"], run["config"].get("fed", {})
    part = s.get("partition", fed.get("partition", "?"))
    if part == "dirichlet" and with_alpha:
        part = f"dirichlet(α={fed.get('alpha')})"
    return f"{s['method']} / {part}"


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def swept_keys(runs: Sequence[dict]) -> list[str]:
    """Config keys, other than seeds, output paths and the label's, whose values differ between runs
    (only keys every run's config.yaml has can be compared)."""
    flat = [_flatten(r["config"]) for r in runs]
    if not flat:
        return []
    keys = [k for k in flat[0] if all(k in f for f in flat[1:])]
    return [k for k in keys
            if k not in LABEL_KEYS and not any(k == n or (n.endswith(".") and k.startswith(n)) for n in NOT_SETTINGS)
            and len({json.dumps(f[k], sort_keys=True) for f in flat}) > 1]


def _frozen(value: object) -> object:
    """Lists as tuples, so that a group's values can key a dict."""
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def _cell(value: object, missing: str = "–") -> str:
    if value is None:
        return missing
    return json.dumps(value) if isinstance(value, tuple) else str(value)


def group_name(label: str, keys: Sequence[str], values: Sequence[object]) -> str:
    """``fedpft / iid, align_keep=0.8``: the label, then the swept values (for legends)."""
    short = short_names(keys)
    return ", ".join([label, *(f"{short[k]}={_cell(v)}" for k, v in zip(keys, values))])


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: Sequence[Optional[float]], scale: float = 100.0, digits: int = 1) -> str:
    """Mean ± std of the values present (a run without the key does not count as a seed)."""
    present = [v for v in values if v is not None]
    mean, std = _mean_std(present)
    if math.isnan(mean):
        return "–"
    return (f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}" if len(present) > 1
            else f"{mean * scale:.{digits}f}")


def groups_of(runs: Sequence[dict], keys: Optional[Sequence[str]] = None
              ) -> "OrderedDict[tuple[str, tuple], list[dict]]":
    """Runs grouped by (method / partition label, values of the swept keys), in the order first seen."""
    keys = swept_keys(runs) if keys is None else keys
    groups: "OrderedDict[tuple[str, tuple], list[dict]]" = OrderedDict()
    for run in runs:
        flat = _flatten(run["config"])
        values = tuple(_frozen(flat.get(k)) for k in keys)
        groups.setdefault((group_key(run, with_alpha=ALPHA not in keys), values), []).append(run)
    return groups


def markdown_table(runs: Sequence[dict], view: TaskView) -> str:
    """One row per group of ``runs`` (all of ``view``'s task): its swept values, then ``view``'s columns."""
    keys = swept_keys(runs)
    columns = [m for m in view.columns if not m.optional or any(r["summary"].get(m.key) is not None for r in runs)]
    rows = ["| method / partition | " + "".join(f"{k} | " for k in keys) + "seeds | rounds | "
            + "".join(f"{m.header} | " for m in columns) + "client params | client GFLOPs / example | wall s |",
            "|---|" + "---|" * (len(keys) + len(columns) + 5)]
    for (label, values), group in groups_of(runs, keys).items():
        s0 = group[0]["summary"]
        flops = s0.get("client_train_flops_per_example")
        rows.append(
            f"| {label} | " + "".join(f"{_cell(v)} | " for v in values)
            + f"{len(group)} | {s0['rounds']} | "
            + "".join(f"{_fmt([r['summary'].get(m.key) for r in group], m.scale, m.digits)} | " for m in columns)
            + f"{s0.get('client_params', 0) / 1e6:.1f}M | {'–' if flops is None else f'{flops / 1e9:.2f}'} "
            f"| {statistics.fmean(r['summary']['wall_seconds'] for r in group):.0f} |")
    return "\n".join(rows) + "\n"


def write_csv(runs: Sequence[dict], path: Path) -> None:
    """The tables' numbers, unrounded, one row per group (accuracies as fractions). With causal-LM runs
    there is a task column and the LM metrics' columns; a metric of the other task is left empty, and
    the swept keys are those of every task (a key not swept within a task has that task's one value)."""
    tasks = runs_by_task(runs)
    keys = list(OrderedDict.fromkeys(k for task_runs in tasks.values() for k in swept_keys(task_runs)))
    metrics = list(OrderedDict.fromkeys(m for task in tasks for m in VIEWS[task].csv_metrics))
    with_task = list(tasks) != [CLASSIFICATION]  # classification-only reports keep their columns
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", *(["task"] if with_task else []), "partition", "dirichlet_alpha", *keys,
                         "seeds", "rounds", *(f"{m}_{stat}" for m in metrics for stat in ("mean", "std")),
                         "client_params", "client_train_flops_per_example", "wall_seconds", "runs"])
        for task, task_runs in tasks.items():
            for group in groups_of(task_runs).values():
                s0 = group[0]["summary"]
                flat = _flatten(group[0]["config"])
                stats = [x for m in metrics
                         for x in (_mean_std([r["summary"].get(m) for r in group]) if m in VIEWS[task].csv_metrics
                                   else ("", ""))]
                fed = group[0]["config"].get("fed", {})
                partition = s0.get("partition", fed.get("partition"))
                alpha = fed.get("alpha") if partition == "dirichlet" else None
                writer.writerow([s0["method"], *([task] if with_task else []), partition, alpha,
                                 *(_cell(_frozen(flat.get(k)), "") for k in keys), len(group), s0["rounds"], *stats,
                                 s0.get("client_params"), s0.get("client_train_flops_per_example"),
                                 statistics.fmean(r["summary"]["wall_seconds"] for r in group),
                                 " ".join(r["dir"] for r in group)])


def plot_rounds(runs: Sequence[dict], view: TaskView, path: Path, metric: Optional[Metric] = None) -> None:
    """``metric`` per round (default: ``view``'s), mean ± std over seeds, a line per group (groups
    without it are left out); for ``view``'s metric, the FM before training at round 0 when the runs
    evaluated it (``view.initial``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = swept_keys(runs)
    metric = metric or view.per_round
    initial = view.initial if metric is view.per_round else None
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for (label, values), group in groups_of(runs, keys).items():
        by_round: dict[int, list[float]] = {}
        for run in group:
            if initial and run["summary"].get(initial) is not None:
                by_round.setdefault(0, []).append(run["summary"][initial])
            for row in run["metrics"]:
                if row.get(metric.key) is not None:
                    by_round.setdefault(row["round"], []).append(row[metric.key])
        if not by_round:
            continue
        xs = sorted(by_round)
        means = [statistics.fmean(by_round[x]) * metric.scale for x in xs]
        line, = ax.plot(xs, means, marker="o", markersize=3, label=group_name(label, keys, values))
        if len(group) > 1:
            stds = [statistics.stdev(by_round[x]) * metric.scale if len(by_round[x]) > 1 else 0 for x in xs]
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=line.get_color(), alpha=0.15)
    ax.set_xlabel("round")
    ax.set_ylabel(metric.header)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: curves stay visible
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cost(runs: Sequence[dict], view: TaskView, path: Path) -> None:
    """``view``'s final metric against the parameters a client holds and its training FLOPs per example."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = swept_keys(runs)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for (label, values), group in groups_of(runs, keys).items():
        s0 = group[0]["summary"]
        final, std = _mean_std([r["summary"].get(view.final.key) for r in group])
        name = group_name(label, keys, values)
        for ax, x in zip(axes, (s0.get("client_params", 0) / 1e6, (s0.get("client_train_flops_per_example") or 0) / 1e9)):
            ax.errorbar([x], [final * view.final.scale], yerr=[std * view.final.scale], fmt="o", capsize=3,
                        label=name)
    axes[0].set_xlabel("parameters a client holds (M)")
    axes[1].set_xlabel("client training GFLOPs per example")
    for ax in axes:
        ax.set_ylabel(view.final.header)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_swept(runs: Sequence[dict], keys: Sequence[str], view: TaskView, path: Path) -> None:
    """One panel per swept key: ``view``'s final metric (mean ± std over seeds) against its value, a line
    through the groups that agree on everything else; groups with no such partner are grey dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = groups_of(runs, keys)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys) + 1.5, 4.2), squeeze=False)
    short = short_names(keys)
    for i, (key, ax) in enumerate(zip(keys, axes[0])):
        seen = list(OrderedDict.fromkeys(json.dumps(values[i]) for _, values in groups))
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for _, values in groups
                      for v in [values[i]])
        # Slices: groups equal in the label and every other swept key; each is one line over this key.
        slices: "OrderedDict[tuple, list[tuple[float, float, float]]]" = OrderedDict()
        for (label, values), group in groups.items():
            final, std = _mean_std([r["summary"].get(view.final.key) for r in group])
            x = values[i] if numeric else seen.index(json.dumps(values[i]))
            rest = (label, *values[:i], *values[i + 1:])
            slices.setdefault(rest, []).append((x, final * view.final.scale, std * view.final.scale))
        other = [k for k in keys if k != key]
        lines = 0
        for (label, *rest), pts in slices.items():
            pts.sort()
            xs, ys, errs = zip(*pts)
            if len(pts) == 1:
                ax.errorbar(xs, ys, yerr=errs, fmt="o", color="0.6", markersize=4, capsize=2)
                continue
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=group_name(label, other, rest))
            lines += 1
        if numeric:
            xs = [values[i] for _, values in groups]
            if min(xs) > 0 and max(xs) / min(xs) >= 20:
                ax.set_xscale("log")
        else:
            ax.set_xticks(range(len(seen)), [_cell(json.loads(v)) for v in seen], rotation=20, fontsize=7)
        ax.set_xlabel(short[key])
        ax.set_ylabel(view.final.header)
        ax.grid(alpha=0.3)
        if 0 < lines <= 10:  # a full grid has too many lines for a readable legend
            ax.legend(fontsize=6)
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
    write_csv(runs, out_dir / "report.csv")
    # A table and plots per task: accuracy and perplexity do not share columns or axes.
    tasks = runs_by_task(runs)
    sections, tables, written = [], [], ["report.md", "report.csv"]
    for task, task_runs in tasks.items():
        view = VIEWS[task]
        heading = f"## {view.title}\n\n" if len(tasks) > 1 else ""
        table = markdown_table(task_runs, view)
        (rounds_png, rounds_alt), (cost_png, cost_alt), (swept_png, swept_alt) = view.plots
        plot_rounds(task_runs, view, out_dir / rounds_png)
        plot_cost(task_runs, view, out_dir / cost_png)
        images = [f"![{rounds_alt}]({rounds_png})", f"![{cost_alt}]({cost_png})"]
        written += [rounds_png, cost_png]
        if any(row.get(GRAD_COSINE.key) is not None for run in task_runs for row in run["metrics"]):
            fidelity_png = "fidelity.png" if task == CLASSIFICATION else "perplexity-fidelity.png"
            plot_rounds(task_runs, view, out_dir / fidelity_png, GRAD_COSINE)
            images.append(f"![gradient fidelity per round]({fidelity_png})")
            written.append(fidelity_png)
        keys = swept_keys(task_runs)
        if keys:
            plot_swept(task_runs, keys, view, out_dir / swept_png)
            images.append(f"![{swept_alt}]({swept_png})")
            written.append(swept_png)
        sections.append(heading + table + "\n" + "\n\n".join(images) + "\n")
        tables.append(heading + table)
    (out_dir / "report.md").write_text("# Results\n\n" + "\n".join(sections))
    print("\n".join(tables), end="")
    print("wrote " + ", ".join(str(out_dir / name) for name in written))
    return 0

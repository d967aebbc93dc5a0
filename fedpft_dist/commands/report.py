"""``fedpft report RUN_DIR...``: runs to a Markdown table, a CSV file and PNG plots.

Runs that differ only in ``run.seed`` (and in where they write) form one group: mean ± std over seeds.
Every other config key whose value differs between the runs (a sweep's keys) gets a column of the
table, beside the method / partition label. Plots: accuracy per round for every group, final accuracy
against client-side cost (parameters a client holds and training FLOPs per example) and, when there
are swept keys, final accuracy against each of them.

Paired differences: every seed gives every method the same data split and client partition, so two
groups that differ in one setting are compared seed by seed. Over the seeds both ran, the table under
the main one has the mean of the per-seed differences A − B, their standard deviation and a 95 %
t-interval; the rows also go to ``paired.csv``.

Causal-LM runs (``"task": "causal-lm"`` in summary.json) show perplexity instead (lower is better): the
table has final and best perplexity, final next-token accuracy and, when ``fed.eval_initial`` was on,
the FM's perplexity before training; the plots draw perplexity. Runs of different tasks get a table
and plots each, under a heading per task; runs from before the ``task`` key are classification.

Bench runs (a directory with ``bench.json``, from ``fedpft bench``) go to a scaling section instead
(:mod:`fedpft_dist.benchmarks.scaling`): one workload at several world sizes, its throughput,
efficiency, phases and all-reduce bandwidth (scaling.md, scaling.csv, scaling.png); runs of different
workloads are refused, naming the key they differ in.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from collections import OrderedDict
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Optional, Sequence

from ..benchmarks import scaling
from ..config import short_names
from ..errors import UserError
from ..fsutil import read_jsonl


def load_run(run_dir: Path) -> dict:
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise UserError(f"{run_dir} is not a finished run (no summary.json)")
    summary = json.loads(summary_path.read_text())
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    # Runs from before summary.json kept the plug-in gap's final values: the last evaluation row's.
    evaluated = [row for row in metrics if any(k.startswith("emulator_") for k in row)]
    if evaluated:
        for k, v in evaluated[-1].items():
            if k.startswith("emulator_"):
                summary.setdefault(f"final_{k}", v)
    config = {}
    if (run_dir / "config.yaml").is_file():
        import yaml

        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    return {"dir": str(run_dir), "summary": summary, "metrics": metrics, "config": config}


# Keys that say where a run writes or how its job runs, not what it computes: runs that differ only
# in these are repeats of one setting. A key ending in "." covers its whole section.
NOT_SETTINGS = ("run.dir", "run.seed", "run.log_level", "dist.", "doctor.", "proxy.out", "distill.proxy",
                "distill.out", "distill.emulator_out", "distill.checkpoint_every", "distill.resume", "data.cache_dir",
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
    paired: tuple[Metric, ...]  # compared seed by seed between groups, the headline metric first


# Gradient fidelity of the client model (proxy or emulator) against the FM, per round and at the end.
GRAD_COSINE = Metric("grad_cosine", "cosine of client-model and FM LoRA gradients", 1.0, 3)
FINAL_GRAD_COSINE = Metric("final_grad_cosine", "LoRA gradient cosine with the FM", 1.0, 3, optional=True)
# The same over the layers every method trains (comparable across methods), and the update transfer.
FIDELITY_COLUMNS = (Metric("final_grad_cosine_common", "cosine, common layers", 1.0, 3, optional=True),
                    Metric("final_transfer", "update transfer to the FM", 1.0, 3, optional=True))
# The plug-in gap (FedOT): the final global adapter on the client model (the emulator) itself.
EMULATOR_ACCURACY = Metric("final_emulator_accuracy", "final accuracy on the emulator (%)", optional=True)
EMULATOR_PERPLEXITY = Metric("final_emulator_perplexity", "final perplexity on the emulator", 1.0, 2, optional=True)

VIEWS = {
    CLASSIFICATION: TaskView(
        title="Sequence classification",
        columns=(Metric("final_accuracy", "final accuracy (%)"), Metric("best_accuracy", "best accuracy (%)"),
                 Metric("final_macro_f1", "final macro-F1 (%)"), EMULATOR_ACCURACY, FINAL_GRAD_COSINE,
                 *FIDELITY_COLUMNS),
        csv_metrics=("final_accuracy", "best_accuracy", "final_macro_f1", "final_grad_cosine",
                     "final_grad_cosine_common", "final_transfer", "final_emulator_accuracy"),
        per_round=Metric("accuracy", "test accuracy of the FM with the global adapter (%)"),
        final=Metric("final_accuracy", "final accuracy (%)"),
        initial="initial_accuracy",
        plots=(("accuracy.png", "accuracy per round"), ("cost.png", "accuracy against client cost"),
               ("swept.png", "final accuracy against the swept keys")),
        # Differences of a few points: one more decimal than the main table.
        paired=(Metric("final_accuracy", "final accuracy (points)", 100.0, 2),
                Metric("best_accuracy", "best accuracy (points)", 100.0, 2), FINAL_GRAD_COSINE)),
    CAUSAL_LM: TaskView(
        title="Causal LM",
        columns=(Metric("initial_perplexity", "initial perplexity", 1.0, 2, optional=True),
                 Metric("final_perplexity", "final perplexity", 1.0, 2),
                 Metric("best_perplexity", "best perplexity", 1.0, 2),
                 Metric("final_next_token_accuracy", "final next-token accuracy (%)"),
                 Metric("initial_emulator_perplexity", "initial perplexity on the emulator", 1.0, 2, optional=True),
                 EMULATOR_PERPLEXITY, FINAL_GRAD_COSINE, *FIDELITY_COLUMNS),
        csv_metrics=("final_perplexity", "best_perplexity", "final_next_token_accuracy", "final_test_loss",
                     "initial_perplexity", "initial_next_token_accuracy", "final_grad_cosine",
                     "final_grad_cosine_common", "final_transfer", "initial_emulator_perplexity",
                     "final_emulator_perplexity"),
        per_round=Metric("perplexity", "test perplexity of FM + adapter (lower is better)", 1.0, 2),
        final=Metric("final_perplexity", "final perplexity (lower is better)", 1.0, 2),
        initial="initial_perplexity",
        plots=(("perplexity.png", "perplexity per round"), ("perplexity-cost.png", "perplexity against client cost"),
               ("perplexity-swept.png", "final perplexity against the swept keys")),
        paired=(Metric("final_perplexity", "final perplexity", 1.0, 2),
                Metric("best_perplexity", "best perplexity", 1.0, 2), FINAL_GRAD_COSINE)),
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


def _label_parts(run: dict, with_alpha: bool = True) -> tuple[str, str]:
    """The run's method and partition, as its group's label shows them."""
    s, fed = run["summary"], run["config"].get("fed", {})
    part = s.get("partition", fed.get("partition", "?"))
    if part == "dirichlet" and with_alpha:
        part = f"dirichlet(α={fed.get('alpha')})"
    return s["method"], part


def group_key(run: dict, with_alpha: bool = True) -> str:
    return " / ".join(_label_parts(run, with_alpha))


def swept_keys(runs: Sequence[dict]) -> list[str]:
    """Config keys, other than seeds, output paths and the label's, whose values differ between runs
    (only keys every run's config.yaml has can be compared)."""
    flat = [scaling.flatten(r["config"]) for r in runs]
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
        flat = scaling.flatten(run["config"])
        values = tuple(_frozen(flat.get(k)) for k in keys)
        groups.setdefault((group_key(run, with_alpha=ALPHA not in keys), values), []).append(run)
    return groups


def predicts_one_class(run: dict) -> Optional[bool]:
    """Whether the run's final model predicted a single class on the whole test set (None: not logged)."""
    counts = run["summary"].get("final_predicted_per_class")
    return None if counts is None else sum(1 for c in counts if c > 0) <= 1


def _one_class_cell(group: Sequence[dict]) -> str:
    flags = [f for f in (predicts_one_class(r) for r in group) if f is not None]
    return f"{sum(flags)} of {len(flags)}" if flags else "–"


def markdown_table(runs: Sequence[dict], view: TaskView) -> str:
    """One row per group of ``runs`` (all of ``view``'s task): its swept values, then ``view``'s columns,
    and for classification runs that logged their predictions, how many ended predicting one class."""
    keys = swept_keys(runs)
    columns = [m for m in view.columns if not m.optional or any(r["summary"].get(m.key) is not None for r in runs)]
    one_class = any(predicts_one_class(r) is not None for r in runs)
    rows = ["| method / partition | " + "".join(f"{k} | " for k in keys) + "seeds | rounds | "
            + "".join(f"{m.header} | " for m in columns) + ("runs ending at one class | " if one_class else "")
            + "trainable params | client params | client GFLOPs / example | wall s |",
            "|---|" + "---|" * (len(keys) + len(columns) + 6 + one_class)]
    for (label, values), group in groups_of(runs, keys).items():
        s0 = group[0]["summary"]
        flops = s0.get("client_train_flops_per_example")
        rows.append(
            f"| {label} | " + "".join(f"{_cell(v)} | " for v in values)
            + f"{len(group)} | {s0['rounds']} | "
            + "".join(f"{_fmt([r['summary'].get(m.key) for r in group], m.scale, m.digits)} | " for m in columns)
            + (f"{_one_class_cell(group)} | " if one_class else "")
            + f"{_millions(s0.get('trainable_params'), 3)} | "
            + f"{s0.get('client_params', 0) / 1e6:.1f}M | {'–' if flops is None else f'{flops / 1e9:.2f}'} "
            f"| {statistics.fmean(r['summary']['wall_seconds'] for r in group):.0f} |")
    return "\n".join(rows) + "\n"


def _millions(n: Optional[float], digits: int = 1) -> str:
    return "–" if n is None else f"{n / 1e6:.{digits}f}M"


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
                         "trainable_params", "client_params", "client_train_flops_per_example", "wall_seconds",
                         "runs"])
        for task, task_runs in tasks.items():
            for group in groups_of(task_runs).values():
                s0 = group[0]["summary"]
                flat = scaling.flatten(group[0]["config"])
                stats = [x for m in metrics
                         for x in (_mean_std([r["summary"].get(m) for r in group]) if m in VIEWS[task].csv_metrics
                                   else ("", ""))]
                fed = group[0]["config"].get("fed", {})
                partition = s0.get("partition", fed.get("partition"))
                alpha = fed.get("alpha") if partition == "dirichlet" else None
                writer.writerow([s0["method"], *([task] if with_task else []), partition, alpha,
                                 *(_cell(_frozen(flat.get(k)), "") for k in keys), len(group), s0["rounds"], *stats,
                                 s0.get("trainable_params"), s0.get("client_params"),
                                 s0.get("client_train_flops_per_example"),
                                 statistics.fmean(r["summary"]["wall_seconds"] for r in group),
                                 " ".join(r["dir"] for r in group)])


# ----------------------------------------------------------------------------------------------------
# Paired differences over seeds
# ----------------------------------------------------------------------------------------------------

PAIRED_TITLE = "Paired differences (same seeds)"
MIN_PAIRED_SEEDS = 2  # a standard deviation needs two differences


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function, by the modified Lentz method (Numerical
    Recipes, betacf): terms d_{2m} = m(b−m)x / ((a+2m−1)(a+2m)), d_{2m+1} = −(a+m)(a+b+m)x / ((a+2m)(a+2m+1))."""
    tiny = 1e-300  # keeps a vanishing denominator from dividing by zero
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for term in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                     -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + term * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + term / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    # The fraction converges quickly below x = (a+1)/(a+b+2); above it, I_x(a, b) = 1 − I_{1−x}(b, a).
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def t_upper_tail(t: float, df: float) -> float:
    """P(T > t) for t >= 0, T Student's t with ``df`` degrees of freedom: ½ I_{df/(df+t²)}(df/2, ½)."""
    return 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p: bisection on the upper tail (monotone in t, so it always converges);
    the tail rather than the CDF keeps p near 1 accurate."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    tail = 1.0 - p
    lo, hi = 0.0, 1.0
    while t_upper_tail(hi, df) > tail:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if t_upper_tail(mid, df) > tail else (lo, mid)
    return 0.5 * (lo + hi)


def paired_stats(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """Mean and sample standard deviation of paired differences (n >= 2), and the two-sided t-interval
    mean ± t_{(1+level)/2, n−1} · sd / √n."""
    n = len(diffs)
    if n < 2:
        raise ValueError(f"paired_stats needs at least 2 differences, got {n}")
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = t_quantile((1.0 + level) / 2.0, n - 1) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


@dataclass(frozen=True)
class PairedDiff:
    """One metric's per-seed differences A − B between two groups that differ in one setting."""
    a: str
    b: str
    key: str  # the setting they differ in
    metric: Metric
    seeds: tuple  # the seeds both groups ran (with the metric)
    left_out: tuple  # seeds only one of them ran
    mean: float
    sd: float
    lo: float  # the 95 % t-interval of the mean difference
    hi: float

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0


def _by_seed(group: Sequence[dict], key: str) -> dict[object, float]:
    """The group's ``key`` per seed (the mean, should a seed have run twice); a run without a seed in its
    config.yaml cannot be paired."""
    values: dict[object, list[float]] = {}
    for run in group:
        seed, value = run["config"].get("run", {}).get("seed"), run["summary"].get(key)
        if seed is not None and value is not None:
            values.setdefault(seed, []).append(value)
    return {seed: statistics.fmean(v) for seed, v in values.items()}


def _settings(run: dict, keys: Sequence[str], values: Sequence[object]) -> dict[str, object]:
    """What a group computes: its method, partition and swept values."""
    method, partition = _label_parts(run, with_alpha=ALPHA not in keys)
    return {"fed.method": method, "fed.partition": partition, **dict(zip(keys, values))}


def paired_differences(runs: Sequence[dict], view: TaskView) -> list[PairedDiff]:
    """``view.paired``'s metrics compared seed by seed for every two groups of ``runs`` that differ in
    exactly one setting and share at least MIN_PAIRED_SEEDS seeds; A is the group the table shows first."""
    keys = swept_keys(runs)
    groups = [(group_name(label, keys, values), _settings(group[0], keys, values), group)
              for (label, values), group in groups_of(runs, keys).items()]
    pairs = []
    for metric in view.paired:
        for (name_a, set_a, runs_a), (name_b, set_b, runs_b) in combinations(groups, 2):
            differ = [k for k in set_a if set_a[k] != set_b[k]]
            a, b = _by_seed(runs_a, metric.key), _by_seed(runs_b, metric.key)
            common = sorted(a.keys() & b.keys())
            if len(differ) != 1 or len(common) < MIN_PAIRED_SEEDS:
                continue
            pairs.append(PairedDiff(name_a, name_b, differ[0], metric, tuple(common),
                                    tuple(sorted(a.keys() ^ b.keys())), *paired_stats([a[s] - b[s] for s in common])))
    return pairs


def _shown(value: float, metric: Metric) -> str:
    return f"{value * metric.scale:.{metric.digits}f}"


def paired_table(pairs: Sequence[PairedDiff], heading: str) -> str:
    """The pairs as a Markdown table under ``heading`` (values as the metric shows them); "" without pairs."""
    if not pairs:
        return ""
    rows = [heading, "", "A − B over the seeds both groups ran; 95 % CI: mean ± t(0.975, n − 1) · sd / √n.", "",
            "| A | B | differs in | metric | seeds | left out | A − B | sd | 95 % CI | CI excludes 0 |",
            "|---|" + "---|" * 9]
    for p in pairs:
        rows.append(f"| {p.a} | {p.b} | {p.key} | {p.metric.header} | {len(p.seeds)} | {len(p.left_out)} "
                    f"| {_shown(p.mean, p.metric)} | {_shown(p.sd, p.metric)} "
                    f"| [{_shown(p.lo, p.metric)}, {_shown(p.hi, p.metric)}] | {'yes' if p.excludes_zero else 'no'} |")
    return "\n".join(rows) + "\n"


def write_paired_csv(pairs: "OrderedDict[str, list[PairedDiff]]", path: Path) -> None:
    """Every task's pairs, unrounded (accuracies as fractions, as in report.csv); a header alone when no
    two groups pair."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "a", "b", "differs_in", "metric", "seeds", "left_out", "mean_diff", "sd",
                         "ci95_low", "ci95_high", "ci_excludes_zero", "common_seeds", "left_out_seeds"])
        for task, task_pairs in pairs.items():
            for p in task_pairs:
                writer.writerow([task, p.a, p.b, p.key, p.metric.key, len(p.seeds), len(p.left_out), p.mean, p.sd,
                                 p.lo, p.hi, p.excludes_zero, " ".join(map(str, p.seeds)),
                                 " ".join(map(str, p.left_out))])


def per_round(group: Sequence[dict], metric: Metric, initial: Optional[str]) -> dict[int, list[float]]:
    """``metric`` of every run of ``group`` by round; round 0 is the FM before training (``initial``, a
    summary key) where the runs evaluated it."""
    by_round: dict[int, list[float]] = {}
    for run in group:
        if initial and run["summary"].get(initial) is not None:
            by_round.setdefault(0, []).append(run["summary"][initial])
        for row in run["metrics"]:
            if row.get(metric.key) is not None:
                by_round.setdefault(row["round"], []).append(row[metric.key])
    return by_round


def rounds_table(runs: Sequence[dict], view: TaskView, metric: Metric) -> str:
    """``metric`` per evaluated round, mean over each group's seeds (round 0: before training); "" when
    no run logged it."""
    keys = swept_keys(runs)
    initial = view.initial if metric is view.per_round else None
    groups = [(group_name(label, keys, values), per_round(group, metric, initial))
              for (label, values), group in groups_of(runs, keys).items()]
    groups = [(name, by_round) for name, by_round in groups if by_round]
    rounds = sorted({r for _, by_round in groups for r in by_round})
    if not rounds:
        return ""
    rows = [f"{metric.header}, mean over seeds:", "", "| group | " + " | ".join(f"round {r}" for r in rounds) + " |",
            "|---|" + "---|" * len(rounds)]
    for name, by_round in groups:
        rows.append(f"| {name} | " + " | ".join(
            _shown(statistics.fmean(by_round[r]), metric) if r in by_round else "–" for r in rounds) + " |")
    return "\n".join(rows) + "\n"


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
        by_round = per_round(group, metric, initial)
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
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # rounds are whole
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


def _bench_dirs(benches: Sequence[scaling.BenchRun]) -> set[Path]:
    """The run directories of bench runs (where bench.json lies, and the run.dir it records): their
    summary.json is the bench's own training run, which goes to the scaling table, not the results."""
    dirs = {b.path.parent.resolve() for b in benches}
    return dirs | {Path(b.bench["run_dir"]).resolve() for b in benches if b.bench.get("run_dir")}


def _find_runs(run_dirs: Sequence[str]) -> tuple[list[dict], list[scaling.BenchRun]]:
    """The finished training runs (summary.json) and the bench runs (bench.json) of ``run_dirs``; a
    directory of runs (e.g. a sweep, or bench runs at several world sizes) counts as all the runs
    inside it."""
    found: list[tuple[Path, list[Path], list[Path]]] = []
    for d in run_dirs:
        p = Path(d)
        if not p.is_dir():
            raise UserError(f"run directory not found: {p}")
        if (p / scaling.BENCH_FILE).is_file():
            found.append((p, [], [p / scaling.BENCH_FILE]))
        elif (p / "summary.json").is_file():
            found.append((p, [p], []))
        else:
            found.append((p, sorted(q.parent for q in p.rglob("summary.json")),
                          sorted(p.rglob(scaling.BENCH_FILE))))
    benches = [scaling.load_bench(b) for _, _, files in found for b in files]
    skip = _bench_dirs(benches)
    runs = []
    for p, summaries, files in found:
        mine = [q for q in summaries if q.resolve() not in skip]
        if not mine and not files:
            raise UserError(f"{p} holds no finished run (no summary.json) and no bench run (no bench.json)")
        runs.extend(load_run(q) for q in mine)
    return runs, benches


def _plots(task: str, task_runs: Sequence[dict], out_dir: Path) -> list[tuple[str, str]]:
    """Draws the task's plots into ``out_dir``: (file, alt text) of each."""
    view = VIEWS[task]
    (rounds_png, rounds_alt), (cost_png, cost_alt), (swept_png, swept_alt) = view.plots
    plot_rounds(task_runs, view, out_dir / rounds_png)
    plot_cost(task_runs, view, out_dir / cost_png)
    drawn = [(rounds_png, rounds_alt), (cost_png, cost_alt)]
    if any(row.get(GRAD_COSINE.key) is not None for run in task_runs for row in run["metrics"]):
        fidelity_png = "fidelity.png" if task == CLASSIFICATION else "perplexity-fidelity.png"
        plot_rounds(task_runs, view, out_dir / fidelity_png, GRAD_COSINE)
        drawn.append((fidelity_png, "gradient fidelity per round"))
    keys = swept_keys(task_runs)
    if keys:
        plot_swept(task_runs, keys, view, out_dir / swept_png)
        drawn.append((swept_png, swept_alt))
    return drawn


def _results(runs: Sequence[dict], out_dir: Path) -> tuple[list[str], list[str], list[str]]:
    """The training runs' report: report.csv, paired.csv and the plots written into ``out_dir``;
    returns report.md's sections, the tables printed and the files written."""
    write_csv(runs, out_dir / "report.csv")
    # A table and plots per task: accuracy and perplexity do not share columns or axes.
    tasks = runs_by_task(runs)
    pairs: "OrderedDict[str, list[PairedDiff]]" = OrderedDict()
    sections, tables, written = [], [], ["report.md", "report.csv", "paired.csv"]
    for task, task_runs in tasks.items():
        view = VIEWS[task]
        heading = f"## {view.title}\n\n" if len(tasks) > 1 else ""
        pairs[task] = paired_differences(task_runs, view)
        paired = paired_table(pairs[task], ("### " if len(tasks) > 1 else "## ") + PAIRED_TITLE)
        per_round_tables = [t for t in (rounds_table(task_runs, view, view.per_round),
                                        rounds_table(task_runs, view, GRAD_COSINE)) if t]
        table = markdown_table(task_runs, view) + "".join("\n" + t for t in per_round_tables) \
            + ("\n" + paired if paired else "")
        drawn = _plots(task, task_runs, out_dir)
        written += [png for png, _ in drawn]
        sections.append(heading + table + "\n" + "\n\n".join(f"![{alt}]({png})" for png, alt in drawn) + "\n")
        tables.append(heading + table)
    write_paired_csv(pairs, out_dir / "paired.csv")
    return sections, tables, written


def run_report(run_dirs: Sequence[str], out: Optional[str] = None) -> int:
    """report.md over the training runs of ``run_dirs`` (tables, report.csv, paired.csv, plots) and,
    where there are bench runs, the scaling section (scaling.md, scaling.csv, scaling.png)."""
    runs, benches = _find_runs(run_dirs)
    scaling.check_one_workload(benches)  # before anything is written
    out_dir = Path(out) if out else Path(run_dirs[0]) if len(run_dirs) == 1 else Path("report")
    out_dir.mkdir(parents=True, exist_ok=True)
    sections, tables, written = _results(runs, out_dir) if runs else ([], [], ["report.md"])
    if benches:
        section, files = scaling.report(benches, out_dir)
        sections.append(section + "\n![throughput, efficiency and phases](scaling.png)\n")
        tables.append(section)
        written += files
    (out_dir / "report.md").write_text("# Results\n\n" + "\n".join(sections))
    print("\n".join(tables), end="")
    print("wrote " + ", ".join(str(out_dir / name) for name in written))
    return 0

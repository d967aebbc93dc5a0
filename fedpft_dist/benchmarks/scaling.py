"""The scaling table of ``fedpft report``: bench.json files of one workload at several world sizes.

One row per run, ordered by world size (then nodes): throughput in tokens/s (bench.json counts the
tokens the clients trained on; ``tokens_per_s_total`` is all of them over the measured rounds' whole
time, alignment and evaluation included), per rank and in all, the speed-up and the efficiency against
the first row (the smallest world size):

    efficiency(N) = throughput_total(N) / (throughput_total(N0) * N / N0)

next to the local-training tokens/s of a rank and the bus bandwidth of the round's all-reduce and of
a bare one of the same bytes. A second table splits a round into its phases (bench.json's medians).
The runs must be one workload: configs that differ in anything but where the run writes and how the
job is launched are refused, naming the key. Only the standard library and matplotlib: ``fedpft
report`` does not load torch.
"""
from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..errors import UserError

BENCH_FILE = "bench.json"

# Config keys that say where a run writes or how its job is launched (a key ending in "." covers its
# section): runs that differ only in these (and in the world size, which no config holds) are one
# workload. dist.threads_per_rank and dist.backend change what a rank computes with: not here.
LAUNCH_KEYS = ("run.dir", "run.log_level", "dist.timeout_s", "dist.log_all_ranks", "bench.out", "doctor.",
               "proxy.out", "distill.out", "distill.emulator_out", "distill.proxy", "distill.resume", "data.cache_dir")
# What bench.json itself records about the workload and the machine, compared as the config is.
RECORDED = ("benchmark", "method", "model", "rounds", "clients_per_round", "warmup_rounds", "device",
            "backend", "cuda_device", "torch")
# The phases of a round, as bench.json has them: (key, header, its rounds' count key or None).
PHASES = (("round_s_median_all", "whole round", None),
          ("local_training_s_median", "local training", None),
          ("wait_s_median", "wait for the slowest rank", None),
          ("allreduce_s", "all-reduce", None),
          ("aggregation_s", "aggregation", None),
          ("alignment_s", "alignment", "alignment_rounds"),
          ("evaluation_s", "evaluation", "evaluation_rounds"),
          ("fidelity_s", "fidelity", "fidelity_rounds"))
OVERSUBSCRIBED_NOTE = ("Oversubscribed: a machine ran more threads (ranks x threads per rank) than it has cores, "
                       "so its ranks took turns on them; such a row measures time-sharing, not scaling.")


@dataclass(frozen=True)
class BenchRun:
    """A bench.json, where it lies and the resolved config of its run ({} when none was found)."""
    path: Path
    bench: dict
    config: dict

    @property
    def name(self) -> str:
        return self.path.parent.name


def load_bench(path: Path) -> BenchRun:
    """bench.json at ``path``; the config is config.yaml beside it, else in the run.dir it records."""
    try:
        bench = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not a readable bench.json ({exc})") from None
    config = {}
    for run_dir in (path.parent, Path(bench.get("run_dir") or path.parent)):
        if (run_dir / "config.yaml").is_file():
            import yaml

            config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
            break
    return BenchRun(path, bench, config)


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """A nested config as ``{"section.key": value}``."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _is_launch_key(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in LAUNCH_KEYS)


def check_one_workload(runs: Sequence[BenchRun]) -> None:
    """UserError naming the first config key (or bench.json field) whose value differs between the runs,
    other than the launch keys; a key is compared among the runs that have it (configs of older versions
    lack newer keys)."""
    sources = (("", [(r, flatten(r.config)) for r in runs if r.config]),
               ("bench.json ", [(r, {k: r.bench.get(k) for k in RECORDED if k in r.bench}) for r in runs]))
    for source, flat in sources:
        keys = sorted({k for _, f in flat for k in f if not _is_launch_key(k)})
        for key in keys:
            seen: dict[str, BenchRun] = {}
            for run, f in flat:
                if key in f:
                    seen.setdefault(json.dumps(f[key], sort_keys=True), run)
            if len(seen) > 1:
                (va, a), (vb, b) = list(seen.items())[:2]
                raise UserError(f"the bench runs are not one workload: {source}{key} differs ({va} in {a.path.parent}, "
                                f"{vb} in {b.path.parent}); a scaling table compares one workload at several "
                                f"world sizes")


def _mean(values: Optional[Sequence[float]]) -> Optional[float]:
    values = [v for v in values or () if v is not None]
    return statistics.fmean(values) if values else None


def scaling_rows(runs: Sequence[BenchRun]) -> list[dict]:
    """One row per run, by world size, then nodes, then directory; speed-up and efficiency against the
    first row."""
    rows = []
    for run in runs:
        b, place = run.bench, run.bench.get("placement") or {}
        ws = int(b["world_size"])
        total = b.get("tokens_per_s_total")
        rows.append({
            "run": run.name, "path": str(run.path.parent), "world_size": ws, "nodes": place.get("nodes"),
            "ranks_per_node": place.get("ranks_per_node"), "machines": place.get("machines"),
            "threads_per_rank": b.get("threads_per_rank"), "cores_per_machine": place.get("cores_per_machine"),
            "threads_per_machine": place.get("threads_per_machine"), "oversubscribed": place.get("oversubscribed"),
            "device": b.get("device"), "backend": b.get("backend"),
            "tokens_per_s_total": total, "tokens_per_s_per_rank": total / ws if total is not None else None,
            "local_tokens_per_s_per_rank": _mean(b.get("tokens_per_s_per_rank")),
            "allreduce_busbw_gbps": (b.get("allreduce_bandwidth") or {}).get("busbw_gbps"),
            "bare_allreduce_busbw_gbps": (b.get("bare_allreduce_bandwidth") or {}).get("busbw_gbps"),
            "aggregation_bytes": b.get("aggregation_bytes"), "rounds_measured": b.get("rounds_measured"),
            **{key: b.get(key) for key, _, _ in PHASES},
            **{count: b.get(count) for _, _, count in PHASES if count},
        })
    rows.sort(key=lambda r: (r["world_size"], r["nodes"] or 0, r["path"]))
    base = rows[0] if rows else None
    for row in rows:
        t, t0 = row["tokens_per_s_total"], base["tokens_per_s_total"]
        ok = t is not None and t0
        row["speedup"] = t / t0 if ok else None
        row["efficiency"] = t / (t0 * row["world_size"] / base["world_size"]) if ok else None
    return rows


def _num(x: Optional[float], digits: int = 0, unit: str = "") -> str:
    return "–" if x is None else f"{x:,.{digits}f}{unit}"


def _placement_cell(row: dict) -> str:
    """``2 × 2`` (nodes × ranks per node), ``(1 machine)`` when the nodes share one; – for bench.json
    files from before placement was recorded."""
    if row["nodes"] is None:
        return "–"
    cell = f"{row['nodes']} × {row['ranks_per_node']}"
    if row["machines"] is not None and row["machines"] < row["nodes"]:
        cell += f" (on {row['machines']} machine{'s' if row['machines'] > 1 else ''})"
    return cell


def _cores_cell(row: dict) -> str:
    if row["cores_per_machine"] is None:
        return "–"
    cell = f"{row['threads_per_machine']} on {row['cores_per_machine']}"
    return cell + (" **oversubscribed**" if row["oversubscribed"] else "")


def _phase_cell(row: dict, key: str, count: Optional[str]) -> str:
    value = row[key]
    if value is None:
        return "–"
    cell = f"{value:.3f}" if value < 10 else f"{value:.1f}"
    return cell + (f" ({row[count]})" if count and row.get(count) is not None else "")


def markdown(rows: Sequence[dict], heading: str = "## Scaling") -> str:
    """The throughput table, the phase table and the notes, under ``heading``."""
    r0 = rows[0]
    out = [heading, "",
           f"{len(rows)} runs of one workload ({r0['device']}, {r0['backend']}); throughput = tokens the clients "
           f"trained on per second of whole rounds; efficiency = tokens/s(N) / (tokens/s({r0['world_size']}) × "
           f"N / {r0['world_size']}), against the first row.", "",
           "| run | world size | nodes × ranks per node | threads per rank | threads on cores | tokens/s (all) "
           "| tokens/s per rank | speed-up | efficiency | local training tokens/s per rank "
           "| all-reduce busbw GB/s | bare all-reduce busbw GB/s |",
           "|---|" + "---|" * 11]
    for r in rows:
        eff = None if r["efficiency"] is None else 100 * r["efficiency"]
        out.append(f"| {r['run']} | {r['world_size']} | {_placement_cell(r)} | {_num(r['threads_per_rank'])} "
                   f"| {_cores_cell(r)} | {_num(r['tokens_per_s_total'])} | {_num(r['tokens_per_s_per_rank'])} "
                   f"| {_num(r['speedup'], 2, unit='x')} | {_num(eff, 1, unit=' %')} "
                   f"| {_num(r['local_tokens_per_s_per_rank'])} | {_num(r['allreduce_busbw_gbps'], 3)} "
                   f"| {_num(r['bare_allreduce_busbw_gbps'], 3)} |")
    if any(r["oversubscribed"] for r in rows):
        out += ["", OVERSUBSCRIBED_NOTE]
    out += ["", "Seconds per round by phase, the slowest rank's, median over the measured rounds (alignment, "
                "evaluation, fidelity: over the rounds that do them, their count in brackets; aggregation "
                "includes the wait for the slowest rank and the all-reduce):", "",
            "| run | world size | " + " | ".join(header for _, header, _ in PHASES) + " |",
            "|---|---|" + "---|" * len(PHASES)]
    for r in rows:
        out.append(f"| {r['run']} | {r['world_size']} | "
                   + " | ".join(_phase_cell(r, key, count) for key, _, count in PHASES) + " |")
    return "\n".join(out) + "\n"


CSV_COLUMNS = ("run", "path", "world_size", "nodes", "ranks_per_node", "machines", "threads_per_rank",
               "threads_per_machine", "cores_per_machine", "oversubscribed", "device", "backend",
               "tokens_per_s_total", "tokens_per_s_per_rank", "speedup", "efficiency",
               "local_tokens_per_s_per_rank", "allreduce_busbw_gbps", "bare_allreduce_busbw_gbps",
               "aggregation_bytes", "rounds_measured", *(key for key, _, _ in PHASES),
               *(count for _, _, count in PHASES if count))


def write_csv(rows: Sequence[dict], path: Path) -> None:
    """The rows, unrounded (efficiency as a fraction; empty where bench.json has no value)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r in rows:
            writer.writerow(["" if r[c] is None else r[c] for c in CSV_COLUMNS])


def per_round_split(row: dict) -> dict[str, float]:
    """Seconds per measured round by phase, for the stacked bars: local training, wait, all-reduce, the
    rest of the aggregation, and alignment, evaluation and fidelity spread over the measured rounds
    (their median x the rounds that do them / the rounds measured)."""
    get = lambda key: row.get(key) or 0.0  # noqa: E731
    measured = max(1, row.get("rounds_measured") or 1)
    return {"local training": get("local_training_s_median"), "wait for the slowest rank": get("wait_s_median"),
            "all-reduce": get("allreduce_s"),
            "rest of aggregation": max(0.0, get("aggregation_s") - get("wait_s_median") - get("allreduce_s")),
            **{header: get(key) * (row.get(count) or 0) / measured for key, header, count in PHASES if count}}


def series(rows: Sequence[dict]) -> list[tuple[str, list[dict]]]:
    """The lines of the plots: the runs on one node, and for each count of ranks per node that some
    multi-node run has, the runs with that many ranks per node (one node's run included)."""
    out = [("1 node", [r for r in rows if (r["nodes"] or 1) == 1])]
    for rpn in sorted({r["ranks_per_node"] for r in rows if (r["nodes"] or 1) > 1}):
        out.append((f"{rpn} rank(s) per node", [r for r in rows if r["ranks_per_node"] == rpn]))
    return [(name, line) for name, line in out if line]


def _short(row: dict) -> str:
    return (f"{row['world_size']}: {row['nodes']}×{row['ranks_per_node']}" if row["nodes"] is not None
            else str(row["world_size"])) + ("*" if row["oversubscribed"] else "")


def _draw_lines(ax, rows: Sequence[dict], value) -> None:
    """``value(row)`` against the world size, a line per series, oversubscribed runs ringed in red."""
    for name, line in series(rows):
        ax.plot([r["world_size"] for r in line], [value(r) for r in line], "o-", label=name)
    over = [r for r in rows if r["oversubscribed"]]
    if over:
        ax.plot([r["world_size"] for r in over], [value(r) for r in over], "o", ms=12, mfc="none", mec="red",
                label="oversubscribed")
    xs = sorted({r["world_size"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("world size (ranks)")
    ax.grid(alpha=0.3)


def plot(rows: Sequence[dict], path: Path) -> None:
    """Three panels: tokens/s in all against the world size with the ideal line through the first row,
    the efficiency, and each run's round split by phase (stacked bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_e, ax_p) = plt.subplots(1, 3, figsize=(17, 4.8))
    base = rows[0]
    _draw_lines(ax_t, rows, lambda r: r["tokens_per_s_total"] or 0.0)
    if base["tokens_per_s_total"]:
        xs = sorted({r["world_size"] for r in rows})
        ax_t.plot(xs, [base["tokens_per_s_total"] * x / base["world_size"] for x in xs], "--", color="0.5",
                  label=f"linear from {base['world_size']} rank(s)")
    ax_t.set_ylabel("tokens/s, all ranks (whole rounds)")
    ax_t.legend(fontsize=7)
    _draw_lines(ax_e, rows, lambda r: 100 * (r["efficiency"] or 0.0))
    ax_e.axhline(100, color="0.5", ls="--")
    ax_e.set_ylabel(f"efficiency against {base['world_size']} rank(s) (%)")
    ax_e.set_ylim(bottom=0)
    splits = [per_round_split(r) for r in rows]
    bottom = [0.0] * len(rows)
    for phase in splits[0]:
        heights = [s[phase] for s in splits]
        ax_p.bar(range(len(rows)), heights, bottom=bottom, label=phase)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax_p.set_xticks(range(len(rows)), [_short(r) for r in rows], fontsize=8)
    ax_p.set_xlabel("world size: nodes × ranks per node (*: oversubscribed)")
    ax_p.set_ylabel("seconds per round (slowest rank)")
    ax_p.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(runs: Sequence[BenchRun], out_dir: Path) -> tuple[str, list[str]]:
    """Checks the runs are one workload, writes scaling.md, scaling.csv and scaling.png into ``out_dir``;
    returns the Markdown section and the files written."""
    check_one_workload(runs)
    rows = scaling_rows(runs)
    section = markdown(rows)
    (out_dir / "scaling.md").write_text(section.replace("## Scaling", "# Scaling", 1)
                                        + "\n![throughput, efficiency and phases](scaling.png)\n")
    write_csv(rows, out_dir / "scaling.csv")
    plot(rows, out_dir / "scaling.png")
    return section, ["scaling.md", "scaling.csv", "scaling.png"]

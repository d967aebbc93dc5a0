"""fedpft report over bench runs: the scaling table (throughput, efficiency against the smallest world
size, phases, all-reduce bandwidth) from bench.json files, the refusal of runs of different workloads,
slurm/submit-scaling.sh and scripts/scaling.sh (statically), and one real 1- and 2-rank bench."""
import csv
import json
import os
import subprocess

import pytest

from conftest import PYTHON, REPO, child_env, run_cli, run_ranks

from fedpft_dist.benchmarks import scaling

PNG = b"\x89PNG\r\n\x1a\n"
CONFIG = """run:
  dir: {dir}
  seed: 0
dist:
  threads_per_rank: 1
  timeout_s: {timeout}
bench:
  warmup_rounds: 1
  out: ''
model:
  path: minilm
fed:
  method: fedpft_no_layer_distill
  num_clients: 60
  batch_size: {batch}
  rounds: 3
"""


def _bench(world_size: int, tokens_per_s: float, nodes: int = 1, machines: int = 1, cores: int = 2,
           device: str = "cpu", run_dir: str = "runs/x") -> dict:
    """A bench.json with the fields `fedpft bench` writes (tests/test_bench.py checks the real ones)."""
    per_rank = tokens_per_s / world_size * 1.25   # local training alone runs faster than whole rounds
    threads = world_size // machines
    return {
        "benchmark": "federated", "world_size": world_size, "device": device, "backend": "gloo",
        "threads_per_rank": 1, "host": "vm", "torch": "2.13.0+cpu", "cuda_device": None,
        "method": "fedpft_no_layer_distill", "model": "minilm", "rounds": 3, "clients_per_round": 15,
        "warmup_rounds": 1, "rounds_measured": 2, "round_s_median_all": 60.0 / world_size,
        "round_s_median": 60.0 / world_size, "rounds_plain": 1, "train_round_s_median": 50.0 / world_size,
        "local_training_s_median": 48.0 / world_size, "wait_s_median": 0.5, "allreduce_s": 0.01,
        "aggregation_s": 0.6, "load_imbalance_median": 1.02, "tokens_per_s_per_rank": [per_rank] * world_size,
        "tokens_per_s_total": tokens_per_s, "clients_per_rank": [15 / world_size] * world_size,
        "alignment_s": None, "alignment_rounds": 0, "alignment_step_s": None, "alignment_set_up_s": None,
        "evaluation_s": 4.0 / world_size, "evaluation_rounds": 1, "fidelity_s": None, "fidelity_rounds": 0,
        "clients_measured": 30, "per_client_ms": {"slice": 0.1, "set_up": 3.0, "compute": 200.0, "collect": 0.3,
                                                  "accumulate": 1.0, "fixed": 4.4},
        "peak_memory_mb_per_rank": [700.0] * world_size, "startup_s": {"task": 0.4, "models": 2.7,
                                                                       "public_text": 0.0, "total": 3.1},
        "placement": {"launch": "torchrun", "nodes": nodes, "ranks_per_node": world_size // nodes,
                      "machines": machines, "cores_per_machine": cores, "threads_per_machine": threads,
                      "oversubscribed": threads > cores},
        "aggregation_bytes": 1188936, "bare_allreduce_s": 0.002,
        "allreduce_bandwidth": {"algbw_gbps": 0.12 if world_size > 1 else None,
                                "busbw_gbps": 0.12 * 2 * (world_size - 1) / world_size if world_size > 1 else None},
        "bare_allreduce_bandwidth": {"algbw_gbps": 0.6 if world_size > 1 else None,
                                     "busbw_gbps": 0.6 * 2 * (world_size - 1) / world_size if world_size > 1 else None},
        "stats_overhead": 0.03, "stats_step_s_per_rank": [{"without": 0.2, "with": 0.21}] * world_size,
        "stats_steps": 2, "stats_layers": 4, "limits": {}, "peak_memory_mb_per_rank_with_limits": [720.0] * world_size,
        "peak_memory_kind": "rss", "final_accuracy": 0.5, "run_seconds": 100.0 / world_size, "run_dir": run_dir,
        "per_round": [],
    }


def _run(path, bench: dict, batch: int = 8, timeout: int = 300, summary: bool = True) -> None:
    """A bench run directory as `fedpft bench` leaves it: config.yaml, bench.json and the training
    run's own summary.json and metrics.jsonl (which the results table must not count)."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(CONFIG.format(dir=path, batch=batch, timeout=timeout))
    (path / "bench.json").write_text(json.dumps({**bench, "run_dir": str(path)}))
    if summary:
        (path / "summary.json").write_text(json.dumps({"method": "fedpft_no_layer_distill", "rounds": 3,
                                                       "world_size": bench["world_size"], "final_accuracy": 0.5,
                                                       "best_accuracy": 0.5, "wall_seconds": 10.0}))
        (path / "metrics.jsonl").write_text(json.dumps({"round": 1, "accuracy": 0.5}) + "\n")


def _rows(out) -> list[dict]:
    with open(out / "scaling.csv") as f:
        return list(csv.DictReader(f))


def test_scaling_table_orders_by_world_size_and_computes_efficiency(tmp_path):
    # directory names out of world-size order: the table orders by world size, not by name
    _run(tmp_path / "runs" / "a-4ranks", _bench(4, 3000.0, cores=2), timeout=60)
    _run(tmp_path / "runs" / "b-1rank", _bench(1, 1000.0))
    _run(tmp_path / "runs" / "c-2ranks", _bench(2, 1800.0))
    proc = run_cli("report", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = _rows(tmp_path / "out")
    assert [r["world_size"] for r in rows] == ["1", "2", "4"]
    assert [r["run"] for r in rows] == ["b-1rank", "c-2ranks", "a-4ranks"]
    # efficiency = T(N) / (T(1) * N / 1): 1800 / 2000 and 3000 / 4000
    assert [float(r["efficiency"]) for r in rows] == pytest.approx([1.0, 0.9, 0.75])
    assert [float(r["speedup"]) for r in rows] == pytest.approx([1.0, 1.8, 3.0])
    assert [float(r["tokens_per_s_per_rank"]) for r in rows] == pytest.approx([1000.0, 900.0, 750.0])
    assert rows[0]["allreduce_busbw_gbps"] == "" and float(rows[2]["bare_allreduce_busbw_gbps"]) == pytest.approx(0.9)
    assert [r["oversubscribed"] for r in rows] == ["False", "False", "True"]
    table = (tmp_path / "out" / "scaling.md").read_text()
    assert "| c-2ranks | 2 | 1 × 2 | 1 | 2 on 2 | 1,800 | 900 | 1.80x | 90.0 % | 1,125 | 0.120 | 0.600 |" in table
    assert "| a-4ranks | 4 | 1 × 4 | 1 | 4 on 2 **oversubscribed** | 3,000 | 750 | 3.00x | 75.0 % |" in table
    assert scaling.OVERSUBSCRIBED_NOTE in table
    # the phase table: the slowest rank's medians, evaluation over the 1 round that evaluates
    assert "| b-1rank | 1 | 60.0 | 48.0 | 0.500 | 0.010 | 0.600 | – | 4.000 (1) | – |" in table
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Scaling" in report and "![throughput, efficiency and phases](scaling.png)" in report
    # the bench runs' own training runs are not results: no results table, no report.csv
    assert "method / partition" not in report and not (tmp_path / "out" / "report.csv").exists()
    assert "| a-4ranks | 4 |" in proc.stdout and "scaling.png" in proc.stdout
    data = (tmp_path / "out" / "scaling.png").read_bytes()
    assert data[:8] == PNG and len(data) > 5000


def test_scaling_rows_base_is_the_smallest_world_size_and_fewest_nodes(tmp_path):
    _run(tmp_path / "n2", _bench(2, 1500.0, nodes=2, machines=1))   # two network-namespace nodes, one machine
    _run(tmp_path / "w2", _bench(2, 1900.0))
    _run(tmp_path / "w8", _bench(8, 6000.0, nodes=2, machines=2, cores=4))
    runs = [scaling.load_bench(tmp_path / d / "bench.json") for d in ("w8", "n2", "w2")]
    rows = scaling.scaling_rows(runs)
    assert [(r["run"], r["nodes"]) for r in rows] == [("w2", 1), ("n2", 2), ("w8", 2)]
    assert [r["efficiency"] for r in rows] == pytest.approx([1.0, 1500 / 1900, 6000 / (1900 * 4)])
    table = scaling.markdown(rows)
    assert "| n2 | 2 | 2 × 1 (on 1 machine) |" in table and "| w8 | 8 | 2 × 4 | 1 | 4 on 4 |" in table
    assert scaling.OVERSUBSCRIBED_NOTE not in table
    # alignment, evaluation and fidelity spread over the measured rounds in the plot's bars
    split = scaling.per_round_split(rows[0])
    assert split["evaluation"] == pytest.approx(2.0 / 2) and split["rest of aggregation"] == pytest.approx(0.09)


def test_bench_json_from_before_placement_still_reports(tmp_path):
    bench = _bench(2, 1800.0)
    del bench["placement"]
    _run(tmp_path / "old", bench)
    rows = scaling.scaling_rows([scaling.load_bench(tmp_path / "old" / "bench.json")])
    assert rows[0]["nodes"] is None and "| old | 2 | – | 1 | – | 1,800 |" in scaling.markdown(rows)


def test_runs_of_different_workloads_are_refused_naming_the_key(tmp_path):
    _run(tmp_path / "runs" / "r1", _bench(1, 1000.0), batch=8)
    _run(tmp_path / "runs" / "r2", _bench(2, 1800.0), batch=16)
    proc = run_cli("report", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "fed.batch_size differs (8 in" in proc.stderr and "not one workload" in proc.stderr
    assert not (tmp_path / "out").exists()   # refused before anything is written


def test_what_bench_json_records_must_match_too(tmp_path):
    _run(tmp_path / "r1", _bench(1, 1000.0))
    _run(tmp_path / "r2", _bench(2, 1800.0, device="cuda"))
    with pytest.raises(scaling.UserError, match=r"bench.json device differs \(\"cpu\" in"):
        scaling.check_one_workload([scaling.load_bench(tmp_path / d / "bench.json") for d in ("r1", "r2")])


def test_launch_keys_may_differ(tmp_path):
    """run.dir, dist.timeout_s, bench.out and the like say where a run writes and how it is launched."""
    _run(tmp_path / "r1", _bench(1, 1000.0), timeout=300)
    _run(tmp_path / "r2", _bench(2, 1800.0), timeout=60)
    scaling.check_one_workload([scaling.load_bench(tmp_path / d / "bench.json") for d in ("r1", "r2")])


def test_training_runs_and_bench_runs_in_one_report(tmp_path):
    train = tmp_path / "train" / "a0"
    train.mkdir(parents=True)
    (train / "metrics.jsonl").write_text(json.dumps({"round": 1, "accuracy": 0.6}) + "\n")
    (train / "summary.json").write_text(json.dumps({
        "method": "fedpft", "rounds": 2, "world_size": 2, "partition": "iid", "final_accuracy": 0.6,
        "best_accuracy": 0.6, "final_macro_f1": 0.5, "client_params": 19_000_000, "wall_seconds": 10.0}))
    (train / "config.yaml").write_text("run:\n  seed: 0\nfed:\n  partition: iid\n")
    _run(tmp_path / "bench" / "w1", _bench(1, 1000.0))
    _run(tmp_path / "bench" / "w2", _bench(2, 1800.0))
    proc = run_cli("report", str(tmp_path / "train"), str(tmp_path / "bench"), "--out", str(tmp_path / "out"),
                   timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| fedpft / iid | 1 | 2 | 60.0 |" in report and "## Scaling" in report
    with open(tmp_path / "out" / "report.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["fedpft"]   # the bench runs' summaries left out
    assert len(_rows(tmp_path / "out")) == 2


# ----------------------------------------------------------------------------------------------------
# The scripts
# ----------------------------------------------------------------------------------------------------

def test_submit_scaling_submits_one_job_per_size_into_its_own_run_dir(tmp_path):
    script = REPO / "slurm" / "submit-scaling.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text('#!/bin/sh\necho "$@" >> "$SBATCH_LOG"\necho 4242\n')
    (fake / "sbatch").chmod(0o755)
    log = tmp_path / "sbatch.log"
    env = {"PATH": f"{fake}:/usr/bin:/bin", "SBATCH_LOG": str(log), "SCALING_NODES": "1 2 4",
           "SBATCH_ARGS": "--gpus-per-node=8 -p gpu"}
    (tmp_path / "sc" / "nodes-2").mkdir(parents=True)
    (tmp_path / "sc" / "nodes-2" / "bench.json").write_text("{}")   # done: skipped
    proc = subprocess.run(["bash", str(script), str(tmp_path / "sc"), "--config", "configs/bench/w1.yaml",
                           "fed.rounds=6"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 2
    for call, n in zip(calls, (1, 4)):
        assert f"--nodes={n} " in call and "--gpus-per-node=8 -p gpu" in call
        assert call.endswith(f"slurm/multi-node.sbatch bench --config configs/bench/w1.yaml fed.rounds=6 "
                             f"run.dir={tmp_path / 'sc'}/nodes-{n}"), call
    assert "skipped" in proc.stdout and "nodes-2" in proc.stdout
    assert (f"fedpft report {tmp_path / 'sc'}/nodes-1 {tmp_path / 'sc'}/nodes-2 {tmp_path / 'sc'}/nodes-4 "
            f"--out {tmp_path / 'sc'}/report") in proc.stdout
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert usage.returncode == 2 and "usage:" in usage.stderr
    clash = subprocess.run(["bash", str(script), str(tmp_path / "x"), "run.dir=y"], capture_output=True, text=True,
                           env=env)
    assert clash.returncode == 2 and "run.dir" in clash.stderr


def test_scaling_script_parses_and_names_its_run_dirs(tmp_path):
    script = REPO / "scripts" / "scaling.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    for name in ("ranks-$n", "nodes-2x$n", "fedpft_dist report", "bench.json"):
        assert name in text, name
    # every size has its own run.dir: an override of it is refused before anything runs
    proc = subprocess.run(["bash", str(script), str(tmp_path / "sc"), "run.dir=x"], capture_output=True, text=True,
                          env=child_env(FEDPFT_PYTHON=PYTHON), timeout=30)
    assert proc.returncode == 2 and "usage:" in proc.stderr and not (tmp_path / "sc").exists()


# ----------------------------------------------------------------------------------------------------
# A real run: 1 and 2 gloo ranks of the smallest bench config, then the report
# ----------------------------------------------------------------------------------------------------

# configs/bench/many-clients.yaml cut to 60 clients of 8 tweets, 15 per round, 2 rounds (1 measured):
# about 25 s on 1 rank of a quiet 2-core machine.
SMALL = ("bench", "--config", "configs/bench/many-clients.yaml", "fed.num_clients=16", "data.max_train=128",
         "fed.client_fraction=0.5", "fed.rounds=2", "bench.allreduce_iters=3", "bench.stats_steps=1",
         "bench.limit_reps=1")


@pytest.mark.slow
@pytest.mark.distributed
def test_real_bench_at_one_and_two_ranks_gives_a_two_row_table(tmp_path):
    one = run_cli(*SMALL, f"run.dir={tmp_path / 'runs' / 'ranks-1'}")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_ranks([*SMALL, f"run.dir={tmp_path / 'runs' / 'ranks-2'}"], 2, 300)
    assert two.returncode == 0, two.stderr[-3000:]
    placement = json.loads((tmp_path / "runs" / "ranks-2" / "bench.json").read_text())["placement"]
    assert placement == {"launch": "torchrun", "nodes": 1, "ranks_per_node": 2, "machines": 1,
                         "cores_per_machine": os.cpu_count(), "threads_per_machine": 2,
                         "oversubscribed": os.cpu_count() < 2}
    proc = run_cli("report", str(tmp_path / "runs"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = _rows(tmp_path / "runs")
    assert [(r["run"], r["world_size"]) for r in rows] == [("ranks-1", "1"), ("ranks-2", "2")]
    assert float(rows[0]["efficiency"]) == 1.0 and 0.05 < float(rows[1]["efficiency"]) < 2.0
    assert float(rows[1]["tokens_per_s_total"]) > 0 and float(rows[1]["allreduce_busbw_gbps"]) > 0
    assert "| ranks-2 | 2 | 1 × 2 | 1 |" in (tmp_path / "runs" / "report.md").read_text()

"""`fedpft bench`: bench.json from a real 2-rank run, and the pure pieces of its arithmetic."""
import json
import math

import pytest

from conftest import REPO, run_cli, run_ranks

from fedpft_dist.benchmarks.federated import bandwidth

CONFIG = "configs/tiny.yaml"
REQUIRED = ("world_size", "round_s_median", "allreduce_s", "bare_allreduce_s", "stats_overhead",
            "tokens_per_s_per_rank", "aggregation_s", "aggregation_bytes", "allreduce_bandwidth",
            "bare_allreduce_bandwidth", "alignment_s", "evaluation_s", "peak_memory_mb_per_rank",
            "round_s_median_all", "alignment_step_s", "fidelity_s", "startup_s", "limits",
            "peak_memory_mb_per_rank_with_limits")


def test_bandwidth_is_bytes_over_time_and_ring_bus_factor():
    bw = bandwidth(2e9, 0.5, 4)
    assert bw["algbw_gbps"] == pytest.approx(4.0)
    assert bw["busbw_gbps"] == pytest.approx(4.0 * 2 * 3 / 4)
    assert bandwidth(1e6, 0.1, 1) == {"algbw_gbps": None, "busbw_gbps": None}


def test_bench_config_resolves():
    from fedpft_dist.config import load_config

    cfg = load_config(REPO / "configs/bench/minilm.yaml")
    assert cfg.fed.rounds > cfg.bench.warmup_rounds
    assert cfg.dist.threads_per_rank == 1


def test_w1_bench_config_aligns_and_evaluates_every_round():
    from fedpft_dist.config import load_config

    cfg = load_config(REPO / "configs/bench/w1.yaml")
    f = cfg.fed
    assert f.align_every == 1 and f.eval_every == 1 and cfg.dist.threads_per_rank == 1
    assert (f.num_clients, round(f.num_clients * f.client_fraction), f.batch_size) == (20, 4, 8)
    assert (cfg.data.max_train, cfg.data.max_test, cfg.proxy.keep_ratio) == (4000, 1000, 0.25)
    assert cfg.distill.zero_stage < 3   # the alignment's teacher is the FM the ranks hold


@pytest.mark.slow
@pytest.mark.distributed
def test_bench_json_on_two_ranks(tmp_path, reuse_distilled):
    out = tmp_path / "b" / "bench.json"
    args = ["bench", "--config", CONFIG, f"run.dir={tmp_path / 'run'}", "dist.threads_per_rank=1", "distill.zero_stage=0",
            reuse_distilled,
            "fed.rounds=4", "fed.align_every=2", "fed.eval_every=4", "bench.warmup_rounds=1",
            "bench.allreduce_iters=5", "bench.stats_steps=2", f"bench.out={out}"]
    proc = run_ranks(args, 2, 300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "fedpft bench: fedpft on 2 rank(s)" in proc.stdout
    r = json.loads(out.read_text())
    for key in REQUIRED:
        assert key in r, key
    assert r["world_size"] == 2 and r["rounds_measured"] == 3
    assert len(r["tokens_per_s_per_rank"]) == 2 and min(r["tokens_per_s_per_rank"]) > 0
    assert len(r["peak_memory_mb_per_rank"]) == 2 and min(r["peak_memory_mb_per_rank"]) > 100
    assert r["rounds_plain"] == 1 and r["round_s_median_all"] >= r["round_s_median"] > 0
    assert r["train_round_s_median"] > 0
    assert r["allreduce_s"] > 0 and r["bare_allreduce_s"] > 0
    # The aggregation buffer is the adapter in float64 plus a few counters.
    assert r["aggregation_bytes"] > 1_000_000
    assert r["bare_allreduce_bandwidth"]["algbw_gbps"] > 0
    assert r["bare_allreduce_bandwidth"]["busbw_gbps"] == pytest.approx(
        r["bare_allreduce_bandwidth"]["algbw_gbps"])  # 2(W-1)/W = 1 for two ranks
    assert r["alignment_rounds"] == 1 and r["alignment_s"] > 0
    assert r["evaluation_rounds"] == 1 and r["evaluation_s"] > 0
    assert math.isfinite(r["stats_overhead"]) and r["stats_overhead"] > -0.5
    assert len(r["stats_step_s_per_rank"]) == 2
    assert len(r["per_round"]) == 4 and {"wait", "allreduce", "local_training"} <= set(r["per_round"][0])
    assert 1.0 <= r["load_imbalance_median"] < 3.0
    # every phase against its limit, measured in the same job
    lim = r["limits"]
    assert len(lim["local_training"]["bare_tokens_per_s_per_rank"]) == 2
    for phase in ("local_training", "evaluation", "alignment"):
        assert 0.1 < lim[phase]["ratio"] < 10, (phase, lim[phase])
    assert lim["alignment"]["bare_step_s"] > 0 and r["alignment_step_s"] > 0 and r["alignment_set_up_s"] > 0
    assert r["per_round"][1]["align_step_seconds"] == pytest.approx(r["alignment_step_s"], rel=0.5)
    assert set(r["startup_s"]) == {"task", "models", "public_text", "total"}
    assert r["startup_s"]["total"] >= r["startup_s"]["models"] > 0
    assert min(r["peak_memory_mb_per_rank_with_limits"]) >= min(r["peak_memory_mb_per_rank"])
    assert "time to first round" in proc.stdout and "of its limit" in proc.stdout
    # per client: 4 clients per round over the 3 measured rounds, fixed cost by part next to compute
    assert r["clients_measured"] == 12
    assert set(r["per_client_ms"]) == {"slice", "set_up", "compute", "collect", "accumulate", "fixed"}
    assert r["per_client_ms"]["compute"] > 0 and r["per_client_ms"]["fixed"] > 0


@pytest.mark.slow
def test_bench_on_one_rank_reports_no_bandwidth(tmp_path):
    proc = run_cli("bench", "--config", CONFIG, f"run.dir={tmp_path}", "dist.threads_per_rank=1",
                   "fed.method=fedpetuning", "fed.rounds=2", "bench.warmup_rounds=0",
                   "bench.allreduce_iters=2", "bench.stats_steps=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "bench.json").read_text())
    assert r["world_size"] == 1 and r["rounds_measured"] == 2
    # configs/tiny.yaml evaluates every round: no round only trains, the median is over all of them
    assert r["rounds_plain"] == 0 and r["round_s_median"] == r["round_s_median_all"]
    assert r["allreduce_bandwidth"] == {"algbw_gbps": None, "busbw_gbps": None}
    assert r["alignment_rounds"] == 0 and r["alignment_s"] is None
    assert r["limits"]["alignment"]["ratio"] is None and r["limits"]["evaluation"]["ratio"] > 0
    # fedpetuning has no compressed layers: the statistics hooks go on every FM layer
    assert r["stats_layers"] == 6


def test_bench_key_errors_name_the_key(tmp_path):
    proc = run_cli("bench", "--config", CONFIG, f"run.dir={tmp_path}", "bench.warmup=1")
    assert proc.returncode == 2
    assert "bench.warmup" in proc.stderr and "bench.warmup_rounds" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_many_clients_bench_at_a_small_size(tmp_path):
    """configs/bench/many-clients.yaml with 60 clients of 8 tweets, 15 per round."""
    proc = run_cli("bench", "--config", "configs/bench/many-clients.yaml", f"run.dir={tmp_path}",
                   "fed.num_clients=60", "data.max_train=480", "fed.client_fraction=0.25", "fed.rounds=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "bench.json").read_text())
    assert r["clients_per_round"] == 15 and r["clients_measured"] == 15
    ms = r["per_client_ms"]
    assert ms["fixed"] == pytest.approx(ms["slice"] + ms["set_up"] + ms["collect"] + ms["accumulate"])
    assert ms["compute"] > 0 and all(ms[k] >= 0 for k in ms)
    assert "per client                fixed" in proc.stdout

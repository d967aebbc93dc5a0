"""One tiny run of the whole pipeline, the end-to-end test of the fast tier (`make test-fast`):
configs/tiny.yaml on 1 rank builds the proxy, distils it at ZeRO-3, trains 2 federated rounds (round 1
aligns), evaluates the FM with the global adapter and measures gradient fidelity. The run is the
suite's shared one (conftest.tiny_run); tests/test_federation.py checks it in depth."""
from helpers import adapter, assert_plan_agrees, assert_trained, metrics, summary


def test_the_whole_pipeline_runs_on_one_rank(tiny_run):
    proxy = tiny_run / "proxy"
    assert (proxy / "fedpft_proxy.json").is_file() and (tiny_run / "proxy_distilled" / "config.json").is_file()
    s = summary(tiny_run)
    assert s["method"] == "fedpft" and s["world_size"] == 1 and s["rounds_done"] == 2
    assert s["alignment_rounds"] == 1 and s["excluded_clients"] == 0
    assert 0.0 <= s["final_accuracy"] <= 1.0 and 0 < s["final_grad_cosine"] <= 1
    assert s["client_params"] < s["fm_params"]
    rows = metrics(tiny_run)
    assert [r["round"] for r in rows] == [1, 2]
    assert "align_steps" in rows[0] and "align_steps" not in rows[1]
    assert all(r["all_updates_finite"] for r in rows)
    assert_trained(adapter(tiny_run))


def test_the_memory_plan_agrees_with_the_tiny_runs_peaks(tiny_run, tmp_path):
    """configs/tiny.yaml (all-MiniLM-L6-v2, an encoder with a classification head) on 1 rank with
    run.exact_memory: each round phase's peak resident set over the resident set that is not the
    models' tensors, against fedpft memory-plan's total for it, within 15 % (tests/test_causal_lm.py
    checks the same for SmolLM2)."""
    assert_plan_agrees(tiny_run, 1, tmp_path / "plan.json")

"""One tiny run of the whole pipeline, the end-to-end test of the fast tier (`make test-fast`):
configs/tiny.yaml on 1 rank builds the proxy, distils it at ZeRO-3, trains 2 federated rounds (round 1
aligns), evaluates the FM with the global adapter and measures gradient fidelity. The run is the
suite's shared one (conftest.tiny_run); tests/test_federation.py checks it in depth."""
from helpers import adapter, assert_trained, metrics, summary


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

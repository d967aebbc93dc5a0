"""`fedpft fidelity --trajectory`: a client model scored along the round adapters of the shared cheap
run (`fed.save_round_adapters`): the same figures on 1 and 2 ranks, bit for bit; a proxy that keeps
every neuron is the FM (cosine and transfer 1); a trajectory the client model cannot hold, or none,
is one error line."""
import json

import pytest

from conftest import run_cli, run_ranks
from helpers import one_line_error, tail

SCORE = ("fidelity", "--config", "configs/tiny.yaml", "dist.threads_per_rank=1",
         "fed.method=fedpft_no_layer_distill", "fed.fidelity_examples=16")


def _score(cheap_run, out, *overrides, ranks=1):
    args = [*SCORE, f"run.dir={out}", "--trajectory", str(cheap_run / "round_adapters"), *overrides]
    proc = run_cli(*args) if ranks == 1 else run_ranks(args, ranks, 300)
    assert proc.returncode == 0, tail(proc)
    return json.loads((out / "trajectory_fidelity.json").read_text()), proc


def _figures(result: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in result["rounds"]]


@pytest.mark.slow
@pytest.mark.distributed
def test_scores_along_a_trajectory_are_the_same_on_one_and_two_ranks(cheap_run, tmp_path):
    one, proc = _score(cheap_run, tmp_path / "rank1")
    assert [r["round"] for r in one["rounds"]] == [1, 2, 3]
    for r in one["rounds"]:
        assert r["grad_cosine_low"] <= r["grad_cosine"] <= r["grad_cosine_high"] and r["grad_norm_ratio"] > 0
        assert r["transfer"] is not None and r["transfer_steps"] == 2 and r["grad_probe_examples"] == 16
        assert r["tensors_from_trajectory"] == r["client_tensors"]   # the trajectory's own method
    assert one["mean_grad_cosine"] == pytest.approx(sum(r["grad_cosine"] for r in one["rounds"]) / 3)
    # the common layers: an Offsite-Tuning emulator's adapter layers (fed.fedot_adapter_layers 2+2 of 6)
    assert one["common_layers"] == [0, 1, 4, 5] and one["build_seconds"] > 0
    assert "mean over 3 adapters" in proc.stdout and "cost:" in proc.stdout
    two, _ = _score(cheap_run, tmp_path / "rank2", ranks=2)
    assert two["world_size"] == 2
    assert _figures(two) == _figures(one)


@pytest.mark.slow
def test_a_proxy_keeping_every_neuron_scores_as_the_fm(cheap_run, tmp_path):
    same, _ = _score(cheap_run, tmp_path / "whole", "proxy.keep_ratio=1.0", "fed.fidelity_transfer_steps=2")
    for r in same["rounds"]:
        # the same function with its FFN neurons reordered: equal up to float summation order
        assert r["grad_cosine"] == pytest.approx(1.0, abs=1e-5) and r["grad_norm_ratio"] == pytest.approx(1.0, abs=1e-4)
        assert r["transfer"] == pytest.approx(1.0, abs=1e-3)


def test_a_trajectory_the_client_model_cannot_hold_is_one_error_line(cheap_run, tmp_path):
    args = [*SCORE, f"run.dir={tmp_path / 'r'}", "--trajectory"]
    line = one_line_error(run_cli(*args, str(cheap_run / "round_adapters"), "fed.lora_r=4"))
    assert "fed.lora_r" in line and "round 1" in line
    line = one_line_error(run_cli(*args, str(tmp_path)))
    assert "no round adapters" in line and "fed.save_round_adapters=true" in line

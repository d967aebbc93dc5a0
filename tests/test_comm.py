"""The communicator on 2 gloo ranks: weighted sums (with a zero-weight rank), mixed dtypes, broadcast."""
import json

import pytest
import torch

from fedpft_dist.runtime import spawn_local

from dist_workers import comm_suite

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("comm")
    spawn_local(comm_suite, 2, args=(str(out),))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_weighted_sum_matches_hand_computation(results):
    # rank 0: weight 3 * arange(6); rank 1: weight 0 -> contributes zeros.
    expected_theta = (3.0 * torch.arange(6, dtype=torch.float32).reshape(2, 3)).tolist()
    for r in results:
        assert r["world_size"] == 2 and r["backend"] == "gloo"
        assert r["theta"] == expected_theta
        assert r["bias"] == [3.0 * 0.5 + 0.0] * 5
        assert r["count"] == [3]


def test_mixed_dtypes_keep_their_dtype(results):
    for r in results:
        assert r["theta_dtype"] == "torch.float32"
        assert r["bias_dtype"] == "torch.float64"
        assert r["count_dtype"] == "torch.int64"
        assert r["half_dtype"] == "torch.bfloat16"
        assert r["hits"] == [[3, 30]]
        assert r["half"] == [3.0, 3.0, 3.0]


def test_broadcast_state(results):
    expected = torch.randn(4, 3, generator=torch.Generator().manual_seed(11)).tolist()
    for r in results:
        assert r["bcast_w"] == expected
        assert r["bcast_step"] == [7]


def test_metrics_and_agreement(results):
    for r in results:
        assert r["metrics_sum"] == {"loss": 4.5, "n": 1.0}
        assert r["metrics_max"] == {"t": 3.0}
        assert r["agree_min"] is False   # only rank 0 said yes
        assert r["agree_max"] is True
        assert r["bool_rejected"] is True


def test_single_process_collectives_are_identities():
    from fedpft_dist.runtime import Communicator

    comm = Communicator(0, 1, torch.device("cpu"), timeout_s=5)
    x = {"a": torch.ones(2, 2), "n": torch.tensor([4])}
    out = comm.all_reduce_sum(x)
    assert torch.equal(out["a"], x["a"]) and torch.equal(out["n"], x["n"])
    assert comm.all_reduce_metrics({"m": 2.0}) == {"m": 2.0}
    assert comm.agree(True) is True
    assert torch.equal(comm.broadcast_state({"w": torch.arange(3)})["w"], torch.arange(3))


def test_await_completion_polls_until_done_and_names_a_timeout():
    # a collective that NCCL has queued but the device never completes: the wait ends at the timeout
    from fedpft_dist.runtime.comm import await_completion

    now = [0.0]
    pauses = []

    def sleep(s):
        pauses.append(s)
        now[0] += s

    with pytest.raises(RuntimeError, match="not complete on the device after 0.5 s"):
        await_completion(lambda: False, 0.5, sleep=sleep, clock=lambda: now[0])
    assert 0.5 < now[0] < 0.52                    # it gave up within one pause of the timeout
    assert pauses[0] == 5e-5 and max(pauses) == 0.01 and pauses == sorted(pauses)
    polls = iter([False, False, True])
    pauses.clear()
    await_completion(lambda: next(polls), 10.0, sleep=sleep, clock=lambda: now[0])
    assert pauses == [5e-5, 1e-4]                 # done on the third poll: two pauses

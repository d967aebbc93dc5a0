"""Client groups (dist.ranks_per_client): a client's batch split over the ranks of its group gives
the update one rank computes alone, for classification, causal LM and FedProx, with the model whole
on every rank or sharded over the group (fed.client_sharding=fsdp); groups' own collectives stay
inside the group. The end-to-end runs of configs/tiny.yaml are in test_federation.py."""
import json

import pytest
import torch
from safetensors.torch import load_file

from fedpft_dist.errors import UserError
from fedpft_dist.runtime import init_runtime, spawn_local

from dist_workers import client_groups_suite, toy_train

pytestmark = pytest.mark.distributed

CASES = (("classify", 0.0, False), ("causal", 0.0, False), ("classify", 5.0, False),
         ("classify", 0.0, True), ("causal", 5.0, True))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("groups")
    spawn_local(client_groups_suite, 4, args=(str(out),))
    return [(json.loads((out / f"rank{r}.json").read_text()), load_file(str(out / f"rank{r}.safetensors")))
            for r in range(4)]


def test_the_ranks_form_consecutive_groups_with_their_own_collectives(four_ranks):
    infos = [info for info, _ in four_ranks]
    assert [(i["group"], i["group_rank"], i["leader"]) for i in infos] == \
        [(0, 0, True), (0, 1, False), (1, 0, True), (1, 1, False)]
    assert all(i["count"] == 2 for i in infos)
    # sums of rank + 1 inside each group: 1 + 2 and 3 + 4; the broadcast comes from each group's leader
    assert [i["group_sum"] for i in infos] == [3.0, 3.0, 7.0, 7.0]
    assert [i["group_broadcast"] for i in infos] == [0.0, 0.0, 20.0, 20.0]


@pytest.mark.parametrize("kind,mu,shard", CASES)
def test_a_split_batch_gives_the_single_rank_update(four_ranks, kind, mu, shard):
    """Each group's two ranks split every batch (sharded over the two with FSDP2, or whole on each)."""
    tag = f"{kind}-{mu:g}" + ("-fsdp" if shard else "")
    for client in (0, 1):
        alone = toy_train(kind, client, prox_mu=mu)
        (info_a, a), (info_b, b) = four_ranks[2 * client], four_ranks[2 * client + 1]
        for k, v in alone.adapter.items():
            # both ranks of the group hold the same adapter, and it is the one a single rank computes
            assert torch.equal(a[f"{tag}/{k}"], b[f"{tag}/{k}"]), k
            assert (a[f"{tag}/{k}"] - v).abs().max().item() <= 1e-6, (k, client)
        assert not torch.equal(a[f"{tag}/emb.weight"], toy_train(kind, 1 - client, prox_mu=mu).adapter["emb.weight"])
        ia, ib = info_a[tag], info_b[tag]
        # the ranks' loss shares add up to the client's loss sum; counts and steps are the whole batch's
        assert ia["loss_sum"] + ib["loss_sum"] == pytest.approx(alone.loss_sum, rel=1e-6)
        assert 0 < ib["loss_sum"] < alone.loss_sum
        assert ia["loss_count"] == ib["loss_count"] == alone.loss_count
        assert ia["steps"] == ib["steps"] == alone.steps == 8      # 2 epochs of ceil(13 / 4) batches
        assert ia["tokens"] + ib["tokens"] == alone.tokens
        if shard:
            # each rank holds its half of every parameter
            whole = sum(v.numel() * v.element_size() for v in alone.adapter.values())
            assert info_a[f"{tag}/local_bytes"] + info_b[f"{tag}/local_bytes"] == whole
            assert abs(info_a[f"{tag}/local_bytes"] - whole / 2) <= whole * 0.05


def test_a_group_size_that_does_not_divide_the_world_is_one_user_error():
    rt = init_runtime(timeout_s=30, threads_per_rank=1, env={})
    try:
        assert rt.client_groups(1).count == 1
        with pytest.raises(UserError, match=r"dist.ranks_per_client: 2 does not divide the world size 1"):
            rt.client_groups(2)
    finally:
        rt.shutdown()

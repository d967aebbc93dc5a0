"""The parts of a round: methods and aggregators by name, the round state and its checkpoints, the
run layout."""
import json
import typing

import pytest
import torch

from fedpft_dist.config import FedConfig, load_config
from fedpft_dist.errors import ConfigError, UserError
from fedpft_dist.federation.aggregation import AGGREGATORS, make_aggregator
from fedpft_dist.federation.client import ClientUpdate
from fedpft_dist.federation.methods import METHODS, get_method
from fedpft_dist.federation.state import Checkpointer, RoundState
from fedpft_dist.run_layout import RunLayout
from fedpft_dist.runtime import Communicator, spawn_local

from dist_workers import aggregation_suite, fake_client_adapter


# ----------------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------------

def test_every_configurable_method_is_registered():
    allowed = typing.get_args(typing.get_type_hints(FedConfig)["method"])
    assert set(METHODS) == set(allowed)


def test_methods_say_what_the_clients_hold():
    assert not get_method("fedpetuning").uses_proxy and not get_method("fedpetuning").aligns
    for name in ("fedpft", "fedpft_no_layer_distill"):
        m = get_method(name)
        assert m.uses_proxy and m.aligns and m.tune_compressed and m.to_fm is None
    assert get_method("fedpft_no_neuron_distill").uses_proxy and not get_method("fedpft_no_neuron_distill").aligns
    fedot = get_method("fedot")
    assert fedot.uses_proxy and not fedot.aligns and not fedot.tune_compressed and fedot.to_fm is not None
    # the emulator's layer 1 is FM layer 2: its adapter is renamed onto the FM
    renamed = fedot.to_fm({"base_model.model.encoder.layer.1.attention.q.lora_A.weight": 1}, [0, 2, 5], "layer")
    assert list(renamed) == ["base_model.model.encoder.layer.2.attention.q.lora_A.weight"]


def test_unknown_method_names_the_key():
    with pytest.raises(ConfigError, match="fed.method: 'fedfoo' is not available"):
        get_method("fedfoo")


# ----------------------------------------------------------------------------------------------------
# Aggregators
# ----------------------------------------------------------------------------------------------------

def _one_process(aggregation: str, clients: list[int]):
    agg = make_aggregator(aggregation, fake_client_adapter(0))
    for c in clients:
        upd = ClientUpdate(fake_client_adapter(c), num_samples=c + 1, loss_sum=0.0, steps=1, tokens=0)
        agg.accumulate(upd.adapter, agg.weight(upd))
    return agg.reduce(Communicator(0, 1, torch.device("cpu"), timeout_s=5))


@pytest.mark.parametrize("aggregation", sorted(AGGREGATORS))
def test_aggregator_mean_by_hand(aggregation):
    red = _one_process(aggregation, [0, 1, 2, 4])
    w = {0: 1.0, 1: 2.0, 2: 3.0} if aggregation == "weighted" else {0: 1.0, 1: 1.0, 2: 1.0}
    for k in red.mean:
        expected = sum(w[c] * fake_client_adapter(c)[k].double() for c in w) / sum(w.values())
        assert torch.allclose(red.mean[k].double(), expected, atol=1e-7), k
        assert red.mean[k].dtype == torch.float32
    assert red.excluded == 1 and red.all_finite is False and red.total_weight == sum(w.values())


def test_no_counted_update_leaves_no_mean():
    red = _one_process("weighted", [4])
    assert red.mean is None and red.excluded == 1 and red.total_weight == 0


def test_unknown_aggregator_names_the_key():
    with pytest.raises(ConfigError, match="fed.aggregation"):
        make_aggregator("median", {})


@pytest.mark.distributed
@pytest.mark.parametrize("aggregation,split", [("weighted", [[0, 2], [1, 3, 4]]), ("uniform", [[0, 1, 2, 3, 4], []])])
def test_two_ranks_reduce_to_the_one_process_mean(tmp_path, aggregation, split):
    spawn_local(aggregation_suite, 2, args=(str(tmp_path), aggregation, split))
    one = _one_process(aggregation, [0, 1, 2, 3, 4])
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        for k, v in one.mean.items():
            assert torch.equal(torch.tensor(got["mean"][k], dtype=v.dtype), v), (r, k)
        assert got["excluded"] == 1 and got["all_finite"] is False
        assert got["rider"] == [3.0]              # 1 + 2: the extra tensors ride in the same all-reduce
        # float64 sums of the adapter, weight and excluded count, and the rider
        assert got["bytes"] == 8 * (6 + 4 + 2 + 1)


# ----------------------------------------------------------------------------------------------------
# Round state and checkpoints
# ----------------------------------------------------------------------------------------------------

def test_round_state_round_trips_through_a_checkpoint(tmp_path):
    ident = {"method": "fedpft", "seed": 3}
    ck = Checkpointer(tmp_path, every=2, identity=ident)
    state = RoundState({"w": torch.arange(4.0)}, round=4, best=0.5, initial_eval={"initial_accuracy": 0.3},
                       alignment_rounds=1, ffn_bytes_per_alignment=96, excluded_clients=2)
    # the aligned FFN tensors are the client model's, read when the checkpoint is written
    ck.save(state, world_size=2, proxy_ffn={"encoder.layer.1.intermediate.dense.weight": torch.ones(2, 2)})
    back = ck.load_latest()
    assert back.counters() == state.counters()
    assert torch.equal(back.global_adapter["w"], state.global_adapter["w"])
    assert torch.equal(back.proxy_ffn["encoder.layer.1.intermediate.dense.weight"], torch.ones(2, 2))
    # a state without aligned FFN weights saves none
    ck.save(RoundState({"w": torch.zeros(4)}, round=6), world_size=2)
    assert ck.load_latest().proxy_ffn is None and ck.load_latest().round == 6


def test_resume_refuses_another_runs_checkpoint(tmp_path):
    ident = {"method": "fedpft", "seed": 0}
    Checkpointer(tmp_path, 1, ident, {"fed.method": "fedpft", "run.seed": 0}).save(
        RoundState({"w": torch.zeros(1)}, round=1), 1)
    with pytest.raises(UserError, match=r"fed.resume: .* was written with run.seed=0, this config has 1"):
        Checkpointer(tmp_path, 1, ident, {"fed.method": "fedpft", "run.seed": 1}).load_latest()


def test_checkpoints_are_due_every_n_rounds_before_the_last_and_at_a_stop(tmp_path):
    ck = Checkpointer(tmp_path, every=2, identity={})
    assert [d for d in range(1, 7) if ck.due(d, 6, stopping=False)] == [2, 4]
    assert ck.due(3, 6, stopping=True)
    assert not any(Checkpointer(tmp_path, 0, {}).due(d, 6, False) for d in range(1, 7))


# ----------------------------------------------------------------------------------------------------
# Run layout
# ----------------------------------------------------------------------------------------------------

def test_run_layout_defaults_live_in_the_run_dir(tmp_path):
    lay = RunLayout.from_config(load_config(None, [f"run.dir={tmp_path}"]))
    assert lay.proxy == tmp_path / "proxy" and lay.distill_source == lay.proxy and not lay.source_given
    assert lay.distilled == tmp_path / "proxy_distilled" and lay.emulator == tmp_path / "emulator"
    assert lay.round_checkpoints == tmp_path / "checkpoints" / "rounds"
    assert lay.bench == tmp_path / "bench.json" and lay.metrics == tmp_path / "metrics.jsonl"


def test_distillation_reads_the_proxy_where_proxy_out_put_it(tmp_path):
    lay = RunLayout.from_config(load_config(None, [f"run.dir={tmp_path}/run", f"proxy.out={tmp_path}/p"]))
    assert lay.proxy == tmp_path / "p" and lay.distill_source == tmp_path / "p"
    lay = RunLayout.from_config(load_config(None, [f"run.dir={tmp_path}/run", f"proxy.out={tmp_path}/p",
                                                   f"distill.proxy={tmp_path}/q", f"distill.out={tmp_path}/d"]))
    assert lay.distill_source == tmp_path / "q" and lay.source_given and lay.distilled == tmp_path / "d"

"""The FM held sharded (fedpft_dist.models.sharded): built on the meta device, LoRA attached there,
sharded per layer with FSDP2 over 4 gloo ranks and each rank's shard read from the files; a rank
holds a quarter of the weights, its host memory during the load stays at its shard plus a layer,
and the sharded model computes what the whole one does, plug-in evaluation included."""
import json
import math
import shutil

import pytest

from fedpft_dist.models.loading import resolve_model_dir
from fedpft_dist.runtime import spawn_local

from dist_workers import sharded_fm_suite
from helpers import adapter, max_abs_diff, summary, train

pytestmark = pytest.mark.distributed

# LLaMA-shaped, small width: embeddings of SmolLM2's vocabulary (75 MB in fp32) and 4 layers of 6.5 MB
SHAPE = {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 6,
         "num_key_value_heads": 2}


def spec_dir(spec, shape: dict):
    """A directory for ``model.path: random:DIR``: SmolLM2's config at ``shape``, and its tokenizer."""
    spec.mkdir(parents=True, exist_ok=True)
    source = resolve_model_dir("smollm2")
    config = {**json.loads((source / "config.json").read_text()), **shape}
    config.pop("head_dim", None)
    (spec / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, spec / name)
    return spec


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return spec_dir(tmp_path_factory.mktemp("spec"), SHAPE)


@pytest.fixture(scope="module")
def four_ranks(spec, tmp_path_factory):
    model_dir = resolve_model_dir(f"random:{spec}")
    out = tmp_path_factory.mktemp("sharded")
    spawn_local(sharded_fm_suite, 4, args=(str(out), str(model_dir)))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]


def test_each_rank_holds_a_quarter_of_the_model(four_ranks):
    whole = four_ranks[0]["whole"]
    assert sum(r["held"] for r in four_ranks) == whole
    for r in four_ranks:
        # torch.chunk rows: a rank holds at most a ceil(n / 4) row block of every tensor
        assert abs(r["held"] - whole / 4) <= 0.02 * whole, r["held"]
        assert r["read"] <= r["held"]
        # what the files do not hold, the LoRA tensors and the new classifier head (its two copies),
        # keeps its initial values; nothing is left at zero
        assert r["initialised"] and all(".lora_" in n or ".score." in n for n in r["initialised"])
        assert r["zeroed"] == []


def test_a_sharded_model_starts_where_the_whole_one_does(four_ranks):
    """The same seed: the new head and the LoRA tensors hold what loading the whole model draws."""
    for r in four_ranks:
        assert r["initial_nonzero"] > 0 and r["initial_diff"] == 0.0


def test_a_rank_loads_with_its_shard_plus_a_layer_of_host_memory(four_ranks):
    for r in four_ranks:
        # 16 MB for what Python and the modules' objects take; the whole model is about 100 MB
        assert r["grown"] <= r["held"] + r["layer"] + (16 << 20), (r["grown"] >> 20, r["held"] >> 20)
        assert r["grown"] < r["whole"] / 2


def test_the_sharded_model_computes_what_the_whole_one_does(four_ranks):
    for r in four_ranks:
        assert r["adapter_back"] == 0.0
        assert r["logits_diff"] <= 1e-5


def test_plug_in_evaluation_over_the_sharded_model_is_the_whole_models(four_ranks):
    """7 test rows over 4 ranks in batches of 2: a rank with fewer batches joins the others' forward
    passes with stand-ins; the metrics are those of the whole model, on every rank."""
    for r in four_ranks:
        for kind in ("classify", "causal"):
            sharded, whole = r[kind]
            assert sharded == pytest.approx(whole, rel=1e-6), kind
        assert r["classify"][0]["test_examples"] == 7 and r["causal"][0]["test_tokens"] == 48 - 7


def test_the_fidelity_monitor_takes_the_fm_side_from_the_sharded_model(four_ranks):
    """The sharded FM against the whole model as the client: every probe example's adapter gradient
    is the same (the sharded side runs each example with all 4 ranks)."""
    for r in four_ranks:
        f = r["fidelity"]
        assert f["grad_probe_examples"] == 7
        assert f["grad_cosine"] == pytest.approx(1.0, abs=1e-6) and f["grad_rel_error"] <= 1e-5


# configs/smollm2-tiny.yaml on the LLaMA-shaped model, 4 ranks, every client in the one round. LoRA
# dropout off: the FM's own local steps of the update transfer split each batch over the ranks, whose
# dropout masks are not the ones one rank draws for the whole batch.
COMMON = ("distill.batch_size=4", "fed.client_fraction=1.0", "fed.lora_dropout=0", "fed.rounds=1",
          "fed.fidelity_every=1")
# with client groups of 2, each group's client model sharded over its ranks too
GROUPS_OF_2 = ("dist.ranks_per_client=2", "fed.client_sharding=fsdp")


def tiny(run_dir, spec, *overrides):
    train(run_dir, f"model.path=random:{spec}", *COMMON, *overrides, ranks=4, config="configs/smollm2-tiny.yaml",
          timeout=600)
    return run_dir


@pytest.fixture(scope="module")
def plain_fedpft(spec, tmp_path_factory):
    return tiny(tmp_path_factory.mktemp("plain") / "run", spec)


def assert_same_run(a_dir, b_dir, keys):
    assert max_abs_diff(adapter(a_dir), adapter(b_dir)) <= 1e-5
    a, b = summary(a_dir), summary(b_dir)
    for key in keys:
        assert a[key] is not None and b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("groups", [(), GROUPS_OF_2], ids=["one-client-per-rank", "client-groups-of-2"])
def test_fedpft_with_the_fm_sharded_gives_the_unsharded_run(spec, plain_fedpft, tmp_path, groups):
    """With model.fm_sharding=fsdp (the FM of evaluation, the fidelity monitor, its update transfer
    and the distillation's fidelity report sharded over the 4 ranks) the global adapter, the
    perplexities and the gradient fidelity are the unsharded run's, with one client per rank and
    with client groups of 2."""
    sharded = tiny(tmp_path / "sharded", spec, "model.fm_sharding=fsdp", f"distill.proxy={plain_fedpft / 'proxy'}",
                   *groups)
    assert_same_run(plain_fedpft, sharded, ("initial_perplexity", "final_perplexity", "final_next_token_accuracy",
                                            "final_grad_cosine", "final_transfer"))
    before = json.loads((plain_fedpft / "distill.json").read_text())["fidelity_after"]["grad_cosine"]
    after = json.loads((sharded / "distill.json").read_text())["fidelity_after"]["grad_cosine"]
    assert after == pytest.approx(before, rel=1e-5)


@pytest.mark.slow
def test_fedpetuning_trains_the_fm_sharded_over_its_client_groups(spec, tmp_path):
    """FedPETuning's clients train the FM itself: sharded, each client group of 2 holds it over its
    ranks (a quarter of the model would need the whole world for every client) and trains one client
    at a time; the global adapter and the perplexities are those of the FM held whole."""
    plain = tiny(tmp_path / "plain", spec, "fed.method=fedpetuning")
    sharded = tiny(tmp_path / "sharded", spec, "fed.method=fedpetuning", "model.fm_sharding=fsdp", *GROUPS_OF_2)
    assert_same_run(plain, sharded, ("initial_perplexity", "final_perplexity", "final_next_token_accuracy"))


# 70B's depth and structure (LLaMA-3-70B: 80 layers, 64 query heads over 8 KV heads, FFN 3.5x the
# width) at a width of 64
DEPTH_80 = {"hidden_size": 64, "intermediate_size": 224, "num_hidden_layers": 80, "num_attention_heads": 8,
            "num_key_value_heads": 1}


@pytest.mark.slow
def test_an_80_layer_decoder_runs_a_round_sharded_end_to_end(tmp_path):
    """The proxy built a layer at a time, a round of FedPFT's client training with the fidelity
    monitor, and plug-in evaluation, on an 80-layer LLaMA-shaped model held sharded over 4 ranks:
    each rank holds a quarter of the FM."""
    spec80 = spec_dir(tmp_path / "spec", DEPTH_80)
    # the update transfer's FM steps over the sharded FM, and the ZeRO-3 distillation beside the
    # sharded FM (a minute of per-module gathers at this depth on 2 cores), run on the shallow model above
    run = tiny(tmp_path / "run", spec80, "model.fm_sharding=fsdp", "fed.fidelity_transfer_steps=0",
               "fed.method=fedpft_no_layer_distill")
    s = summary(run)
    assert s["rounds_done"] == 1 and s["fm_sharding"] == "fsdp"
    for key in ("initial_perplexity", "final_perplexity", "final_grad_cosine"):
        assert s[key] is not None and math.isfinite(s[key]), key
    # a quarter of the FM's fp32 parameters with the adapter on it, and LoRA on the FFNs of layers 0
    # and 79 (the proxy's retained layers)
    quarter = 4 * (s["fm_params"] + s["trainable_params"]) / 4
    assert abs(s["fm_bytes_per_rank"] - quarter) <= 0.01 * quarter, (s["fm_bytes_per_rank"], quarter)
    names = adapter(run)
    assert any(".layers.79.mlp." in k for k in names) and any(".layers.0.mlp." in k for k in names)


def test_a_sharded_fm_is_refused_where_it_cannot_serve():
    from types import SimpleNamespace

    from fedpft_dist.config import load_config
    from fedpft_dist.errors import ConfigError
    from fedpft_dist.federation.build import check_fm_sharding
    from fedpft_dist.federation.methods import get_method

    cfg = load_config("configs/smollm2-tiny.yaml", ["model.fm_sharding=fsdp"])
    two = SimpleNamespace(world_size=2)
    check_fm_sharding(cfg, two, get_method("fedpft"), None)
    with pytest.raises(ConfigError, match="model.fm_sharding: 'fsdp' shards the FM over the ranks: run on 2 or more"):
        check_fm_sharding(cfg, SimpleNamespace(world_size=1), get_method("fedpft"), None)
    petuning = load_config("configs/smollm2-tiny.yaml", ["model.fm_sharding=fsdp", "fed.method=fedpetuning"])
    for groups in (None, SimpleNamespace(size=2)):   # no groups; groups whose client model is not sharded
        with pytest.raises(ConfigError, match="model.fm_sharding: fed.method=fedpetuning trains the FM itself at the "
                                              "clients, so each client group holds it sharded"):
            check_fm_sharding(petuning, two, get_method("fedpetuning"), groups)
    petuning = load_config("configs/smollm2-tiny.yaml", ["model.fm_sharding=fsdp", "fed.method=fedpetuning",
                                                         "fed.client_sharding=fsdp"])
    check_fm_sharding(petuning, two, get_method("fedpetuning"), SimpleNamespace(size=2))
    with pytest.raises(ConfigError, match="distill.zero_stage: with model.fm_sharding=fsdp"):
        check_fm_sharding(load_config("configs/smollm2-tiny.yaml", ["model.fm_sharding=fsdp", "distill.zero_stage=0"]),
                          two, get_method("fedpft"), None)

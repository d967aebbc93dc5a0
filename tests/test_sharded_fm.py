"""The FM held sharded (fedpft_dist.models.sharded): built on the meta device, LoRA attached there,
sharded per layer with FSDP2 over 4 gloo ranks and each rank's shard read from the files; a rank
holds a quarter of the weights, its host memory during the load stays at its shard plus a layer,
and the sharded model computes what the whole one does, plug-in evaluation included."""
import json
import shutil

import pytest

from fedpft_dist.models.loading import resolve_model_dir
from fedpft_dist.runtime import spawn_local

from dist_workers import sharded_fm_suite

pytestmark = pytest.mark.distributed

# LLaMA-shaped, small width: embeddings of SmolLM2's vocabulary (75 MB in fp32) and 4 layers of 6.5 MB
SHAPE = {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 6,
         "num_key_value_heads": 2}


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    spec = tmp_path_factory.mktemp("spec")
    source = resolve_model_dir("smollm2")
    config = {**json.loads((source / "config.json").read_text()), **SHAPE}
    config.pop("head_dim", None)
    (spec / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, spec / name)
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
        # what the files do not hold: the LoRA tensors and the new classifier head (its two copies)
        assert all(".lora_" in n or ".score." in n for n in r["zeroed"])


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

"""FedOT's emulator: layer choice, weights copied from the right FM layers, adapters renamed onto the FM."""
import json

import pytest
import torch

from conftest import run_cli
from fedpft_dist.errors import ConfigError
from fedpft_dist.models.emulator import adapter_to_fm, build_emulator, emulator_layers


def test_emulator_layers_drop_every_other_middle_layer():
    assert emulator_layers(6, 1, 1) == [0, 1, 3, 5]
    assert emulator_layers(12, 2, 2) == [0, 1, 2, 4, 6, 8, 10, 11]
    assert emulator_layers(3, 1, 1) == [0, 1, 2]
    with pytest.raises(ConfigError, match="fed.fedot_adapter_layers"):
        emulator_layers(4, 2, 2)


def _fm():
    import transformers as tf

    torch.manual_seed(0)
    return tf.BertForSequenceClassification(tf.BertConfig(hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                                                          intermediate_size=48, vocab_size=101, num_labels=3))


def test_build_emulator_copies_the_kept_layers():
    fm = _fm().eval()
    kept = emulator_layers(6, 1, 1)
    emu = build_emulator(fm, kept)
    assert emu.config.num_hidden_layers == 4 and fm.config.num_hidden_layers == 6
    for j, l in enumerate(kept):
        assert torch.equal(emu.bert.encoder.layer[j].intermediate.dense.weight,
                           fm.bert.encoder.layer[l].intermediate.dense.weight)
    assert torch.equal(emu.classifier.weight, fm.classifier.weight)


def test_adapter_renamed_onto_fm_layers():
    a = {"base_model.model.bert.encoder.layer.2.attention.self.query.lora_A.weight": torch.ones(1),
         "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight": torch.zeros(1),
         "base_model.model.classifier.weight": torch.ones(2)}
    out = adapter_to_fm(a, [0, 1, 3, 5], "bert.encoder.layer")
    assert set(out) == {"base_model.model.bert.encoder.layer.3.attention.self.query.lora_A.weight",
                        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight",
                        "base_model.model.classifier.weight"}


@pytest.mark.slow
def test_fedot_runs_through_the_engine_and_one_rank_equals_two(tmp_path):
    """configs/tiny.yaml with fed.method=fedot (Offsite-Tuning's adapter: 2+2 layers trained in full, the
    emulator sized to the proxy) on 1 and on 2 ranks: the same emulator, the same global adapter."""
    from conftest import run_ranks
    from helpers import adapter as read_adapter, max_abs_diff

    args = ("train", "--config", "configs/tiny.yaml", "fed.method=fedot", "fed.rounds=1")
    proc = run_cli(*args, f"run.dir={tmp_path / 'one'}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_ranks([*args, f"run.dir={tmp_path / 'two'}"], 2, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "one"
    emu = json.loads((run / "emulator.json").read_text())
    # MiniLM (6 layers, 22.7M parameters), proxy.keep_ratio 0.25: the proxy has 19.2M, an emulator
    # with one middle layer 20.9M (with two, the FM itself): FM layers 0, 1 | 2 (standing for 2-3) | 4, 5
    assert emu["layer_map"] == [0, 1, 2, 4, 5] and emu["compressed_layers"] == [2]
    assert emu["target_layers"] == [0, 1, 3, 4, 5] and emu["middle_layers"] == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "fedot" and summary["alignment_rounds"] == 0 and summary["full_tuning"]
    distill = json.loads((run / "distill.json").read_text())
    # the middle layer trains whole (attention and FFN), as Offsite-Tuning's emulator does
    assert distill["trainable_params"] > 2 * 1536 * 384
    one = read_adapter(run)
    # the clients tune the emulator's bottom and top layers in full (FM layers 0, 1, 4, 5), no LoRA;
    # its middle layer stays frozen and puts nothing into the FM
    assert {k.split("layer.")[1].split(".")[0] for k in one if ".layer." in k} == {"0", "1", "4", "5"}
    assert not any(".lora_" in k for k in one)
    assert summary["trainable_params"] == sum(v.numel() for v in one.values()) > 4 * 1536 * 384 * 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # the plug-in gap: the adapter on the emulator, beside the FM; gradient fidelity is not measured
    # for whole layers
    assert all(0 <= r["emulator_accuracy"] <= 1 and 0 <= r["accuracy"] <= 1 and "grad_cosine" not in r for r in rows)
    assert summary["final_emulator_accuracy"] == rows[-1]["emulator_accuracy"]
    assert max_abs_diff(one, read_adapter(tmp_path / "two")) <= 1e-5


def test_each_emulator_layer_imitates_the_output_of_the_block_it_replaces():
    from fedpft_dist.models.emulator import emulator_targets
    from fedpft_dist.models.proxy import hidden_state_errors

    kept = emulator_layers(6, 1, 1)
    assert kept == [0, 1, 3, 5]
    # layer 1 stands for FM layers 1-2, layer 2 for 3-4: their targets are the outputs of layers 2 and 4
    assert emulator_targets(kept, 6) == [0, 2, 4, 5]
    assert emulator_targets([0, 1, 2, 3], 4) == [0, 1, 2, 3]
    fm = _fm().eval()
    emu = build_emulator(fm, kept)
    chunks = torch.randint(1, 101, (3, 9), generator=torch.Generator().manual_seed(0))
    against_block = hidden_state_errors(fm, emu, chunks, 3, emulator_targets(kept, 6))
    against_kept_layer = hidden_state_errors(fm, emu, chunks, 3, kept)
    # emulator layer 1 is FM layer 1 itself: compared with FM layer 1's output it is exact, which is why
    # a target of "the kept layer" gives nothing to learn; the block's output is what it must become
    assert against_kept_layer[1] == 0.0 and against_block[1] > 0.0
    assert against_block[0] == 0.0


# ----------------------------------------------------------------------------------------------------
# Offsite-Tuning's layout: adapter layers, emulator size, full tuning, the distillation loss
# ----------------------------------------------------------------------------------------------------

def test_adapter_layers_and_targets_of_a_6_and_a_30_layer_fm():
    from fedpft_dist.alignment.stages import layer_level_run
    from fedpft_dist.config import load_config, parse_adapter_layers
    from fedpft_dist.models.emulator import emulator_targets
    from fedpft_dist.run_layout import RunLayout

    assert parse_adapter_layers("2+2") == (2, 2) and parse_adapter_layers("1+0") == (1, 0)
    for bad in ("2", "2+x", "-1+2", "0+0", "2+2+2"):
        with pytest.raises(ConfigError, match="fed.fedot_adapter_layers"):
            parse_adapter_layers(bad)
    with pytest.raises(ConfigError, match="fed.fedot_adapter_layers"):
        load_config("configs/tiny.yaml", ["fed.fedot_adapter_layers=2"])
    # 6 layers, 2+2: one middle block of FM layers 2-3, kept as FM layer 2, imitating FM layer 3's output
    kept = emulator_layers(6, 2, 2, 1)
    assert kept == [0, 1, 2, 4, 5] and emulator_targets(kept, 6) == [0, 1, 3, 4, 5]
    assert emulator_layers(6, 2, 2, 2) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ConfigError, match="fed.fedot_middle_layers"):
        emulator_layers(6, 2, 2, 3)
    # 30 layers, 2+2, 9 of the 26 middle layers: blocks of 2 or 3 layers (i * 26 // 9), each kept by its first
    kept = emulator_layers(30, 2, 2, 9)
    assert kept == [0, 1, 2, 4, 7, 10, 13, 16, 19, 22, 25, 28, 29]
    assert emulator_targets(kept, 30) == [0, 1, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29]
    # the KD term compares the output of the middle block: emulator layer 10 against FM layer 27, the
    # input of the top adapter layers (28, 29); the LM term only for a causal LM
    cfg = load_config("configs/tiny.yaml")
    layout = RunLayout.from_config(cfg)
    meta = {"compressed_layers": list(range(2, 11)), "target_layers": emulator_targets(kept, 30), "task": "causal-lm"}
    run = layer_level_run(cfg, layout, meta)
    assert run.hidden_layers == [10] and meta["target_layers"][10] == 27 and run.lm_weight > 0 and run.whole_layers
    assert layer_level_run(cfg, layout, {**meta, "task": "sequence-classification"}).lm_weight == 0
    proxy_run = layer_level_run(cfg, layout)
    assert proxy_run.hidden_layers is None and proxy_run.lm_weight == 0 and proxy_run.steps == run.steps


def _meta_fm(config):
    import transformers as tf

    with torch.device("meta"):
        if config.model_type == "llama":
            return tf.LlamaForCausalLM(config)
        return tf.BertForSequenceClassification(config)


@pytest.mark.parametrize("shape", ["minilm", "llama30"])
def test_the_emulator_is_sized_to_the_proxy(shape):
    """fed.fedot_middle_layers=0: the emulator with the middle-layer count whose parameters are the
    closest to the FedPFT proxy's lands within one layer of it (both built on the meta device)."""
    import transformers as tf

    from fedpft_dist.config import load_config
    from fedpft_dist.models.emulator import (auto_middle_layers, emulator_param_count, fedot_layers,
                                             proxy_param_count)
    from fedpft_dist.models.families import transformer_layers

    if shape == "minilm":   # all-MiniLM-L6-v2's shape
        config = tf.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                               vocab_size=30522, num_labels=3)
    else:                   # SmolLM2-135M's shape: 30 layers
        config = tf.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    fm = _meta_fm(config)
    cfg = load_config("configs/tiny.yaml")   # proxy.keep_ratio 0.25, retained layers [0, -1]
    p = cfg.proxy
    target = proxy_param_count(fm, p.retained_layers, p.keep_ratio, p.keep_ratios)
    kept, info = fedot_layers(cfg, fm)
    n = len(transformer_layers(fm))
    k = info["middle_layers"]
    assert info["proxy_params_target"] == target and len(kept) == 4 + k
    assert k == auto_middle_layers(fm, 2, 2, target)
    size = emulator_param_count(fm, kept)
    layer = max(sum(q.numel() for q in l.parameters()) for l in transformer_layers(fm))
    assert abs(size - target) <= layer
    for other in (k - 1, k + 1):   # no other count is closer
        if 1 <= other <= n - 4:
            assert abs(emulator_param_count(fm, emulator_layers(n, 2, 2, other)) - target) >= abs(size - target)
    if shape == "minilm":
        assert k == 1 and target == pytest.approx(19.2e6, rel=0.01)
    else:
        assert 5 <= k <= 25
    # an explicit count overrides the rule
    fixed, info = fedot_layers(load_config("configs/tiny.yaml", ["fed.fedot_middle_layers=2"]), fm)
    assert info["middle_layers"] == 2 and len(fixed) == 6


def test_full_tuning_trains_exactly_the_adapter_layers_and_plugs_them_into_the_fm():
    import copy

    from fedpft_dist.models.adapters import get_adapter, set_adapter, with_full_layers
    from fedpft_dist.models.families import layers_prefix

    fm = _fm().eval()
    kept = emulator_layers(6, 2, 2, 1)                   # [0, 1, 2, 4, 5]
    whole = [0, 1, 3, 4]                                 # the emulator's adapter layers
    client = with_full_layers(build_emulator(fm, kept), whole)
    trainable = {n for n, p in client.named_parameters() if p.requires_grad}
    # every parameter of the adapter layers' trainable copies and the head, nothing else (no LoRA)
    per_layer = sum(1 for _ in fm.bert.encoder.layer[0].parameters())
    assert len(trainable) == 4 * per_layer + 2 and not any("lora_" in n for n in trainable)
    assert all(".modules_to_save." in n for n in trainable)
    assert {n.split("layer.")[1].split(".")[0] for n in trainable if ".layer." in n} == {"0", "1", "3", "4"}
    # fed.head_lr_scale scales the head's rate only, not the whole layers' (also modules_to_save copies)
    from fedpft_dist.federation.client import _param_groups

    rest, head = _param_groups([(n, p) for n, p in client.named_parameters() if p.requires_grad], 1e-3, 10.0)
    assert len(head["params"]) == 2 and head["lr"] == 1e-2 and len(rest["params"]) == 4 * per_layer
    start = get_adapter(client)
    frozen = {n: p.detach().clone() for n, p in client.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in client.parameters() if p.requires_grad], lr=0.1)
    client.train()
    ids = torch.randint(1, 101, (4, 7), generator=torch.Generator().manual_seed(0))
    loss = torch.nn.functional.cross_entropy(client(input_ids=ids).logits, torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    client.eval()
    after = get_adapter(client)
    assert after.keys() == start.keys() and all(not torch.equal(after[k], start[k]) for k in after
                                                if k.endswith("dense.weight"))
    assert all(torch.equal(p, frozen[n]) for n, p in client.named_parameters() if not p.requires_grad)
    # plug-in: the FM's copies of FM layers 0, 1, 4, 5 become the client's layers 0, 1, 3, 4
    evaluate = with_full_layers(copy.deepcopy(fm), [kept[j] for j in whole])
    token = layers_prefix(fm)
    set_adapter(evaluate, adapter_to_fm(after, kept, token))
    plugged = get_adapter(evaluate)
    for j in whole:
        ours = {k: v for k, v in after.items() if f".layer.{j}." in k}
        assert ours and all(torch.equal(plugged[k.replace(f".layer.{j}.", f".layer.{kept[j]}.")], v)
                            for k, v in ours.items())
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    fm_layers, client_layers = evaluate.get_base_model().bert.encoder.layer, client.get_base_model().bert.encoder.layer
    with torch.no_grad():
        assert torch.equal(fm_layers[4](x)[0], client_layers[3](x)[0])
        assert not torch.equal(fm_layers[4](x)[0], fm.bert.encoder.layer[4](x)[0])


def test_the_emulators_distillation_loss_is_kd_plus_lm():
    """A causal LM's emulator: loss = KD (relative squared error of the middle block's output) + the
    emulator's next-token loss; gradients reach the middle layers only when only they train."""
    import transformers as tf

    from fedpft_dist.alignment.distill import DistillPair
    from fedpft_dist.alignment.losses import next_token_loss_per_sample, relative_sq_error_per_sample
    from fedpft_dist.models.emulator import emulator_targets

    torch.manual_seed(0)
    fm = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                                            tie_word_embeddings=True)).eval()
    kept = emulator_layers(6, 2, 2, 1)
    emu = build_emulator(fm, kept)
    targets = emulator_targets(kept, 6)
    for n, p in emu.named_parameters():
        p.requires_grad_(".layers.2." in n)
    pair = DistillPair(fm.model, emu, [2], alpha=0.0, teacher_layers=[targets[2]], lm_weight=1.0)
    ids = torch.randint(0, 101, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    loss, hidden, _, _, lm = pair(ids, mask)
    with torch.no_grad():
        out = emu(input_ids=ids, output_hidden_states=True)
        ht = fm.model(input_ids=ids, output_hidden_states=True).hidden_states
        kd = relative_sq_error_per_sample(ht[4], out.hidden_states[3], mask).mean()   # input of FM layer 4
        ref_lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 101), ids[:, 1:].reshape(-1))
    assert kd > 0 and torch.allclose(hidden[0], kd) and torch.allclose(lm, ref_lm, rtol=1e-5)
    assert torch.allclose(loss, kd + ref_lm, rtol=1e-5)
    assert torch.allclose(next_token_loss_per_sample(out.logits, ids, mask).mean(), ref_lm, rtol=1e-5)
    loss.backward()
    assert all((p.grad is not None) == (".layers.2." in n) for n, p in emu.named_parameters())

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
    with pytest.raises(ConfigError, match="fed.fedot_keep_bottom"):
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
def test_fedot_runs_through_the_engine(tmp_path):
    proc = run_cli("train", "--config", "configs/tiny.yaml", f"run.dir={tmp_path}", "fed.method=fedot", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    emu = json.loads((tmp_path / "emulator.json").read_text())
    assert emu["layer_map"] == [0, 1, 3, 5] and emu["compressed_layers"] == [1, 2]
    assert emu["target_layers"] == [0, 2, 4, 5]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == "fedot" and summary["alignment_rounds"] == 0
    distill = json.loads((tmp_path / "distill.json").read_text())
    # the middle layers train whole (attention and FFN), as Offsite-Tuning's emulator does
    assert distill["trainable_params"] > 2 * 1536 * 384 * 2
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    # the clients tune the emulator's bottom and top layers (FM layers 0 and 5); its middle layers
    # (FM layers 1 and 3, standing for 1-2 and 3-4) stay frozen and put nothing into the FM
    layers = {k.split("layer.")[1].split(".")[0] for k in adapter if ".layer." in k}
    assert layers == {"0", "5"}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_cosine"] is not None and r["grad_cosine_per_layer"][1:5] == [None] * 4 for r in rows)


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

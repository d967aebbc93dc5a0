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


def test_build_emulator_copies_the_kept_layers():
    import transformers as tf

    torch.manual_seed(0)
    fm = tf.BertForSequenceClassification(tf.BertConfig(hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                                                        intermediate_size=48, vocab_size=101, num_labels=3)).eval()
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
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == "fedot" and summary["alignment_rounds"] == 0
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    # the emulator's layers 2 and 3 were FM layers 3 and 5; FM layers 2 and 4 carry no trained LoRA
    trained = {k.split("layer.")[1].split(".")[0] for k in adapter if "lora_B" in k and adapter[k].abs().sum() > 0}
    assert trained == {"0", "1", "3", "5"}

"""The gradient-fidelity monitor: the comparison by hand, a model against itself, the probe set."""
from types import SimpleNamespace

import pytest
import torch

from fedpft_dist.alignment.fidelity import adapter_gradients, classification_loss, compare, gradient_fidelity
from fedpft_dist.data.tasks import ClientData
from fedpft_dist.models.adapters import get_adapter, with_lora
from fedpft_dist.runtime import Communicator


def test_compare_by_hand():
    key = "base_model.model.bert.encoder.layer.{}.attention.self.query.lora_B.weight"
    client = {key.format(0): torch.tensor([1.0, 0.0]), key.format(2): torch.tensor([0.0, 2.0]),
              "base_model.model.classifier.weight": torch.tensor([1.0, 1.0])}
    fm = {key.format(0): torch.tensor([1.0, 1.0]), key.format(2): torch.tensor([0.0, 2.0]),
          "base_model.model.classifier.weight": torch.tensor([-1.0, -1.0])}
    out = compare({k: v.double() for k, v in client.items()}, {k: v.double() for k, v in fm.items()}, "layer")
    # LoRA: a = (1, 0, 0, 2), b = (1, 1, 0, 2): <a, b> = 5, |a| = sqrt 5, |b| = sqrt 6, |a - b| = 1
    assert out["grad_cosine"] == pytest.approx(5 / (5 ** 0.5 * 6 ** 0.5))
    assert out["grad_rel_error"] == pytest.approx(1 / 6 ** 0.5)
    assert out["grad_cosine_head"] == pytest.approx(-1.0) and out["grad_rel_error_head"] == pytest.approx(2.0)
    assert out["grad_cosine_per_layer"] == [pytest.approx(2 ** -0.5), None, pytest.approx(1.0)]


def _tiny_classifier(seed: int):
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.BertForSequenceClassification(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                           intermediate_size=48, vocab_size=101, num_labels=3))
    return with_lora(model, 4, 8.0, 0.1)


def _probe(n: int = 10) -> ClientData:
    g = torch.Generator().manual_seed(3)
    return ClientData(torch.randint(1, 101, (n, 7), generator=g), torch.ones(n, 7, dtype=torch.long),
                      torch.randint(0, 3, (n,), generator=g))


def test_a_model_against_itself_has_cosine_one_and_a_perturbed_copy_less():
    rt = SimpleNamespace(rank=0, world_size=1, comm=Communicator(0, 1, torch.device("cpu"), timeout_s=5))
    a, b = _tiny_classifier(0), _tiny_classifier(0)
    adapter = get_adapter(a)
    # a trained-looking adapter: non-zero LoRA B, so that the A matrices get gradients too
    adapter = {k: (torch.randn_like(v, generator=torch.Generator().manual_seed(1)) * 0.1 if "lora_B" in k else v)
               for k, v in adapter.items()}
    same = gradient_fidelity(rt, a, b, adapter, lambda x: x, _probe(), 4, False, "layer")
    assert same["grad_cosine"] == pytest.approx(1.0, abs=1e-6) and same["grad_rel_error"] == pytest.approx(0.0, abs=1e-5)
    assert same["grad_cosine_head"] == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        for p in b.get_base_model().bert.encoder.layer[1].intermediate.dense.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    other = gradient_fidelity(rt, a, b, adapter, lambda x: x, _probe(), 4, False, "layer")
    assert other["grad_cosine"] < 0.999 and other["grad_rel_error"] > 1e-3
    # layer 1's LoRA sits before the changed FFN in the same layer, layer 0's further down: both move
    assert len(other["grad_cosine_per_layer"]) == 2


def test_gradients_are_sums_over_examples_and_leave_no_state():
    model = _tiny_classifier(0)
    adapter = get_adapter(model)
    probe = _probe(8)
    whole = adapter_gradients(model, adapter, probe, 8, classification_loss)
    halves = [adapter_gradients(model, adapter, ClientData(probe.input_ids[s], probe.attention_mask[s], probe.labels[s]),
                                3, classification_loss) for s in (slice(0, 5), slice(5, 8))]
    for k in whole:
        torch.testing.assert_close(whole[k], halves[0][k] + halves[1][k], rtol=1e-4, atol=1e-6)  # fp32 sums
    assert all(p.grad is None for p in model.parameters())
    assert model.training  # peft models start in training mode; the mode is restored

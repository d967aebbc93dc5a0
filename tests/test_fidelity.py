"""The gradient-fidelity monitor: the comparison by hand (all layers, the common layers, the norm ratio),
the bootstrap interval against resampling by hand, per-example gradients, a model against itself and
a perturbed copy (cosine and update transfer), 1 rank = 2 ranks bit for bit."""
from types import SimpleNamespace

import pytest
import torch

from fedpft_dist.alignment.fidelity import (FidelitySetting, bootstrap_cosine, classification_loss, common_layers,
                                            compare, example_cosine, example_gradients, gradient_fidelity)
from fedpft_dist.federation.transfer import TransferSetting, update_transfer
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
    assert out["grad_norm_ratio"] == pytest.approx(5 ** 0.5 / 6 ** 0.5)
    assert "grad_cosine_common" not in out   # no common layers given
    # over layer 2 alone (the common layers): a = b = (0, 2)
    common = compare({k: v.double() for k, v in client.items()}, {k: v.double() for k, v in fm.items()}, "layer", [2])
    assert common["grad_cosine_common"] == pytest.approx(1.0) and common["grad_norm_ratio_common"] == pytest.approx(1.0)
    assert common["grad_cosine"] == out["grad_cosine"]


def test_common_layers_are_an_emulators_adapter_layers():
    assert common_layers(6, 1, 1) == [0, 5]
    assert common_layers(30, 2, 2) == [0, 1, 28, 29]
    assert common_layers(2, 2, 2) == [0, 1]


def test_bootstrap_interval_equals_resampling_the_examples_by_hand():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 5, generator=g, dtype=torch.float64)
    b = a + 0.7 * torch.randn(7, 5, generator=g, dtype=torch.float64)
    gram = {"aa": a @ a.T, "bb": b @ b.T, "ab": a @ b.T}
    low, high = bootstrap_cosine(gram, 300, seed=4)
    # the same resamples, summed by hand
    gen = torch.Generator().manual_seed(4 * 7_919 + 29)
    picks = torch.randint(7, (300, 7), generator=gen)
    cos = torch.stack([torch.nn.functional.cosine_similarity(a[p].sum(0), b[p].sum(0), dim=0) for p in picks])
    want = torch.quantile(cos, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    assert [low, high] == pytest.approx(want, abs=1e-12)
    whole = float(torch.nn.functional.cosine_similarity(a.sum(0), b.sum(0), dim=0))
    assert low < whole < high
    assert bootstrap_cosine({k: v[:1, :1] for k, v in gram.items()}, 300, 4) == (None, None)   # one example
    # the mean per-example cosine, and its interval from the same resamples
    mean, low, high = example_cosine(gram, 300, seed=4)
    per = torch.nn.functional.cosine_similarity(a, b, dim=1)
    assert mean == pytest.approx(float(per.mean()), abs=1e-12)
    means = torch.stack([per[p].mean() for p in picks])
    want = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64))
    assert [low, high] == pytest.approx(want.tolist(), abs=1e-12)


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
    setting = FidelitySetting(False, "layer", [0])
    same = gradient_fidelity(rt, a, b, adapter, lambda x: x, _probe(), setting)
    one = pytest.approx(1.0, abs=1e-6)
    assert same["grad_cosine"] == one and same["grad_rel_error"] == pytest.approx(0.0, abs=1e-5)
    assert same["grad_cosine_head"] == one and same["grad_norm_ratio"] == pytest.approx(1.0)
    assert same["grad_cosine_low"] == one and same["grad_cosine_high"] == one
    assert same["grad_example_cosine"] == one and same["grad_example_cosine_low"] == one
    assert same["grad_cosine_common"] == pytest.approx(1.0, abs=1e-6)
    steps = TransferSetting(steps=3, batch_size=4, lr=1e-2, weight_decay=0.0, causal=False, seed=5)
    moved = update_transfer(a, b, adapter, lambda x: x, _probe(), steps)
    assert moved["transfer"] == pytest.approx(1.0, abs=1e-6) and moved["transfer_fm_decrease"] > 0
    with torch.no_grad():
        for p in b.get_base_model().bert.encoder.layer[1].intermediate.dense.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    other = gradient_fidelity(rt, a, b, adapter, lambda x: x, _probe(), setting)
    assert other["grad_cosine"] < 0.999 and other["grad_rel_error"] > 1e-3
    assert other["grad_cosine_low"] <= other["grad_cosine"] <= other["grad_cosine_high"] < 1
    assert other["grad_example_cosine_low"] <= other["grad_example_cosine"] <= other["grad_example_cosine_high"] < 1
    # layer 0 lies below the changed FFN: its gradient changes too, but less than layer 1's
    assert other["grad_cosine_common"] < 1
    fm_adapter = get_adapter(b)
    away = update_transfer(a, b, adapter, lambda x: x, _probe(), steps)
    assert away["transfer"] < 0.999
    assert all(torch.equal(v, get_adapter(b)[k]) for k, v in fm_adapter.items())   # the FM's adapter is back
    # layer 1's LoRA sits before the changed FFN in the same layer, layer 0's further down: both move
    assert len(other["grad_cosine_per_layer"]) == 2


def test_example_gradients_from_batches_equal_one_example_at_a_time(monkeypatch):
    from fedpft_dist.alignment import fidelity

    model = _tiny_classifier(0)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    assert fidelity._linear_owners(model, params) is not None   # LoRA and the head: all nn.Linear tensors
    adapter = {k: (v + 0.1 if "lora_B" in k else v) for k, v in get_adapter(model).items()}
    probe = _probe(6)
    probe.attention_mask[2, 3:] = 0
    batched = example_gradients(model, adapter, probe, classification_loss, batch_size=4)
    monkeypatch.setattr(fidelity, "_linear_owners", lambda model, params: None)   # the general path
    looped = example_gradients(model, adapter, probe, classification_loss, batch_size=4)
    assert batched.keys() == looped.keys()
    for k in batched:
        torch.testing.assert_close(batched[k], looped[k], rtol=1e-4, atol=1e-6)


def test_example_gradients_add_up_to_the_batch_gradient_and_leave_no_state():
    model = _tiny_classifier(0)
    adapter = get_adapter(model)
    adapter = {k: (torch.randn_like(v, generator=torch.Generator().manual_seed(1)) * 0.1 if "lora_B" in k else v)
               for k, v in adapter.items()}
    probe = _probe(8)
    probe.attention_mask[1, 4:] = 0   # padded rows: padding adds nothing to an example's gradient
    probe.attention_mask[6, 2:] = 0
    rows = example_gradients(model, adapter, probe, classification_loss, batch_size=3)
    # one example at a time (no padding at all) gives the same rows
    for i in (1, 6, 7):
        alone = example_gradients(model, adapter, ClientData(probe.input_ids[i:i + 1], probe.attention_mask[i:i + 1],
                                                             probe.labels[i:i + 1]), classification_loss, batch_size=1)
        for k in rows:
            torch.testing.assert_close(rows[k][i], alone[k][0], rtol=1e-4, atol=1e-6)
    model.eval()
    classification_loss(model, {"input_ids": probe.input_ids, "attention_mask": probe.attention_mask},
                        probe.labels).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = name.replace(".modules_to_save.default.", ".").replace(".default.", ".")
            torch.testing.assert_close(rows[key].sum(0), p.grad.reshape(-1), rtol=1e-4, atol=1e-6)  # fp32 sums
            assert rows[key].shape == (8, p.numel())
            p.grad = None
    model.train()
    example_gradients(model, adapter, probe, classification_loss)
    assert all(p.grad is None for p in model.parameters())
    assert model.training  # peft models start in training mode; the mode is restored

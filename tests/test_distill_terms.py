"""The optional terms of layer-level distillation on small random models: the derivative term's
central-difference JVP against autograd's, its zero for a student equal to its teacher, and
adapter-perturbed distillation (a zero perturbation changes nothing, bit for bit)."""
import copy

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

from fedpft_dist.alignment.distill import (AdapterPerturbation, DistillPair, central_jvp, ffn_map,
                                           jvp_tangents)
from fedpft_dist.models.families import layout_for, transformer_layers
from fedpft_dist.models.proxy import build_proxy


def _llama() -> LlamaModel:
    torch.manual_seed(0)
    return LlamaModel(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)).eval()


def _bert() -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                num_attention_heads=4, max_position_embeddings=32,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()


def _proxy(fm):
    """Layers 1 and 2 keep 24 of 48 neurons."""
    return build_proxy(fm, {1: list(range(0, 48, 2)), 2: list(range(24))}).eval()


def _batch():
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize("make", [_llama, _bert])
def test_central_jvp_matches_autograd(make):
    fm = make()
    layer = transformer_layers(fm)[1]
    f = ffn_map(layer, layout_for(fm.config.model_type))
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    hv = jvp_tangents(x, seed=3)
    exact = torch.func.jvp(f, (x,), (hv,))[1]
    torch.testing.assert_close(central_jvp(f, x, hv), exact, rtol=2e-3, atol=2e-5)
    # the FFN alone: no residual, no norm (BERT's output module adds both)
    a = layer.intermediate(x) if hasattr(layer, "intermediate") else None
    if a is not None:
        torch.testing.assert_close(f(x), layer.output.dense(a))


@pytest.mark.parametrize("make", [_llama, _bert])
def test_derivative_term_is_zero_for_the_teacher_and_positive_for_a_proxy(make):
    fm = make()
    ids, mask = _batch()
    same = DistillPair(fm, copy.deepcopy(fm), [1, 2], alpha=0.0, jvp_weight=1.0)
    loss, hidden, _, jvp, _ = same(ids, mask, tangent_seed=5)
    assert torch.equal(jvp, torch.zeros(2)) and loss.item() == 0.0
    pair = DistillPair(fm, _proxy(fm), [1, 2], alpha=0.0, jvp_weight=1.0)
    loss, hidden, _, jvp, _ = pair(ids, mask, tangent_seed=5)
    assert (jvp > 0).all()
    assert loss.item() == pytest.approx(hidden.mean().item() + jvp.mean().item(), rel=1e-6)
    loss.backward()   # the student's side carries gradients to its compressed FFN
    down = transformer_layers(pair.student)[1]
    grads = [p.grad for p in down.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # the same seed draws the same tangents
    again = pair(ids, mask, tangent_seed=5)[3]
    assert torch.equal(again, jvp)


def _loss_and_grads(pair: DistillPair, ids, mask) -> tuple[torch.Tensor, list[torch.Tensor]]:
    pair.student.zero_grad(set_to_none=True)
    loss = pair(ids, mask)[0]
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in pair.student.parameters() if p.grad is not None]


@pytest.mark.parametrize("make", [_llama, _bert])
def test_adapter_perturbation(make):
    fm = make()
    ids, mask = _batch()
    plain = DistillPair(fm, _proxy(fm), [1, 2], alpha=0.01)
    loss0, grads0 = _loss_and_grads(plain, ids, mask)
    hidden0 = plain._hidden(fm, ids, mask)[-1]

    pair = DistillPair(fm, _proxy(fm), [1, 2], alpha=0.01)
    zero = AdapterPerturbation(pair.teacher, pair.student, [1, 2], scale=0.0, rank=4)
    zero.draw(seed=0, device=torch.device("cpu"))
    # every tunable weight of the FM has a site: attention everywhere, the FFN of layer 0 (kept whole)
    layout = layout_for(fm.config.model_type)
    assert len(zero.sites) == 3 * len(layout.attention) + len(layout.rows) + len(layout.cols)
    loss, grads = _loss_and_grads(pair, ids, mask)
    assert torch.equal(loss, loss0) and all(torch.equal(a, b) for a, b in zip(grads, grads0))
    zero.remove()

    noisy = AdapterPerturbation(pair.teacher, pair.student, [1, 2], scale=0.5, rank=4)
    noisy.draw(seed=0, device=torch.device("cpu"))
    assert not torch.equal(pair._hidden(fm, ids, mask)[-1], hidden0)   # the teacher carries it too
    loss, _ = _loss_and_grads(pair, ids, mask)
    assert loss.item() != loss0.item()
    # its scale: B A's entries have std scale / sqrt(d_in)
    a, b = noisy._delta[zero.sites[0][0]]
    assert (b @ a).std().item() == pytest.approx(0.5 / 32 ** 0.5, rel=0.3)
    noisy.clear()
    assert torch.equal(pair._hidden(fm, ids, mask)[-1], hidden0)
    noisy.draw(seed=1, device=torch.device("cpu"))
    noisy.remove()   # the teacher goes back as it came
    assert torch.equal(pair._hidden(fm, ids, mask)[-1], hidden0)

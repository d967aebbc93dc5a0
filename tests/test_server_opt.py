"""Server optimizers against hand-computed steps, their checkpoint state, and FedProx's local term."""
import math

import pytest
import torch

from fedpft_dist.config import load_config
from fedpft_dist.errors import ConfigError
from fedpft_dist.federation.server_opt import SERVER_OPTIMIZERS, make_server_optimizer


def _opt(name: str, *overrides: str):
    return make_server_optimizer(load_config(None, [f"fed.server_optimizer={name}", *overrides]).fed)


X = {"w": torch.tensor([1.0, -2.0, 0.5])}
MEAN1 = {"w": torch.tensor([1.5, -2.0, 0.0])}     # delta = [0.5, 0, -0.5]
MEAN2 = {"w": torch.tensor([2.0, -1.0, 0.0])}


def test_fedavg_is_the_weighted_mean_itself():
    opt = _opt("fedavg")
    assert opt.step(X, MEAN1) is MEAN1 and opt.state() == {}
    half = _opt("fedavg", "fed.server_lr=0.5").step(X, MEAN1)
    assert torch.allclose(half["w"], torch.tensor([1.25, -2.0, 0.25]))


def test_fedavgm_by_hand():
    opt = _opt("fedavgm", "fed.server_lr=1", "fed.server_momentum=0.5")
    x1 = opt.step(X, MEAN1)                              # m = delta; x = x + m = mean
    assert torch.allclose(x1["w"], MEAN1["w"])
    x2 = opt.step(x1, MEAN2)                             # delta = [0.5, 1, 0]; m = 0.5*[0.5,0,-0.5] + delta
    assert torch.allclose(x2["w"], x1["w"] + torch.tensor([0.75, 1.0, -0.25]))


@pytest.mark.parametrize("name", ["fedadagrad", "fedadam", "fedyogi"])
def test_adaptive_optimizers_by_hand(name):
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    opt = _opt(name, f"fed.server_lr={lr}", f"fed.server_beta1={b1}", f"fed.server_beta2={b2}",
               f"fed.server_tau={tau}")
    x, m, v = X["w"].double().tolist(), [0.0] * 3, [tau ** 2] * 3
    cur = X
    for mean in (MEAN1, MEAN2):
        nxt = opt.step(cur, mean)
        for i in range(3):
            d = mean["w"][i].item() - x[i]
            m[i] = b1 * m[i] + (1 - b1) * d
            if name == "fedadagrad":
                v[i] = v[i] + d * d
            elif name == "fedadam":
                v[i] = b2 * v[i] + (1 - b2) * d * d
            else:
                v[i] = v[i] - (1 - b2) * d * d * math.copysign(1.0, v[i] - d * d) if v[i] != d * d else v[i]
            x[i] = x[i] + lr * m[i] / (math.sqrt(v[i]) + tau)
        assert torch.allclose(nxt["w"].double(), torch.tensor(x, dtype=torch.float64), atol=1e-6), name
        cur = nxt
    assert set(opt.state()) == {"m/w", "v/w"}


@pytest.mark.parametrize("name", sorted(SERVER_OPTIMIZERS))
def test_state_round_trips_and_continues_the_same_steps(name):
    a = _opt(name, "fed.server_lr=0.3")
    x1 = a.step(X, MEAN1)
    b = _opt(name, "fed.server_lr=0.3")
    if a.state():
        b.load_state({k: v.clone() for k, v in a.state().items()})
    assert torch.equal(a.step(x1, MEAN2)["w"], b.step(x1, MEAN2)["w"])


def test_the_adaptive_default_learning_rate_is_small():
    assert _opt("fedadam").lr == 1e-3 and _opt("fedavg").lr == 1.0 and _opt("fedadam", "fed.server_lr=0.5").lr == 0.5
    assert _opt("fedavgm").lr == pytest.approx(0.1) and _opt("fedavgm", "fed.server_momentum=0.5").lr == 0.5


def test_a_server_state_of_another_optimizer_is_refused():
    with pytest.raises(ConfigError, match="fed.server_optimizer"):
        _opt("fedadam").load_state({"m/w": torch.zeros(3)})


def test_unknown_server_optimizer_names_the_key():
    with pytest.raises(ConfigError, match="fed.server_optimizer"):
        load_config(None, ["fed.server_optimizer=fedsgd"])


# ----------------------------------------------------------------------------------------------------
# FedProx
# ----------------------------------------------------------------------------------------------------

def _toy():
    from fedpft_dist.data.tasks import ClientData

    torch.manual_seed(0)
    n, length = 12, 6
    ids = torch.randint(0, 20, (n, length))
    data = ClientData(input_ids=ids, attention_mask=torch.ones(n, length, dtype=torch.long),
                      labels=torch.randint(0, 2, (n,)), token_type_ids=None)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 8)
            self.head = torch.nn.Linear(8, 2)

        def forward(self, input_ids, attention_mask):
            out = type("Out", (), {})()
            out.logits = self.head(self.emb(input_ids).mean(1))
            return out

    return Toy(), data


def test_fedprox_with_mu_zero_is_fedavg_local_training_bit_for_bit(monkeypatch):
    from fedpft_dist.federation import client as client_mod

    monkeypatch.setattr(client_mod, "set_adapter", lambda m, a: m.load_state_dict(a, strict=False))
    monkeypatch.setattr(client_mod, "get_adapter", lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()})
    model, data = _toy()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    plain = client_mod.train_client(model, start, data, 2, 4, 0.05, 0.0, seed=3)
    zero = client_mod.train_client(model, start, data, 2, 4, 0.05, 0.0, seed=3, prox_mu=0.0)
    assert all(torch.equal(plain.adapter[k], zero.adapter[k]) for k in start)
    assert plain.loss_sum == zero.loss_sum
    prox = client_mod.train_client(model, start, data, 2, 4, 0.05, 0.0, seed=3, prox_mu=10.0)

    def dist(a):
        return sum(float(((a[k] - start[k]) ** 2).sum()) for k in start)

    # the proximal term keeps the client nearer the global adapter
    assert 0 < dist(prox.adapter) < dist(plain.adapter)


def test_the_head_learning_rate_scale_moves_only_the_head_slower():
    from peft import LoraConfig, get_peft_model

    from fedpft_dist.federation.client import train_client
    from fedpft_dist.models.adapters import get_adapter

    _, data = _toy()

    class Out(dict):
        @property
        def logits(self):
            return self["logits"]

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 8)
            self.proj = torch.nn.Linear(8, 8)
            self.head = torch.nn.Linear(8, 2)

        def forward(self, input_ids, attention_mask):
            return Out(logits=self.head(torch.tanh(self.proj(self.emb(input_ids).mean(1)))))

    def run(scale):
        torch.manual_seed(0)
        model = get_peft_model(Toy(), LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], modules_to_save=["head"]))
        start = get_adapter(model)
        upd = train_client(model, start, data, 2, 4, 0.05, 0.0, seed=3, head_lr_scale=scale)
        moved = {k: float((upd.adapter[k] - start[k]).norm()) for k in start}
        return upd, moved

    _, moved_default = run(1.0)
    _, moved_slow = run(0.1)
    head = [k for k in moved_default if "head" in k]
    lora = [k for k in moved_default if "lora_" in k]
    assert head and lora
    for k in head:
        # Adam's steps are about lr each: a tenth of the rate moves the head about a tenth as far
        assert 0 < moved_slow[k] < 0.3 * moved_default[k], k
    for k in lora:
        assert moved_slow[k] > 0.3 * moved_default[k], k

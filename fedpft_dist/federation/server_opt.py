"""Server optimisers by name (Reddi et al., "Adaptive Federated Optimization", ICLR 2021): how the
weighted mean of the clients' adapters moves the global adapter.

With x the global adapter and mean the weighted mean of the round's client adapters (what the one
all-reduce gives every rank), the update direction is ``delta = mean - x`` (minus the
pseudo-gradient ``x - mean``). Per tensor, elementwise, with server learning rate eta:

    fedavg      x <- mean                                   (eta = 1; otherwise x + eta * delta)
    fedavgm     m <- beta * m + delta;   x <- x + eta * m   (server momentum, Hsu et al. 2019)
    fedadagrad  m <- b1 * m + (1 - b1) * delta;   v <- v + delta^2
    fedadam     m <- b1 * m + (1 - b1) * delta;   v <- b2 * v + (1 - b2) * delta^2
    fedyogi     m <- b1 * m + (1 - b1) * delta;   v <- v - (1 - b2) * delta^2 * sign(v - delta^2)
                (the three adaptive ones) x <- x + eta * m / (sqrt(v) + tau)

m starts at 0 and v at tau^2 (the paper's v_{-1}), without bias correction, as in the paper. Every
rank holds the same mean and the same state, so every rank takes the same step without talking; the
state (float64) is part of the round checkpoint, so a resumed run takes the steps it would have taken.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import ConfigError


# The server learning rate when fed.server_lr is 0. FedAvg: 1, the mean itself. FedAvgM: 1 - momentum,
# an effective rate lr / (1 - momentum) of 1 (Hsu et al. 2019 find the best runs near it; at lr 1 and
# momentum 0.9 the steps grow tenfold). The adaptive ones move every element by about lr per round
# whatever the size of its delta: 1e-3, about what one local AdamW step at the usual client rate
# moves it (on the tweets with Dirichlet alpha = 1, 1e-2 left seed 0 at the majority class).
def default_lr(name: str, momentum: float) -> float:
    return {"fedavg": 1.0, "fedavgm": 1.0 - momentum}.get(name, 1e-3)


@dataclass
class ServerOptimizer:
    """x <- x + lr * delta; the state the named optimisers keep, and their checkpoint form."""
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)   # "m"/"v" -> name -> tensor

    name: ClassVar[str] = ""
    slots: ClassVar[tuple[str, ...]] = ()   # the per-tensor state it keeps

    def step(self, x: dict[str, torch.Tensor], mean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The next global adapter from the current one ``x`` and the clients' weighted ``mean``."""
        if not self.moments:
            self.moments = {s: {k: self._initial(s, v) for k, v in x.items()} for s in self.slots}
        out = {}
        for k, v in x.items():
            delta = mean[k].double() - v.double()
            out[k] = (v.double() + self.update(k, delta)).to(v.dtype)
        return out

    def _initial(self, slot: str, like: torch.Tensor) -> torch.Tensor:
        start = self.tau ** 2 if slot == "v" else 0.0
        return torch.full(like.shape, start, dtype=torch.float64, device=like.device)

    def update(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        return self.lr * delta

    def state(self) -> dict[str, torch.Tensor]:
        """The optimiser's tensors by ``slot/name`` (empty for FedAvg), for a checkpoint."""
        return {f"{s}/{k}": v for s, group in self.moments.items() for k, v in group.items()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        moments: dict[str, dict[str, torch.Tensor]] = {}
        for key, v in tensors.items():
            slot, name = key.split("/", 1)
            moments.setdefault(slot, {})[name] = v.double()
        if set(moments) != set(self.slots):
            raise ConfigError("fed.server_optimizer", f"the checkpoint holds server state {sorted(moments)}, "
                                                      f"{self.name} keeps {sorted(self.slots)}")
        self.moments = moments


class FedAvg(ServerOptimizer):
    """The weighted mean is the new global adapter (at lr 1)."""
    name = "fedavg"

    def step(self, x: dict[str, torch.Tensor], mean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.lr == 1.0:
            return mean   # exactly the weighted mean: FedAvg as the aggregator computes it
        return super().step(x, mean)


class FedAvgM(ServerOptimizer):
    name = "fedavgm"
    slots = ("m",)

    def update(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        m = self.moments["m"]
        m[key] = self.momentum * m[key] + delta
        return self.lr * m[key]


class _Adaptive(ServerOptimizer, abc.ABC):
    slots = ("m", "v")

    @abc.abstractmethod
    def second_moment(self, v: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        """The next v from the current one and delta^2 (what tells the three adaptive optimisers apart)."""

    def update(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        m, v = self.moments["m"], self.moments["v"]
        m[key] = self.beta1 * m[key] + (1 - self.beta1) * delta
        v[key] = self.second_moment(v[key], delta * delta)
        return self.lr * m[key] / (v[key].sqrt() + self.tau)


class FedAdagrad(_Adaptive):
    name = "fedadagrad"

    def second_moment(self, v: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        return v + sq


class FedAdam(_Adaptive):
    name = "fedadam"

    def second_moment(self, v: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * sq


class FedYogi(_Adaptive):
    name = "fedyogi"

    def second_moment(self, v: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.beta2) * sq * torch.sign(v - sq)


SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    cls.name: cls for cls in (FedAvg, FedAvgM, FedAdagrad, FedAdam, FedYogi)}


def make_server_optimizer(fed) -> ServerOptimizer:
    """The ``fed.server_optimizer`` of a :class:`~fedpft_dist.config.FedConfig`, with its settings."""
    name = fed.server_optimizer
    if name not in SERVER_OPTIMIZERS:
        raise ConfigError("fed.server_optimizer", f"{name!r} is not available (server optimizers: "
                                                  f"{', '.join(SERVER_OPTIMIZERS)})")
    return SERVER_OPTIMIZERS[name](lr=fed.server_lr or default_lr(name, fed.server_momentum), momentum=fed.server_momentum, beta1=fed.server_beta1,
                                   beta2=fed.server_beta2, tau=fed.server_tau)

"""Aggregators by name: how client adapters become the next global adapter.

Every rank accumulates the updates of the clients it trained (``accumulate``), then ONE all-reduce
over the world (``reduce``) sums every rank's float64 partial sums. A rank with no client sends
zeros and still joins. Aggregators differ in the weight they give a client (``weight``); server
optimisers plug in after the reduce, on the weighted mean every rank then holds.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..runtime import Communicator
from .client import ClientUpdate


@dataclass
class Reduced:
    """What the all-reduce gives every rank."""
    mean: Optional[dict[str, torch.Tensor]]   # sum_c w_c theta_c / sum_c w_c; None when no update counted
    total_weight: float
    excluded: int                             # non-finite client updates left out, over all ranks
    all_finite: bool                          # every rank agreed that all its updates were finite
    extra: dict[str, torch.Tensor]            # the riders, summed over ranks
    payload_bytes: int                        # bytes of the one all-reduce
    allreduce_seconds: float                  # its duration on this rank


@dataclass
class Aggregator:
    """Weighted FedAvg: a client's weight is its number of training examples."""
    template: dict[str, torch.Tensor]
    sums: dict[str, torch.Tensor] = field(init=False)
    weight_sum: float = field(init=False, default=0.0)
    excluded: int = field(init=False, default=0)

    name = "weighted"

    def __post_init__(self) -> None:
        # Sums in float64: the result then does not depend on how clients are split over ranks
        # (fp32 partial sums in a different order would differ in the last bits). One flat buffer,
        # with a view per tensor: adding a client is three tensor operations, not three per tensor.
        self.keys = list(self.template)
        self.flat = torch.zeros(sum(v.numel() for v in self.template.values()), dtype=torch.float64)
        self.sums, offset = {}, 0
        for k in self.keys:
            n = self.template[k].numel()
            self.sums[k] = self.flat[offset: offset + n].view(self.template[k].shape)
            offset += n

    def weight(self, update: ClientUpdate) -> float:
        return float(update.num_samples)

    def accumulate(self, adapter: dict[str, torch.Tensor], weight: float, contribute: bool = True) -> bool:
        """Add ``weight * adapter`` to this rank's sums; a non-finite adapter is counted as excluded
        instead. Returns whether the update counts (is finite). With ``contribute`` False (a client
        group's other ranks, which hold the same adapter as its leader) nothing is added or counted:
        the group's update enters the all-reduce once."""
        flat = torch.cat([adapter[k].detach().reshape(-1).cpu() for k in self.keys]).double()
        finite = bool(torch.isfinite(flat).all())
        if contribute and not finite:
            self.excluded += 1
        elif contribute:
            self.flat += weight * flat
            self.weight_sum += weight
        return finite

    def reduce(self, comm: Communicator, extra: Optional[dict[str, torch.Tensor]] = None,
               name: str = "aggregate/adapter") -> Reduced:
        """Every rank's sums (and the float64 ``extra`` tensors that ride along) summed by one
        all-reduce; the weighted mean of the counted updates. A collective: every rank calls it."""
        all_finite = comm.agree(self.excluded == 0, "min", name="aggregate/finite")
        payload = {f"adapter/{k}": v for k, v in self.sums.items()}
        payload["meta/weight"] = torch.tensor([self.weight_sum, float(self.excluded)], dtype=torch.float64)
        payload.update({f"extra/{k}": v for k, v in (extra or {}).items()})
        t0 = time.perf_counter()
        red = comm.all_reduce_sum(payload, name=name)
        seconds = time.perf_counter() - t0
        total_w, excluded = red["meta/weight"].tolist()
        mean = None
        if total_w > 0:
            # theta = sum_c w_c theta_c / sum_c w_c
            mean = {k: (red[f"adapter/{k}"] / total_w).to(v.dtype) for k, v in self.template.items()}
        return Reduced(mean, total_w, int(excluded), all_finite,
                       {k[len("extra/"):]: v for k, v in red.items() if k.startswith("extra/")},
                       sum(v.numel() * v.element_size() for v in payload.values()), seconds)


class UniformAggregator(Aggregator):
    """Plain average: every counted client weighs 1."""
    name = "uniform"

    def weight(self, update: ClientUpdate) -> float:
        return 1.0


AGGREGATORS: dict[str, type[Aggregator]] = {cls.name: cls for cls in (Aggregator, UniformAggregator)}


def make_aggregator(name: str, template: dict[str, torch.Tensor]) -> Aggregator:
    """A fresh aggregator of ``fed.aggregation`` for one round; ``template`` gives names, shapes and dtypes."""
    from ..errors import ConfigError

    if name not in AGGREGATORS:
        raise ConfigError("fed.aggregation", f"{name!r} is not available (aggregators: {', '.join(AGGREGATORS)})")
    return AGGREGATORS[name](template)

"""The state of a federated run between rounds, and its checkpoints.

:class:`RoundState` is exactly what a round checkpoint saves and what resume loads: the global
adapter, the proxy's FFN weights once alignment has changed them, and the counters the summary
reports. Checkpoints are safetensors + ``state.json`` written atomically by rank 0
(:mod:`fedpft_dist.checkpoint`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ..errors import UserError

log = logging.getLogger(__name__)

ROUND_PREFIX = "round-"


@dataclass
class RoundState:
    global_adapter: dict[str, torch.Tensor]
    round: int = 0                                # rounds completed
    best: Optional[float] = None                  # best value of the headline metric so far
    initial_eval: dict = field(default_factory=dict)
    alignment_rounds: int = 0
    align_skipped: int = 0                        # alignment rounds whose result was not finite
    ffn_bytes_per_alignment: int = 0
    excluded_clients: int = 0
    # The compressed layers' FFN tensors of the clients' proxy after the latest alignment (None
    # until one ran: the proxy's own weights).
    proxy_ffn: Optional[dict[str, torch.Tensor]] = None

    COUNTERS = ("round", "best", "initial_eval", "alignment_rounds", "align_skipped", "ffn_bytes_per_alignment",
                "excluded_clients")

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        out = {"adapter": self.global_adapter}
        if self.proxy_ffn is not None:
            out["proxy_ffn"] = self.proxy_ffn
        return out

    def counters(self) -> dict:
        return {k: getattr(self, k) for k in self.COUNTERS}


@dataclass
class Checkpointer:
    """Round checkpoints of one run: when to write them, writing (rank 0), finding and loading the
    newest. ``identity`` (method, seed, ...) is stored with each and must match on resume."""
    root: Path
    every: int
    identity: dict

    def due(self, done: int, rounds: int, stopping: bool) -> bool:
        """After round ``done`` (1-based) of ``rounds``: at a stop, and every ``every`` rounds before
        the last (the finished run's results are its own record)."""
        return stopping or bool(self.every and done % self.every == 0 and done < rounds)

    def save(self, state: RoundState, world_size: int) -> Path:
        return save_checkpoint(self.root, f"{ROUND_PREFIX}{state.round:06d}", state.tensors(),
                               {**self.identity, "world_size": world_size, **state.counters()})

    def load_latest(self) -> Optional[RoundState]:
        ckpt = latest_checkpoint(self.root, ROUND_PREFIX)
        if ckpt is None:
            return None
        tensors, meta = load_checkpoint(ckpt)
        for key, value in self.identity.items():
            if meta.get(key) != value:
                raise UserError(f"fed.resume: checkpoint {ckpt} has {key} {meta.get(key)!r}, this run {value!r}")
        log.info("resumed from %s: continuing at round %d", ckpt, meta["round"] + 1)
        return RoundState(global_adapter=tensors["adapter"], proxy_ffn=tensors.get("proxy_ffn"),
                          **{k: meta[k] for k in RoundState.COUNTERS})

"""The state of a federated run between rounds, and its checkpoints.

:class:`RoundState` is exactly what a round checkpoint saves and what resume loads: the global
adapter, the proxy's FFN weights once alignment has changed them, and the counters the summary
reports. Checkpoints are safetensors + ``state.json`` written atomically by rank 0
(:mod:`fedpft_dist.checkpoint`), each with the run's fingerprint (:mod:`fedpft_dist.fingerprint`):
resume takes the newest checkpoint that verifies and only when its fingerprint is this run's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint import checkpoint_dirs, newest_checkpoint, save_checkpoint
from ..errors import UserError
from ..fingerprint import describe_difference, first_difference

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
    excluded_streak: int = 0                      # consecutive rounds up to now in which every update was excluded
    # A resumed checkpoint's FFN tensors of the clients' aligned proxy, until they are loaded into
    # the client model (which holds them from then on; None: nothing to load).
    proxy_ffn: Optional[dict[str, torch.Tensor]] = None
    # The server optimizer's moments (fedpft_dist.federation.server_opt; empty for FedAvg).
    server_opt: dict[str, torch.Tensor] = field(default_factory=dict)

    COUNTERS = ("round", "best", "initial_eval", "alignment_rounds", "align_skipped", "ffn_bytes_per_alignment",
                "excluded_clients", "excluded_streak")

    def tensors(self, proxy_ffn: Optional[dict[str, torch.Tensor]] = None) -> dict[str, dict[str, torch.Tensor]]:
        """What a checkpoint holds: the global adapter, ``proxy_ffn`` (the client model's aligned FFN
        tensors, read from it when the checkpoint is written), the server optimizer's moments."""
        out = {"adapter": self.global_adapter}
        if proxy_ffn:
            out["proxy_ffn"] = proxy_ffn
        if self.server_opt:
            out["server_opt"] = self.server_opt
        return out

    def counters(self) -> dict:
        return {k: getattr(self, k) for k in self.COUNTERS}


@dataclass
class Checkpointer:
    """Round checkpoints of one run: when to write them, writing (rank 0), finding and loading the
    newest that verifies. ``identity`` (method, seed) is stored for readers; ``fingerprint`` is
    stored and must match on resume."""
    root: Path
    every: int
    identity: dict
    fingerprint: dict = field(default_factory=dict)

    def due(self, done: int, rounds: int, stopping: bool) -> bool:
        """After round ``done`` (1-based) of ``rounds``: at a stop, and every ``every`` rounds before
        the last (the finished run's results are its own record)."""
        return stopping or bool(self.every and done % self.every == 0 and done < rounds)

    def save(self, state: RoundState, world_size: int, proxy_ffn: Optional[dict[str, torch.Tensor]] = None) -> Path:
        return save_checkpoint(self.root, f"{ROUND_PREFIX}{state.round:06d}", state.tensors(proxy_ffn),
                               {**self.identity, "world_size": world_size, **state.counters(),
                                "fingerprint": self.fingerprint})

    def any(self) -> bool:
        """Whether the directory holds round checkpoints (complete or not)."""
        return bool(checkpoint_dirs(self.root, ROUND_PREFIX))

    def load_latest(self) -> Optional[RoundState]:
        """The newest checkpoint that verifies (None: there is none); an error when it was written by
        a run with other settings."""
        found = newest_checkpoint(self.root, ROUND_PREFIX, "fed.resume")
        if found is None:
            return None
        ckpt, tensors, meta = found
        diff = first_difference(meta.get("fingerprint"), self.fingerprint)
        if diff is not None:
            raise UserError(f"fed.resume: checkpoint {ckpt} was written with {describe_difference(diff)}; resume "
                            f"with the settings of its run (its config.yaml), or start afresh without fed.resume: in "
                            f"a new run.dir, or with run.rebuild=true, which moves the old checkpoints aside")
        log.info("resumed from %s: continuing at round %d", ckpt, meta["round"] + 1)
        return RoundState(global_adapter=tensors["adapter"], proxy_ffn=tensors.get("proxy_ffn"),
                          server_opt=tensors.get("server_opt", {}),
                          **{k: meta[k] for k in RoundState.COUNTERS if k in meta})

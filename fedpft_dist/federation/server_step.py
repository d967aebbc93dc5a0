"""What a method does on the server after a round's aggregation, on every rank.

A method that has such a step gives a factory for it (:attr:`Method.server_step`); the engine asks
the step which rounds it runs after, lets the clients of those rounds record what it needs, and calls
it right after the aggregation, without knowing what it does. FedPFT's step is
:class:`NeuronAlignment`: the neuron-level alignment of the clients' proxy against the FM.
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Protocol

import torch

from ..alignment.stages import AlignmentStudent, align_neurons, alignment_metrics, public_pair
from ..config import Config
from ..models.proxy import ActivationRecorder
from ..runtime import Runtime
from ..runtime.shard import load_full_state
from .run_models import Models
from .state import RoundState

log = logging.getLogger(__name__)


class ServerStep(Protocol):
    """A method's step after aggregation."""
    phase: str          # the name its seconds go under (round rows, the summary's phase_seconds)

    def due(self, round_index: int) -> bool:
        """Whether the step runs after round ``round_index`` (0-based); the same on every rank."""

    def recorder(self) -> Optional[ActivationRecorder]:
        """What the clients of a round it runs after record while they train (None: nothing)."""

    def __call__(self, round_index: int, recorder: Optional[ActivationRecorder], state: RoundState) -> dict:
        """The step (every rank, the same collectives); returns entries of the round's metrics row."""


class NeuronAlignment:
    """FedPFT's server step: every ``fed.align_every`` rounds (not after the last, when nothing would
    train on the result), the activation statistics of the round's clients summed over ranks and a
    neuron-level distillation of the proxy on all ranks, whose new FFN weights go into this rank's
    client model (the clients of the next round train on them; a round checkpoint reads them from
    there, so no second copy is kept)."""
    phase = "alignment"

    def __init__(self, cfg: Config, rt: Runtime, models: Models, public: tuple[torch.Tensor, torch.Tensor]):
        self.cfg, self.rt, self.models, self.public = cfg, rt, models, public
        self.student = AlignmentStudent(models.proxy_dir, cfg.model.dtype)

    def due(self, round_index: int) -> bool:
        f = self.cfg.fed
        return (round_index + 1) % f.align_every == 0 and round_index + 1 < f.rounds

    def recorder(self) -> ActivationRecorder:
        """Activation statistics of the compressed layers (each rank over the rows it computes)."""
        return ActivationRecorder(self.models.client.get_base_model(), self.models.compressed_layers,
                                  self.cfg.proxy.eps)

    def __call__(self, round_index: int, recorder: Optional[ActivationRecorder], state: RoundState) -> dict:
        from fedpft_kernels import ActivationStats

        layers, models = self.models.compressed_layers, self.models
        flat = {f"layer{l}": recorder.stats[l].to_flat() for l in layers}
        flat = self.rt.comm.all_reduce_sum(flat, name="aggregate/activations")
        stats = {l: ActivationStats.from_flat(flat[f"layer{l}"]) for l in layers}
        # ZeRO stages 0-2: the FM every rank holds for evaluation is the teacher, the global adapter in
        # it since this round's aggregation. ZeRO-3 loads a partitioned teacher instead.
        fm = models.fm_backbone if self.cfg.distill.zero_stage < 3 else None
        # the new FFN tensors go into the clients' proxy as they come (a layer at a time at ZeRO-3),
        # only once every rank found all of them finite
        result = align_neurons(self.cfg, self.rt, self.student, models.client_backbone, models.client_prefix,
                               layers, state.global_adapter, stats, self.public, round_index, fm,
                               sink=lambda part: load_full_state(models.client_backbone, part))
        if not result.finite:
            # Every rank agreed: loaded, these weights would make every later client update non-finite.
            log.warning("round %d: neuron-level alignment gave non-finite values; the proxy keeps its FFN "
                        "weights (lower fed.align_lr)", round_index + 1)
            state.align_skipped += 1
            return {"align_skipped": True, "align_steps": result.steps}
        metrics = alignment_metrics(result)
        state.alignment_rounds += 1
        state.ffn_bytes_per_alignment = metrics["align_ffn_bytes"]
        return {"align_skipped": False, **metrics}


def neuron_alignment(cfg: Config, rt: Runtime, models: Models, tokenizer: Any) -> Optional[NeuronAlignment]:
    """FedPFT's step for this run, with the public text it distils on (None: ``fed.align_every`` 0)."""
    if cfg.fed.align_every <= 0:
        return None
    return NeuronAlignment(cfg, rt, models, public_pair(cfg, tokenizer))

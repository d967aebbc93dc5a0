"""The round loop's phases after aggregation, as callbacks.

After each round's aggregation (and the method's server step) the engine calls every callback of its
list in order, on every rank, with the round's :class:`RoundContext`; each returns an
:class:`AfterRound`: entries for the round's metrics row, and whether the run stops after this round.
The standard list, in order: :class:`Evaluation`, :class:`Fidelity`, :class:`Recording`,
:class:`DivergenceCheck`, :class:`Checkpointing`. Callbacks that run collectives run them on every
rank in every round they are due, so every rank calls the same collectives in the same order.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..alignment.fidelity import FidelitySetting, common_layers, gradient_fidelity
from ..checkpoint import move_aside, save_checkpoint
from ..config import Config, parse_adapter_layers
from ..environment import StopSignals
from ..errors import TrainingDiverged
from ..models.adapters import set_adapter
from ..models.families import transformer_layers
from ..models.proxy import ActivationRecorder
from ..runtime import Runtime
from .aggregation import Aggregator
from .evaluation import evaluate
from .recording import PhaseClock
from .run_models import Models
from .run_parts import RunParts
from .sampling import client_seed
from .transfer import TransferSetting, update_transfer

log = logging.getLogger(__name__)

CLIENT_PARTS = ("slice", "set_up", "compute", "collect", "accumulate")


@dataclass
class RoundHooks:
    """Public extension points of the round loop, called on every rank.

    ``before_aggregate()`` runs right before the aggregation's collectives (a benchmark puts a barrier
    there; its duration is recorded as the round's ``wait``). ``after_round(record)`` receives this
    rank's record of each round: round, clients, tokens, aggregation bytes and the phase seconds."""
    before_aggregate: Optional[Callable[[], None]] = None
    after_round: Optional[Callable[[dict], None]] = None


@dataclass
class RoundPlan:
    """The shared decisions of one round (identical on every rank)."""
    index: int                      # 0-based
    sampled: list[int]
    mine: list[int]                 # the sampled clients this rank trains
    lr: float
    server_step: bool               # the method's server step runs after this round's aggregation
    evaluate: bool
    fidelity: bool


@dataclass
class LocalResult:
    """What this rank's clients produced in one round, before the all-reduce."""
    aggregator: Aggregator
    loss_sum: float = 0.0
    loss_count: float = 0.0
    tokens: float = 0.0
    recorder: Optional[ActivationRecorder] = None   # what the server step asked the clients to record
    # seconds over this rank's clients by part: slice (the client's rows), set_up, compute, collect
    # (ClientUpdate.seconds), accumulate (into the aggregator's sums)
    client_seconds: dict = field(default_factory=lambda: dict.fromkeys(CLIENT_PARTS, 0.0))


@dataclass
class RoundContext:
    """One round as the callbacks see it, after its aggregation."""
    plan: RoundPlan
    local: LocalResult
    row: dict                       # the round's metrics row so far (earlier callbacks' entries added)
    seconds: dict[str, float]       # the round's phase seconds so far
    started: float                  # time.perf_counter() at the round's start


@dataclass
class AfterRound:
    """What a callback returns."""
    metrics: dict = field(default_factory=dict)   # entries for the round's metrics row
    stop: Optional[str] = None                    # the run stops after this round, for this reason


class RoundCallback:
    """A phase of every round after aggregation; the base class does nothing."""

    def before_rounds(self) -> None:
        """Before the first round this invocation trains."""

    def after_aggregation(self, ctx: RoundContext) -> AfterRound:
        return AfterRound()

    def summary(self) -> dict:
        """Entries of the run's summary."""
        return {}


# The emulator's metrics beside the FM's in a FedOT run's evaluation rows (prefixed emulator_).
EMULATOR_KEYS_CAUSAL = ("test_loss", "perplexity", "next_token_accuracy")
EMULATOR_KEYS_CLASSIFICATION = ("accuracy", "macro_f1")


class Evaluation(RoundCallback):
    """The FM with the global adapter on the test set, sharded over ranks, in the rounds the plan
    says (and, with ``fed.eval_initial``, before round 1); keeps the best value of the headline metric
    in the round state."""

    def __init__(self, cfg: Config, rt: Runtime, parts: RunParts, clock: PhaseClock):
        self.cfg, self.rt, self.parts, self.clock = cfg, rt, parts, clock
        self.last: dict = {}

    def measure(self) -> dict:
        p = self.parts
        p.models.plug(p.state.global_adapter)   # a no-op after a round, which plugs it after aggregation
        out = evaluate(self.rt, p.models.evaluate, p.task, self.cfg.fed.eval_batch_size)
        if p.method.evaluates_client:
            out.update(self.on_client())
        return out

    def on_client(self) -> dict:
        """The plug-in gap (FedOT): the global adapter on the client model itself (the emulator), with
        the same test rows and the same collectives as on the FM, as ``emulator_*`` keys. A sharded
        client model is not measured (its forwards are collectives of the client group, whose ranks
        hold different test rows): the keys are None."""
        p = self.parts
        keys = EMULATOR_KEYS_CAUSAL if p.task.causal_lm else EMULATOR_KEYS_CLASSIFICATION
        if self.cfg.fed.client_sharding != "none":
            return {f"emulator_{k}": None for k in keys}
        # the client model holds the last client's adapter: every client's training sets the global one first
        set_adapter(p.models.client, p.state.global_adapter)
        got = evaluate(self.rt, p.models.client, p.task, self.cfg.fed.eval_batch_size)
        return {f"emulator_{k}": got[k] for k in keys}

    def before_rounds(self) -> None:
        state = self.parts.state
        if self.cfg.fed.eval_initial and state.round == 0:
            # The starting adapter changes nothing (LoRA B = 0; a classifier's head is fresh): the FM as it is.
            with self.clock.timed({}, "evaluation"):
                state.initial_eval = {f"initial_{k}": v for k, v in self.measure().items()}

    def after_aggregation(self, ctx: RoundContext) -> AfterRound:
        if not ctx.plan.evaluate:
            return AfterRound()
        with self.clock.timed(ctx.seconds, "evaluation"):
            self.last = self.measure()
        state, value = self.parts.state, self.last[self.parts.primary]
        better = min if self.parts.task.causal_lm else max
        state.best = value if state.best is None else better(state.best, value)
        return AfterRound(self.last)

    def summary(self) -> dict:
        last, best, causal = self.last, self.parts.state.best, self.parts.task.causal_lm
        # Classification keys stay None for a causal LM: next-token accuracy is not a class accuracy.
        out = {"final_accuracy": last.get("accuracy"), "best_accuracy": None if causal else best,
               "final_macro_f1": last.get("macro_f1"), "final_predicted_per_class": last.get("predicted_per_class")}
        if causal:
            out.update({"final_perplexity": last.get("perplexity"), "best_perplexity": best,
                        "final_next_token_accuracy": last.get("next_token_accuracy"),
                        "final_test_loss": last.get("test_loss")})
        # The plug-in gap at the end (FedOT): the same adapter's metrics on the emulator.
        out.update({f"final_{k}": v for k, v in last.items() if k.startswith("emulator_")})
        return out


class Fidelity(RoundCallback):
    """Gradient fidelity of the client model with the global adapter against the FM's on the probe
    set (all ranks), and the transfer of k local steps from it, in the rounds the plan says."""

    def __init__(self, cfg: Config, rt: Runtime, parts: RunParts, clock: PhaseClock):
        self.cfg, self.rt, self.parts, self.clock = cfg, rt, parts, clock
        self.setting = fidelity_setting(cfg, parts.task.causal_lm, parts.models, parts.layer_token)
        self.last: dict = {}

    def after_aggregation(self, ctx: RoundContext) -> AfterRound:
        if not ctx.plan.fidelity:
            return AfterRound()
        p, f = self.parts, self.cfg.fed
        m = p.models
        sharded = p.groups if f.client_sharding != "none" else None
        with self.clock.timed(ctx.seconds, "fidelity"):
            self.last = gradient_fidelity(self.rt, m.client, m.evaluate, p.state.global_adapter, m.to_fm, p.probe,
                                          self.setting, sharded)
            if f.fidelity_transfer_steps:
                transfer = transfer_setting(self.cfg, p.task.causal_lm, ctx.plan.lr, ctx.plan.index)
                self.last.update(update_transfer(m.client, m.evaluate, p.state.global_adapter, m.to_fm, p.probe,
                                                 transfer, p.groups.comm if sharded else None,
                                                 self.rt.comm if self.cfg.model.fm_sharding != "none" else None))
                m.plugged = None   # the FM's adapter was moved and put back: plug it again when needed
        return AfterRound(self.last)

    def summary(self) -> dict:
        # at the last round that measured it (None: not measured)
        return {"final_grad_cosine": self.last.get("grad_cosine"),
                "final_grad_cosine_common": self.last.get("grad_cosine_common"),
                "final_grad_example_cosine": self.last.get("grad_example_cosine"),
                "final_grad_rel_error": self.last.get("grad_rel_error"),
                "final_transfer": self.last.get("transfer")}


def fidelity_setting(cfg: Config, causal: bool, models: Models, layer_token: str) -> FidelitySetting:
    """The monitor's setting: the common layers are an emulator's adapter layers of this FM."""
    layers = len(transformer_layers(models.evaluate.get_base_model()))
    return FidelitySetting(causal, layer_token,
                           common_layers(layers, *parse_adapter_layers(cfg.fed.fedot_adapter_layers)), cfg.run.seed,
                           batch_size=cfg.fed.fidelity_batch_size or cfg.fed.batch_size)


def transfer_setting(cfg: Config, causal: bool, lr: float, round_index: int) -> TransferSetting:
    """k = fed.fidelity_transfer_steps of the clients' optimizer at ``lr``, seeded by the round as a
    client one past the last would be (no client trains with this seed)."""
    f = cfg.fed
    return TransferSetting(f.fidelity_transfer_steps, f.batch_size, lr, f.weight_decay, causal,
                           client_seed(cfg.run.seed, round_index, f.num_clients))


class RoundAdapters(RoundCallback):
    """With ``fed.save_round_adapters``, rank 0 writes each round's global adapter as the FM holds it
    (FM module names) to ``<run.dir>/round_adapters/round-NNNNNN/``: a fixed trajectory that
    ``fedpft fidelity --trajectory`` scores any client model along. A fresh run moves an earlier
    run's trajectory aside."""

    def __init__(self, cfg: Config, rt: Runtime, parts: RunParts):
        self.cfg, self.rt, self.parts = cfg, rt, parts
        root = parts.layout.round_adapters
        if rt.is_main and not cfg.fed.resume and root.exists():
            log.warning("moved an earlier run's round adapters to %s", move_aside(root))

    def after_aggregation(self, ctx: RoundContext) -> AfterRound:
        p, f = self.parts, self.cfg.fed
        if self.rt.is_main:
            meta = {"round": ctx.plan.index + 1, "method": f.method, "model": self.cfg.model.path,
                    "lora_r": f.lora_r, "lora_alpha": f.lora_alpha, "lora_targets": f.lora_targets,
                    "seed": self.cfg.run.seed}
            save_checkpoint(p.layout.round_adapters, f"round-{ctx.plan.index + 1:06d}",
                            {"adapter": p.models.to_fm(p.state.global_adapter)}, meta)
        return AfterRound()


class Recording(RoundCallback):
    """The round's metrics row (with its phase seconds) to metrics.jsonl and the trackers, the
    progress bar, and this rank's record of the round to ``RoundHooks.after_round``."""

    def __init__(self, parts: RunParts, hooks: RoundHooks):
        self.parts, self.hooks = parts, hooks

    def after_aggregation(self, ctx: RoundContext) -> AfterRound:
        seconds, row, local = ctx.seconds, ctx.row, ctx.local
        seconds["round"] = time.perf_counter() - ctx.started
        row["seconds"] = {k: round(v, 4) for k, v in seconds.items()}
        self.parts.metrics.append(row)
        self.parts.progress.round_done(row, ("train_loss", self.parts.primary))
        if self.hooks.after_round is not None:
            self.hooks.after_round({"round": ctx.plan.index + 1, "clients": len(ctx.plan.mine),
                                    "tokens": local.tokens, "aggregation_bytes": row["aggregation_bytes"], **seconds,
                                    **{f"client_{k}": v for k, v in local.client_seconds.items()},
                                    **{k: row[k] for k in ("align_step_seconds", "align_set_up_seconds") if k in row}})
        return AfterRound()


class DivergenceCheck(RoundCallback):
    """Stop a run whose every client update was non-finite ``fed.max_excluded_rounds`` rounds in a
    row (the streak comes from the all-reduce: every rank stops together)."""

    def __init__(self, cfg: Config, parts: RunParts):
        self.cfg, self.parts = cfg, parts

    def after_aggregation(self, ctx: RoundContext) -> AfterRound:
        limit, streak = self.cfg.fed.max_excluded_rounds, self.parts.state.excluded_streak
        if limit and streak >= limit:
            index = ctx.plan.index
            raise TrainingDiverged(f"fed.max_excluded_rounds: every client update was non-finite in {streak} "
                                   f"consecutive rounds ({index + 2 - streak}-{index + 1}), so training cannot "
                                   f"progress; lower fed.lr (now {self.cfg.fed.lr:g})")
        return AfterRound()


class Checkpointing(RoundCallback):
    """The round checkpoint when due, and the end of this invocation when ``fed.stop_after`` rounds
    are done or a stop signal reached any rank (one collective every round decides, on every rank);
    a stop always writes a checkpoint first."""

    def __init__(self, cfg: Config, rt: Runtime, parts: RunParts, signals: StopSignals):
        self.cfg, self.rt, self.parts, self.signals = cfg, rt, parts, signals

    def after_aggregation(self, ctx: RoundContext) -> AfterRound:
        f, rt, p = self.cfg.fed, self.rt, self.parts
        done = p.state.round
        signalled = rt.comm.agree(self.signals.received is not None, op="max", name="round/stop-signal")
        planned = f.stop_after > 0 and done - p.start_round >= f.stop_after
        stopping = (signalled or planned) and done < f.rounds
        if p.checkpointer.due(done, f.rounds, stopping):
            # an aligned proxy's FFN tensors, from the client model (gathered when it is sharded)
            ffn = p.models.proxy_ffn(keep=rt.is_main) if p.state.alignment_rounds else None
            if rt.is_main:
                p.checkpointer.save(p.state, rt.world_size, ffn)
            rt.comm.barrier(name="checkpoint/round")
        if not stopping:
            return AfterRound()
        if signalled:
            log.warning("stopping after round %d on %s: checkpoint written; resume with fed.resume=true", done,
                        self.signals.received or "a stop signal (another rank)")
            return AfterRound(stop="signal")
        log.info("stopping after round %d as fed.stop_after asks; resume with fed.resume=true", done)
        return AfterRound(stop="stop_after")

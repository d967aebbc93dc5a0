"""The federated engine. Every rank hosts virtual clients and runs the same round loop, calling the
same collectives in the same order:

    sample     the round's clients, shared out over client groups (a pure function of seed and round);
               a group is one rank, or ``dist.ranks_per_client`` ranks that split each batch
    train      this group's clients, one after another, from the global adapter
    aggregate  one all-reduce of every rank's weighted float64 sums gives every rank the new adapter,
               which the FM of plug-in evaluation then holds
    server     the method's step after aggregation, in the rounds it asks for (FedPFT: neuron-level
               alignment of the proxy every ``fed.align_every`` rounds, on all ranks)
    callbacks  evaluation of the FM on the test set, gradient fidelity of the client model, the
               metrics row, the divergence check, the round checkpoint and the stop signals
               (SIGTERM, SIGUSR1 seen by any rank end the run after a checkpoint)

What a run is made of (task, models, state, ...) is built once by
:func:`~fedpft_dist.federation.run_parts.build_run`. The method (``fed.method``) decides what the
clients hold and what the server does after aggregation; the aggregator (``fed.aggregation``) how
updates are weighted. Benchmarks and monitors attach through :class:`RoundHooks`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from ..config import Config
from ..environment import StopSignals, fault_point
from ..fsutil import atomic_directory, atomic_write_json
from ..runtime import Runtime, init_from_config
from ..runtime import phase as job_phase
from .aggregation import Reduced, make_aggregator
from .callbacks import (Checkpointing, DivergenceCheck, Evaluation, Fidelity, LocalResult, Recording, RoundAdapters,
                        RoundCallback, RoundContext, RoundHooks, RoundPlan)
from .client import train_client
from .recording import PhaseClock
from .run_parts import RunParts, build_run
from .sampling import assign_to_ranks, client_seed, round_lr, sample_clients

log = logging.getLogger(__name__)

PHASES = ("local_training", "aggregation", "alignment", "evaluation", "fidelity")

__all__ = ["Engine", "RoundHooks", "RoundPlan", "run_federated"]


@dataclass
class Engine:
    """One federated run of ``cfg`` on the ranks of ``rt``: ``run()`` returns the summary (the same
    shape whether the run finished or stopped early at ``fed.stop_after``). After it, ``parts``
    holds the live objects (benchmarks measure on its models, task and state)."""
    cfg: Config
    rt: Runtime
    hooks: RoundHooks = field(default_factory=RoundHooks)
    # SIGTERM / SIGUSR1 seen while run() is active; what ended the rounds early ("signal", "stop_after")
    signals: StopSignals = field(default_factory=StopSignals)
    stop_reason: Optional[str] = None
    parts: Optional[RunParts] = field(default=None, init=False)      # built by run()
    callbacks: list[RoundCallback] = field(default_factory=list, init=False)
    clock: PhaseClock = field(default_factory=lambda: PhaseClock(PHASES), init=False)

    def run(self) -> dict:
        t_start = time.perf_counter()
        ok = False
        try:
            with self.signals:
                self.clock.device = self.rt.device
                self.parts = build_run(self.cfg, self.rt)
                self.callbacks = self.standard_callbacks(self.parts)
                for callback in self.callbacks:
                    callback.before_rounds()
                stopped = self.run_rounds()
            summary = self.finish(stopped, time.perf_counter() - t_start)
            ok = True
            return summary
        finally:
            if self.parts is not None:
                self.parts.close(ok)

    def standard_callbacks(self, parts: RunParts) -> list[RoundCallback]:
        """The phases after aggregation, in the order they run."""
        cfg, rt = self.cfg, self.rt
        saving = [RoundAdapters(cfg, rt, parts)] if cfg.fed.save_round_adapters else []
        return [Evaluation(cfg, rt, parts, self.clock), Fidelity(cfg, rt, parts, self.clock), *saving,
                Recording(parts, self.hooks), DivergenceCheck(cfg, parts), Checkpointing(cfg, rt, parts, self.signals)]

    # ------------------------------------------------------------------------------------------------
    # The rounds
    # ------------------------------------------------------------------------------------------------

    def run_rounds(self) -> bool:
        """Rounds from the state's round to ``fed.rounds``; True when a callback stopped them early."""
        p = self.parts
        for t in range(p.state.round, self.cfg.fed.rounds):
            t_round = time.perf_counter()
            seconds: dict[str, float] = {}
            # -- 1. sample: the round's clients and who trains them (the same on every rank) -----------
            plan = self.plan(t)
            # -- 2. train this rank's clients -----------------------------------------------------------
            with self.clock.timed(seconds, "local_training"):
                local = self.train_clients(plan)
            fault_point("aggregation", t + 1, self.rt.rank)
            # -- 3. aggregate: one all-reduce of sum(w_c * theta_c) and sum(w_c); the FM takes the result
            with self.clock.timed(seconds, "aggregation", release=False):
                row = self.aggregate(plan, local, seconds)
            p.models.plug(p.state.global_adapter)
            # -- 4. the method's server step ------------------------------------------------------------
            if plan.server_step:
                fault_point(p.server_step.phase, t + 1, self.rt.rank)
                with self.clock.timed(seconds, p.server_step.phase, collect=True):
                    row.update(p.server_step(plan.index, local.recorder, p.state))
            p.state.round = t + 1
            # -- 5. callbacks: evaluate, fidelity, record, divergence check, checkpoint and stop ---------
            ctx = RoundContext(plan, local, row, seconds, t_round)
            stop = None
            for callback in self.callbacks:
                fault_point(type(callback).__name__.lower(), t + 1, self.rt.rank)
                with job_phase(type(callback).__name__.lower()):
                    after = callback.after_aggregation(ctx)
                row.update(after.metrics)
                stop = stop or after.stop
            if stop:
                self.stop_reason = stop
                return True
        return False

    def plan(self, t: int) -> RoundPlan:
        f, p = self.cfg.fed, self.parts
        sampled = sample_clients(f.num_clients, p.clients_per_round, self.cfg.run.seed, t)
        # shared out over client groups (one group per rank when dist.ranks_per_client is 1)
        mine = assign_to_ranks(sampled, [p.cost[c] for c in sampled], p.groups.count)[p.groups.index]
        evaluate = (t + 1) % f.eval_every == 0 or t + 1 == f.rounds
        every = f.fidelity_every
        # gradient fidelity compares the client model with the FM: nothing to compare when they are one.
        # Whole layers tuned in full (FedOT's default) are not measured: per-example gradients of whole
        # layers would take probe examples x layer parameters of memory.
        monitoring = p.method.uses_proxy and every != 0 and not p.method.full_tuning(self.cfg)
        return RoundPlan(t, sampled, mine, round_lr(f.lr, f.lr_schedule, t, f.rounds),
                         server_step=p.server_step is not None and p.server_step.due(t),
                         evaluate=evaluate,
                         fidelity=monitoring and (evaluate if every < 0 else (t + 1) % every == 0))

    def train_clients(self, plan: RoundPlan) -> LocalResult:
        """Each of this rank's clients starts from the global adapter; its update goes into this rank's
        aggregator (a non-finite one is counted and left out). In a client group every rank trains
        the group's clients on its share of each batch, and only the leader adds the (identical)
        adapters; every rank adds its share of the loss and tokens. In rounds the server step follows,
        the clients record what it asks for on the way (each rank over the rows it computed)."""
        f, p = self.cfg.fed, self.parts
        models, groups, state = p.models, p.groups, p.state
        recorder = p.server_step.recorder() if plan.server_step else None
        local = LocalResult(make_aggregator(f.aggregation, state.global_adapter), recorder=recorder)
        p.progress.start_clients(plan.index + 1, len(plan.mine))
        spent = local.client_seconds
        for c in plan.mine:
            t0 = time.perf_counter()
            data = p.task.client(c)
            spent["slice"] += time.perf_counter() - t0
            upd = train_client(models.client, state.global_adapter, data, f.local_epochs,
                               f.batch_size, plan.lr, f.weight_decay, client_seed(self.cfg.run.seed, plan.index, c),
                               recorder, f.prox_mu, groups.comm, f.head_lr_scale, f.grad_accum)
            p.progress.client_done()
            t0 = time.perf_counter()
            if local.aggregator.accumulate(upd.adapter, local.aggregator.weight(upd), contribute=groups.leader):
                local.loss_sum += upd.loss_sum
                local.loss_count += upd.loss_count if groups.leader else 0
                local.tokens += upd.tokens
            spent["accumulate"] += time.perf_counter() - t0
            for part, sec in upd.seconds.items():
                spent[part] += sec
        models.clients_trained()
        p.progress.end_clients()
        if recorder is not None:
            recorder.close()
        return local

    def aggregate(self, plan: RoundPlan, local: LocalResult, seconds: dict[str, float]) -> dict:
        """The all-reduce and the new global adapter; returns the round's metrics row so far."""
        rt, state, server = self.rt, self.parts.state, self.parts.server
        if self.hooks.before_aggregate is not None:
            t0 = time.perf_counter()
            self.hooks.before_aggregate()
            seconds["wait"] = time.perf_counter() - t0
        # Every rank's local training time and tokens, in its own slot (the others send zeros): rank 0
        # learns the load balance of the round from the same collective.
        per_rank = torch.zeros(2, rt.world_size, dtype=torch.float64)
        per_rank[:, rt.rank] = torch.tensor([seconds["local_training"], local.tokens])
        extra = {"stats": torch.tensor([local.loss_sum, local.loss_count], dtype=torch.float64),
                 "per_rank": per_rank}
        red: Reduced = local.aggregator.reduce(rt.comm, extra)
        seconds["allreduce"] = red.allreduce_seconds
        if red.mean is not None:
            # the same mean and server state on every rank: the same step everywhere
            state.global_adapter = server.step(state.global_adapter, red.mean)
            state.server_opt = server.state()
        state.excluded_clients += red.excluded
        everyone_out = red.excluded >= len(plan.sampled)
        state.excluded_streak = state.excluded_streak + 1 if everyone_out else 0
        if everyone_out:
            log.warning("round %d: every client's update was non-finite and left out (%d of %d): the global "
                        "adapter did not change; lower fed.lr (now %g at this round)", plan.index + 1, red.excluded,
                        len(plan.sampled), plan.lr)
        loss_sum, loss_count = red.extra["stats"].tolist()
        rank_seconds, rank_tokens = red.extra["per_rank"].tolist()
        # train_loss: mean over examples (classification) or next-token targets (causal LM); NaN
        # when no update counted (all excluded)
        return {"round": plan.index + 1, "lr": plan.lr, "clients": len(plan.sampled), "excluded_clients": red.excluded,
                "all_updates_finite": red.all_finite, "train_loss": loss_sum / loss_count if loss_count else float("nan"),
                "local_seconds_per_rank": [round(x, 4) for x in rank_seconds],
                "tokens_per_rank": [int(x) for x in rank_tokens], "aggregation_bytes": red.payload_bytes}

    # ------------------------------------------------------------------------------------------------
    # After the last round
    # ------------------------------------------------------------------------------------------------

    def finish(self, stopped: bool, wall_seconds: float) -> dict:
        """The summary (every rank); a finished run's adapter and summary.json are written by rank 0."""
        p = self.parts
        p.progress.close()
        phase = self.rt.comm.all_reduce_metrics(self.clock.total, op="max", name="summary/phase-seconds")
        summary = self.summary(phase, wall_seconds, stopped)
        summary.update(self.memory_summary())
        if not stopped and self.cfg.model.fm_sharding != "none":
            # a sharded FM: every rank plugs its shards of the adapter in, rank 0 writes the adapter whole
            p.models.plug(p.state.global_adapter)
            saved = p.models.to_fm(p.state.global_adapter)
        if self.rt.is_main and not stopped:
            p.models.plug(p.state.global_adapter)
            with atomic_directory(p.layout.adapter) as tmp:
                if self.cfg.model.fm_sharding != "none":   # peft's own two files, from the whole tensors
                    p.models.evaluate.peft_config["default"].save_pretrained(str(tmp))
                    save_file({k: v.contiguous() for k, v in saved.items()}, str(Path(tmp) / "adapter_model.safetensors"))
                else:
                    p.models.evaluate.save_pretrained(str(tmp))
            atomic_write_json(p.layout.summary, summary)
        self.rt.comm.barrier(name="summary/written")
        return summary

    def memory_summary(self) -> dict:
        """Measured memory, the most over the ranks, in MiB: each phase's peak (the models' build,
        then the round phases that ran), and on the CPU the baseline the peaks include: the resident
        set before the models were built (the interpreter, the libraries and the data), or with
        run.exact_memory the resident set less the models' tensors once they are built. The same
        collective on every rank: phases that did not run are -1 everywhere."""
        p = self.parts
        phases = {"models": p.memory.get("models"), **{k: self.clock.peak.get(k) for k in PHASES},
                  "baseline": p.memory.get("baseline"), "before_models": p.memory.get("baseline_before_models")}
        got = self.rt.comm.all_reduce_metrics({k: float(-1 if v is None else v) for k, v in phases.items()}, op="max",
                                              name="summary/peak-memory")
        mib = {k: (round(v / 2**20, 1) if v >= 0 else None) for k, v in got.items()}
        return {"peak_memory_mb": {k: v for k, v in mib.items() if k not in ("baseline", "before_models")},
                "memory_baseline_mb": mib["baseline"],
                # run.exact_memory on the CPU: the baseline is the resident set less the models' tensors
                # once they are built; this is the resident set before they were
                "memory_before_models_mb": mib["before_models"],
                "peak_memory_kind": "cuda_max_allocated" if self.rt.device.type == "cuda" else "rss",
                # on the CPU: whether freed blocks went back to the system at once (run.exact_memory)
                "memory_exact": bool(p.memory.get("exact"))}

    def summary(self, phase: dict, wall_seconds: float, stopped: bool) -> dict:
        f, p = self.cfg.fed, self.parts
        s, task, models = p.state, p.task, p.models
        mean_tokens = float(task.train_mask.sum()) / max(1, len(task.train_ids))
        out = {
            "method": f.method, "task": task.kind, "rounds": f.rounds, "rounds_done": s.round,
            "stopped_early": stopped, "stop_reason": self.stop_reason if stopped else None,
            "world_size": self.rt.world_size,
            "num_clients": f.num_clients, "clients_per_round": p.clients_per_round, "dataset": self.cfg.data.dataset,
            "partition": f.partition, "lora_targets": f.lora_targets, "server_optimizer": f.server_optimizer,
            "full_tuning": p.method.full_tuning(self.cfg),
            "prox_mu": f.prox_mu, "excluded_clients": s.excluded_clients, "phase_seconds": phase,
            "bytes_up_per_client": p.up_bytes,
            "bytes_down_per_client": p.up_bytes + (s.ffn_bytes_per_alignment * s.alignment_rounds / f.rounds
                                                   if s.alignment_rounds else 0),
            "ffn_bytes_per_alignment": s.ffn_bytes_per_alignment, "alignment_rounds": s.alignment_rounds,
            "align_skipped": s.align_skipped,
            # what a client tunes and sends: the adapter's elements (LoRA, a classifier's head, FedOT's
            # whole adapter layers, ...)
            "trainable_params": sum(v.numel() for v in s.global_adapter.values()),
            "client_params": models.client_params, "fm_params": models.fm_params,
            # client groups: ranks per client, and the client model's parameter bytes one rank holds
            "ranks_per_client": p.groups.size, "client_sharding": f.client_sharding,
            "client_bytes_per_rank": models.client_bytes_per_rank,
            # the FM of evaluation: whole on every rank, or sharded (model.fm_sharding) and one rank's share
            "fm_sharding": self.cfg.model.fm_sharding, "fm_bytes_per_rank": models.fm_bytes_per_rank,
            # ~6 FLOPs per non-embedding parameter per token for a training step (forward + backward)
            "client_train_flops_per_example": 6 * models.client_nonembedding_params * mean_tokens,
            "wall_seconds": wall_seconds, "startup_seconds": p.startup,
            **s.initial_eval,
        }
        for callback in self.callbacks:
            out.update(callback.summary())
        return out


def run_federated(cfg: Config, hooks: Optional[RoundHooks] = None) -> dict:
    """A federated run of ``cfg`` on the ranks this process was launched with; returns the summary."""
    with init_from_config(cfg) as rt:
        return Engine(cfg, rt, hooks or RoundHooks()).run()

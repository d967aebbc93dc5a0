"""The federated engine (Stage 3 and DESIGN §3). Every rank hosts virtual clients and runs the same
round loop, calling the same collectives in the same order:

    sample   the round's clients, shared out over client groups (a pure function of seed and round);
             a group is one rank, or ``dist.ranks_per_client`` ranks that split each batch
    train    this group's clients, one after another, from the global adapter
    aggregate  one all-reduce of every rank's weighted float64 sums gives every rank the new adapter
    align    every ``fed.align_every`` rounds (not the last: nothing would train on it), neuron-level
             distillation of the proxy on all ranks
    evaluate   the FM with the global adapter on the test set, sharded over ranks
    fidelity   the client model's LoRA gradients against the FM's on a fixed probe set
    record   metrics row (rank 0), progress, round checkpoint; a stop signal (SIGTERM, SIGUSR1) seen
             by any rank ends the run here, after a checkpoint

The method (``fed.method``) decides what the clients hold and whether the run aligns; the aggregator
(``fed.aggregation``) how updates are weighted. Benchmarks and monitors attach through
:class:`RoundHooks`.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from ..alignment.fidelity import gradient_fidelity, probe_data, probe_indices
from ..alignment.stages import align_neurons, alignment_metrics, public_pair
from ..checkpoint import move_aside
from ..config import Config, write_resolved_config
from ..data.tasks import Task, prepare_task
from ..environment import StopSignals, return_freed_memory
from ..errors import TrainingDiverged, UserError
from ..fingerprint import run_fingerprint
from ..fsutil import atomic_directory, atomic_write_json, filesystem_error, run_dir_problem
from ..models.adapters import adapter_bytes, get_adapter, set_adapter
from ..models.families import layers_prefix
from ..models.loading import load_tokenizer, resolve_model_dir, resolve_task
from ..models.proxy import ActivationRecorder
from ..run_layout import RunLayout
from ..runtime import ClientGroups, Runtime, init_from_config
from ..runtime.shard import load_full_state
from .aggregation import Aggregator, Reduced, make_aggregator
from .build import Models, build_models, check_client_sharding
from .client import train_client
from .evaluation import evaluate
from .methods import get_method
from .recording import MetricsLog, RoundProgress
from .trackers import missing_package, open_trackers
from .sampling import assign_to_ranks, client_seed, clients_per_round, round_lr, sample_clients
from .server_opt import ServerOptimizer, make_server_optimizer
from .state import Checkpointer, RoundState

log = logging.getLogger(__name__)

PHASES = ("local_training", "aggregation", "alignment", "evaluation", "fidelity")
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
    align: bool
    evaluate: bool
    fidelity: bool


@dataclass
class LocalResult:
    """What this rank's clients produced in one round, before the all-reduce."""
    aggregator: Aggregator
    loss_sum: float = 0.0
    loss_count: float = 0.0
    tokens: float = 0.0
    recorder: Optional[ActivationRecorder] = None
    # seconds over this rank's clients by part: slice (the client's rows), set_up, compute, collect
    # (ClientUpdate.seconds), accumulate (into the aggregator's sums)
    client_seconds: dict = field(default_factory=lambda: dict.fromkeys(CLIENT_PARTS, 0.0))


@dataclass
class Engine:
    """One federated run of ``cfg`` on the ranks of ``rt``: ``run()`` returns the summary (the same
    shape whether the run finished or stopped early at ``fed.stop_after``). After it, ``models``,
    ``task`` and ``state`` hold the live objects (benchmarks measure on them)."""
    cfg: Config
    rt: Runtime
    hooks: RoundHooks = field(default_factory=RoundHooks)
    # SIGTERM / SIGUSR1 seen while run() is active; what ended the rounds early ("signal", "stop_after")
    signals: StopSignals = field(default_factory=StopSignals)
    stop_reason: Optional[str] = None

    def run(self) -> dict:
        t_start = time.perf_counter()
        ok = False
        try:
            with self.signals:
                try:
                    self.prepare()
                    stopped = self.run_rounds()
                except BaseException:
                    if getattr(self, "progress", None) is not None:
                        self.progress.close()   # an error's line starts a line of its own
                    raise
            summary = self.finish(stopped, time.perf_counter() - t_start)
            ok = True
            return summary
        finally:
            # the trackers' files are complete whether the run ended well or not
            if getattr(self, "metrics", None) is not None:
                self.metrics.close(ok)

    # ------------------------------------------------------------------------------------------------
    # Before the first round
    # ------------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        cfg, rt, f = self.cfg, self.rt, self.cfg.fed
        self.layout = RunLayout.from_config(cfg)
        self.method = get_method(f.method)
        self.groups: ClientGroups = rt.client_groups(cfg.dist.ranks_per_client)
        check_client_sharding(cfg, self.method, self.groups)
        self._check_outputs()
        fm_dir = resolve_model_dir(cfg.model.path)
        # Before anything is written: the run's fingerprint, and either the checkpoint it resumes
        # from (which must have been written with the same) or a directory free of an earlier run's.
        client = self.method.client_fingerprint(cfg, self.layout) if self.method.client_fingerprint else None
        self.checkpointer = Checkpointer(self.layout.round_checkpoints, f.checkpoint_every,
                                         {"method": f.method, "seed": cfg.run.seed},
                                         run_fingerprint(cfg, fm_dir, client))
        resumed = None
        if f.resume:
            resumed = self._resume_point()
        else:
            self._clear_earlier_run()
        if rt.is_main:
            write_resolved_config(cfg)
        # Time to the first round, by part: tokenising the task, the models (with the proxy and its
        # layer-level distillation when this run makes them), the public text for alignment.
        self.startup: dict[str, float] = {}
        t0 = time.perf_counter()
        kind = resolve_task(cfg, fm_dir)
        tokenizer = load_tokenizer(fm_dir)
        self.task: Task = prepare_task(cfg, tokenizer, kind)
        self.startup["task"] = time.perf_counter() - t0
        self.models: Models = build_models(cfg, rt, self.method, self.layout, self.task.num_classes, fm_dir, kind,
                                           self.groups)
        return_freed_memory(collect=True)   # what building the client model (a distillation, say) left behind
        self.startup["models"] = time.perf_counter() - t0 - self.startup["task"]
        # The headline metric: accuracy (higher is better) or perplexity (lower is better).
        self.primary = "perplexity" if self.task.causal_lm else "accuracy"
        self.aligning = self.method.aligns and f.align_every > 0
        t1 = time.perf_counter()
        self.public = public_pair(cfg, tokenizer) if self.aligning else None
        self.startup["public_text"] = time.perf_counter() - t1
        # Gradient fidelity: the client model against the FM (the same model for fedpetuning: skipped).
        self.monitoring = self.method.uses_proxy and f.fidelity_every != 0
        self.probe = probe_data(self.task, probe_indices(self.task, f.fidelity_examples, cfg.run.seed))
        self.layer_token = layers_prefix(self.models.evaluate.get_base_model()).rsplit(".", 1)[-1]
        # The starting adapter: rank 0's, so every rank begins from the same tensors.
        # (every rank reads it: reading a sharded adapter is a collective of the client group)
        initial = get_adapter(self.models.client)
        start = rt.comm.broadcast_state(initial if rt.is_main else None, name="broadcast/initial-adapter")
        self.state = RoundState({k: v.cpu() for k, v in start.items()})
        self.server: ServerOptimizer = make_server_optimizer(f)
        self.up_bytes = adapter_bytes(self.state.global_adapter)
        self.k_round = clients_per_round(f.num_clients, f.client_fraction)
        self.cost = [float(self.task.train_mask[torch.as_tensor(p, dtype=torch.long)].sum()) * f.local_epochs
                     for p in self.task.parts]
        if rt.is_main and not f.resume:
            # The models are in place, so this run goes ahead: an earlier run's summary would describe
            # another run until this one writes its own.
            self.layout.summary.unlink(missing_ok=True)
        if resumed is not None:
            self.state = resumed
            if resumed.proxy_ffn is not None:
                load_full_state(self.models.client_backbone, resumed.proxy_ffn)
            if resumed.server_opt:
                self.server.load_state(resumed.server_opt)
        self.start_round = self.state.round
        self.metrics = self._open_metrics()
        self.phase = dict.fromkeys(PHASES, 0.0)
        self.progress = RoundProgress(rt.is_main, f.rounds, self.state.round, f"{f.method} rounds")
        self.last_eval: dict = {}
        self.last_fidelity: dict = {}
        self.startup["total"] = time.perf_counter() - t0
        if f.eval_initial and self.state.round == 0:
            # The starting adapter changes nothing (LoRA B = 0; a classifier's head is fresh): the FM as it is.
            with self._timed({}, "evaluation"):
                self.state.initial_eval = {f"initial_{k}": v for k, v in self._evaluate().items()}

    def _check_outputs(self) -> None:
        """Rank 0 writes the run's files and feeds the trackers: a run dir it cannot write stops every
        rank now, not at the first checkpoint, and a tracker package it lacks before the models take
        minutes to build."""
        rt, run_dir = self.rt, self.layout.run_dir
        problem = run_dir_problem(run_dir) if rt.is_main else None
        if rt.comm.agree(problem is not None, op="max", name="run-dir/writable"):
            raise UserError(problem or f"run.dir: rank 0 cannot write {run_dir} (see its error)")
        missing = missing_package(self.cfg.run.report_to) if rt.is_main else None
        if rt.comm.agree(missing is not None, op="max", name="trackers/packages"):
            raise UserError(missing or "run.report_to: rank 0 lacks a tracker's package (see its error)")

    def _open_metrics(self) -> MetricsLog:
        """metrics.jsonl and the trackers of ``run.report_to`` (rank 0). A tracker that cannot start
        there stops every rank (one collective), before metrics.jsonl is touched."""
        rt, problem, trackers = self.rt, None, []
        if rt.is_main:
            try:
                trackers = open_trackers(self.cfg, self.layout, self.state.round)
            except UserError as exc:
                problem = str(exc)
            except OSError as exc:   # tensorboard/ not writable, a full disk
                problem = filesystem_error(exc) or f"run.report_to: {exc}"
        if rt.comm.agree(problem is not None, op="max", name="trackers/started"):
            raise UserError(problem or "run.report_to: a tracker did not start on rank 0 (see its error)")
        return MetricsLog(self.layout.metrics, rt.is_main, self.state.round, trackers)

    def _resume_point(self) -> Optional[RoundState]:
        """The newest round checkpoint that verifies and was written with this run's fingerprint
        (None: there is none, the run starts at round 1). Every rank reads it; one collective checks
        that they all found the same round."""
        loaded = self.checkpointer.load_latest()
        mine = -1 if loaded is None else loaded.round
        seen = self.rt.comm.all_reduce_metrics({"newest": mine, "oldest": -mine}, op="max", name="resume/agree")
        if seen["newest"] != -seen["oldest"]:
            raise UserError(f"fed.resume: the ranks see different round checkpoints in {self.checkpointer.root} "
                            f"(rounds {int(-seen['oldest'])} to {int(seen['newest'])}): it must be one shared directory")
        if loaded is None:
            log.info("fed.resume: no round checkpoint in %s yet: starting at round 1", self.checkpointer.root)
        return loaded

    def _clear_earlier_run(self) -> None:
        """A fresh run never mixes with an earlier run's checkpoints: it stops (rank 0 looks, every rank
        learns what it saw), or with ``run.rebuild`` moves them aside."""
        rt, root = self.rt, self.checkpointer.root
        earlier = rt.comm.agree(rt.is_main and self.checkpointer.any(), op="max", name="checkpoint/earlier-run")
        if earlier and not self.cfg.run.rebuild:
            raise UserError(f"{root} holds round checkpoints of an earlier run: continue it with fed.resume=true, "
                            f"start afresh in a new run.dir, or set run.rebuild=true to move them aside")
        if rt.is_main and earlier:
            log.warning("moved the earlier run's round checkpoints to %s (run.rebuild=true)", move_aside(root))
        rt.comm.barrier(name="checkpoint/earlier-run-cleared")

    # ------------------------------------------------------------------------------------------------
    # The rounds
    # ------------------------------------------------------------------------------------------------

    def run_rounds(self) -> bool:
        """Rounds from the state's round to ``fed.rounds``; True when ``fed.stop_after`` ended them early."""
        f = self.cfg.fed
        for t in range(self.state.round, f.rounds):
            t_round = time.perf_counter()
            seconds: dict[str, float] = {}
            # -- 1. sample: the round's clients and who trains them (the same on every rank) ---------
            plan = self.plan(t)
            # -- 2. train this rank's clients -----------------------------------------------------------
            with self._timed(seconds, "local_training"):
                local = self.train_clients(plan)
            # -- 3. aggregate: one all-reduce of sum(w_c * theta_c) and sum(w_c) -------------------------
            with self._timed(seconds, "aggregation"):
                row = self.aggregate(plan, local, seconds)
            # -- 4. neuron-level alignment of the proxy ---------------------------------------------------
            if plan.align:
                with self._timed(seconds, "alignment"):
                    row.update(self.align(plan, local.recorder))
            # -- 5. plug the global adapter into the FM and evaluate -----------------------------------
            if plan.evaluate:
                with self._timed(seconds, "evaluation"):
                    self.last_eval = self._evaluate()
                row.update(self.last_eval)
                self._track_best(self.last_eval[self.primary])
            # -- 6. gradient fidelity of the client model ----------------------------------------------
            if plan.fidelity:
                with self._timed(seconds, "fidelity"):
                    self.last_fidelity = self.fidelity()
                row.update(self.last_fidelity)
            # -- 7. record: metrics row, progress, checkpoint ------------------------------------------
            seconds["round"] = time.perf_counter() - t_round
            row["seconds"] = {k: round(v, 4) for k, v in seconds.items()}
            self.record(plan, local, row, seconds)
            self._check_progress(plan)
            if self.end_of_round(t + 1):
                return True
        return False

    def plan(self, t: int) -> RoundPlan:
        f = self.cfg.fed
        sampled = sample_clients(f.num_clients, self.k_round, self.cfg.run.seed, t)
        # shared out over client groups (one group per rank when dist.ranks_per_client is 1)
        mine = assign_to_ranks(sampled, [self.cost[c] for c in sampled], self.groups.count)[self.groups.index]
        evaluate = (t + 1) % f.eval_every == 0 or t + 1 == f.rounds
        every = f.fidelity_every
        return RoundPlan(t, sampled, mine, round_lr(f.lr, f.lr_schedule, t, f.rounds),
                         # the FM is evaluated, not the proxy: aligning after the last round changes nothing
                         align=self.aligning and (t + 1) % f.align_every == 0 and t + 1 < f.rounds,
                         evaluate=evaluate,
                         fidelity=self.monitoring and (evaluate if every < 0 else (t + 1) % every == 0))

    def train_clients(self, plan: RoundPlan) -> LocalResult:
        """Each of this rank's clients starts from the global adapter; its update goes into this rank's
        aggregator (a non-finite one is counted and left out). In a client group every rank trains
        the group's clients on its share of each batch, and only the leader adds the (identical)
        adapters; every rank adds its share of the loss and tokens. In alignment rounds the proxy's
        activation statistics are collected on the way (each rank over the rows it computed)."""
        f, models, groups = self.cfg.fed, self.models, self.groups
        recorder = None
        if plan.align:
            recorder = ActivationRecorder(models.client.get_base_model(), models.compressed_layers, self.cfg.proxy.eps)
        local = LocalResult(make_aggregator(f.aggregation, self.state.global_adapter), recorder=recorder)
        self.progress.start_clients(plan.index + 1, len(plan.mine))
        spent = local.client_seconds
        for c in plan.mine:
            t0 = time.perf_counter()
            data = self.task.client(c)
            spent["slice"] += time.perf_counter() - t0
            upd = train_client(models.client, self.state.global_adapter, data, f.local_epochs,
                               f.batch_size, plan.lr, f.weight_decay, client_seed(self.cfg.run.seed, plan.index, c),
                               recorder, f.prox_mu, groups.comm, f.head_lr_scale)
            self.progress.client_done()
            t0 = time.perf_counter()
            if local.aggregator.accumulate(upd.adapter, local.aggregator.weight(upd), contribute=groups.leader):
                local.loss_sum += upd.loss_sum
                local.loss_count += upd.loss_count if groups.leader else 0
                local.tokens += upd.tokens
            spent["accumulate"] += time.perf_counter() - t0
            for part, sec in upd.seconds.items():
                spent[part] += sec
        self.progress.end_clients()
        if recorder is not None:
            recorder.close()
        return local

    def aggregate(self, plan: RoundPlan, local: LocalResult, seconds: dict[str, float]) -> dict:
        """The all-reduce and the new global adapter; returns the round's metrics row so far."""
        rt = self.rt
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
            self.state.global_adapter = self.server.step(self.state.global_adapter, red.mean)
            self.state.server_opt = self.server.state()
        self.state.excluded_clients += red.excluded
        everyone_out = red.excluded >= len(plan.sampled)
        self.state.excluded_streak = self.state.excluded_streak + 1 if everyone_out else 0
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

    def align(self, plan: RoundPlan, recorder: ActivationRecorder) -> dict:
        """Activation statistics summed over ranks, neuron-level distillation on all ranks, the new
        FFN weights loaded into this rank's proxy (the clients of the next round train on them)."""
        from fedpft_kernels import ActivationStats

        layers, models = self.models.compressed_layers, self.models
        flat = {f"layer{l}": recorder.stats[l].to_flat() for l in layers}
        flat = self.rt.comm.all_reduce_sum(flat, name="aggregate/activations")
        stats = {l: ActivationStats.from_flat(flat[f"layer{l}"]) for l in layers}
        fm = None
        if self.cfg.distill.zero_stage < 3:
            # The FM every rank holds for evaluation is the teacher, with the global adapter plugged in.
            set_adapter(models.evaluate, models.to_fm(self.state.global_adapter))
            fm = models.fm_backbone
        result = align_neurons(self.cfg, self.rt, models.proxy_dir, models.client_backbone, models.client_prefix,
                               layers, self.state.global_adapter, stats, self.public, plan.index, fm)
        if not result.finite:
            # Every rank agreed: loaded, these weights would make every later client update non-finite.
            log.warning("round %d: neuron-level alignment gave non-finite values; the proxy keeps its FFN "
                        "weights (lower fed.align_lr)", plan.index + 1)
            self.state.align_skipped += 1
            return {"align_skipped": True, "align_steps": result.steps}
        load_full_state(models.client_backbone, result.state)
        metrics = alignment_metrics(result)
        self.state.proxy_ffn = result.state
        self.state.alignment_rounds += 1
        self.state.ffn_bytes_per_alignment = metrics["align_ffn_bytes"]
        return {"align_skipped": False, **metrics}

    def fidelity(self) -> dict:
        """Gradient fidelity of the client model with the global adapter (all ranks, one all-reduce)."""
        m = self.models
        # in batches of the clients' size: a backward pass needs the activation memory training needs
        sharded = self.groups if self.cfg.fed.client_sharding != "none" else None
        return gradient_fidelity(self.rt, m.client, m.evaluate, self.state.global_adapter, m.to_fm, self.probe,
                                 self.cfg.fed.batch_size, self.task.causal_lm, self.layer_token, sharded)

    def _evaluate(self) -> dict:
        set_adapter(self.models.evaluate, self.models.to_fm(self.state.global_adapter))
        return evaluate(self.rt, self.models.evaluate, self.task, self.cfg.fed.eval_batch_size)

    def _track_best(self, value: float) -> None:
        best = self.state.best
        better = min if self.task.causal_lm else max
        self.state.best = value if best is None else better(best, value)

    def record(self, plan: RoundPlan, local: LocalResult, row: dict, seconds: dict[str, float]) -> None:
        self.metrics.append(row)
        self.progress.round_done(row, ("train_loss", self.primary))
        if self.hooks.after_round is not None:
            self.hooks.after_round({"round": plan.index + 1, "clients": len(plan.mine), "tokens": local.tokens,
                                    "aggregation_bytes": row["aggregation_bytes"], **seconds,
                                    **{f"client_{k}": v for k, v in local.client_seconds.items()},
                                    **{k: row[k] for k in ("align_step_seconds", "align_set_up_seconds") if k in row}})

    def _check_progress(self, plan: RoundPlan) -> None:
        """Stop a run whose every client update was non-finite ``fed.max_excluded_rounds`` rounds in a
        row (the streak comes from the all-reduce: every rank stops together)."""
        limit, streak = self.cfg.fed.max_excluded_rounds, self.state.excluded_streak
        if limit and streak >= limit:
            first = plan.index + 2 - streak
            raise TrainingDiverged(f"fed.max_excluded_rounds: every client update was non-finite in {streak} "
                                   f"consecutive rounds ({first}-{plan.index + 1}), so training cannot progress; "
                                   f"lower fed.lr (now {self.cfg.fed.lr:g})")

    def end_of_round(self, done: int) -> bool:
        """Checkpoint when due; True when this invocation ends here: ``fed.stop_after`` rounds are done,
        or a stop signal reached any rank (one collective every round decides, on every rank)."""
        f, rt = self.cfg.fed, self.rt
        self.state.round = done
        signalled = rt.comm.agree(self.signals.received is not None, op="max", name="round/stop-signal")
        planned = f.stop_after > 0 and done - self.start_round >= f.stop_after
        stopping = (signalled or planned) and done < f.rounds
        if self.checkpointer.due(done, f.rounds, stopping):
            if rt.is_main:
                self.checkpointer.save(self.state, rt.world_size)
            rt.comm.barrier(name="checkpoint/round")
        if stopping:
            self.stop_reason = "signal" if signalled else "stop_after"
            if signalled:
                log.warning("stopping after round %d on %s: checkpoint written; resume with fed.resume=true", done,
                            self.signals.received or "a stop signal (another rank)")
            else:
                log.info("stopping after round %d as fed.stop_after asks; resume with fed.resume=true", done)
        return stopping

    @contextlib.contextmanager
    def _timed(self, seconds: dict[str, float], phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        if phase != "aggregation":
            # activations, teachers and optimizer states of the phase are gone (a distillation's
            # DeepSpeed engine only once its reference cycles are collected)
            return_freed_memory(collect=phase == "alignment")
        seconds[phase] = time.perf_counter() - t0
        self.phase[phase] += seconds[phase]

    # ------------------------------------------------------------------------------------------------
    # After the last round
    # ------------------------------------------------------------------------------------------------

    def finish(self, stopped: bool, wall_seconds: float) -> dict:
        """The summary (every rank); a finished run's adapter and summary.json are written by rank 0."""
        self.progress.close()
        phase = self.rt.comm.all_reduce_metrics(self.phase, op="max", name="summary/phase-seconds")
        summary = self.summary(phase, wall_seconds, stopped)
        if self.rt.is_main and not stopped:
            set_adapter(self.models.evaluate, self.models.to_fm(self.state.global_adapter))
            with atomic_directory(self.layout.adapter) as tmp:
                self.models.evaluate.save_pretrained(str(tmp))
            atomic_write_json(self.layout.summary, summary)
        self.rt.comm.barrier(name="summary/written")
        return summary

    def summary(self, phase: dict, wall_seconds: float, stopped: bool) -> dict:
        f, s, task, models, last = self.cfg.fed, self.state, self.task, self.models, self.last_eval
        mean_tokens = float(task.train_mask.sum()) / max(1, len(task.train_ids))
        out = {
            "method": f.method, "task": task.kind, "rounds": f.rounds, "rounds_done": s.round,
            "stopped_early": stopped, "stop_reason": self.stop_reason if stopped else None,
            "world_size": self.rt.world_size,
            "num_clients": f.num_clients, "clients_per_round": self.k_round, "dataset": self.cfg.data.dataset,
            "partition": f.partition, "lora_targets": f.lora_targets, "server_optimizer": f.server_optimizer,
            "prox_mu": f.prox_mu,
            # Classification keys stay None for a causal LM: next-token accuracy is not a class accuracy.
            "final_accuracy": last.get("accuracy"), "best_accuracy": None if task.causal_lm else s.best,
            "final_macro_f1": last.get("macro_f1"), "final_predicted_per_class": last.get("predicted_per_class"),
            "excluded_clients": s.excluded_clients, "phase_seconds": phase,
            "bytes_up_per_client": self.up_bytes,
            "bytes_down_per_client": self.up_bytes + (s.ffn_bytes_per_alignment * s.alignment_rounds / f.rounds
                                                      if s.alignment_rounds else 0),
            "ffn_bytes_per_alignment": s.ffn_bytes_per_alignment, "alignment_rounds": s.alignment_rounds,
            "align_skipped": s.align_skipped,
            # gradient fidelity of the client model at the last round that measured it (None: not measured)
            "final_grad_cosine": self.last_fidelity.get("grad_cosine"),
            "final_grad_rel_error": self.last_fidelity.get("grad_rel_error"),
            "client_params": models.client_params, "fm_params": models.fm_params,
            # client groups: ranks per client, and the client model's parameter bytes one rank holds
            "ranks_per_client": self.groups.size, "client_sharding": f.client_sharding,
            "client_bytes_per_rank": models.client_bytes_per_rank,
            # ~6 FLOPs per non-embedding parameter per token for a training step (forward + backward)
            "client_train_flops_per_example": 6 * models.client_nonembedding_params * mean_tokens,
            "wall_seconds": wall_seconds, "startup_seconds": self.startup,
            **s.initial_eval,
        }
        if task.causal_lm:
            out.update({"final_perplexity": last.get("perplexity"), "best_perplexity": s.best,
                        "final_next_token_accuracy": last.get("next_token_accuracy"),
                        "final_test_loss": last.get("test_loss")})
        return out


def run_federated(cfg: Config, hooks: Optional[RoundHooks] = None) -> dict:
    """A federated run of ``cfg`` on the ranks this process was launched with; returns the summary."""
    with init_from_config(cfg) as rt:
        return Engine(cfg, rt, hooks or RoundHooks()).run()

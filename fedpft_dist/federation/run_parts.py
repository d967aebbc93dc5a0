"""What a federated run is made of, built once before its first round by :func:`build_run`: the
task, the models, the method's server step, the probe set of gradient fidelity, the round state (a
resumed run's state is applied where the state is made), the server optimizer, the checkpointer,
the metrics log and the progress bars.

Every rank builds them and calls the same collectives in the same order: the run directory and the
trackers are checked before anything is written, and the checkpoint a run resumes from before the
models take minutes to build.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..alignment.fidelity import probe_data, probe_indices
from ..checkpoint import move_aside, remove_partial_writes
from ..config import Config, write_resolved_config
from ..data.tasks import ClientData, Task, prepare_task
from ..environment import (fix_mmap_threshold, peak_memory_bytes, reset_peak_memory, resident_bytes,
                           resident_tensor_bytes, return_freed_memory)
from ..errors import UserError
from ..fingerprint import run_fingerprint
from ..fsutil import filesystem_error, run_dir_problem
from ..models.adapters import adapter_bytes, get_adapter
from ..models.families import layers_prefix
from ..models.loading import load_tokenizer, resolve_model_dir, resolve_task
from ..run_layout import RunLayout
from ..runtime import ClientGroups, Runtime
from ..runtime.shard import load_full_state
from .build import build_models, check_client_sharding, check_fm_sharding
from .methods import Method, get_method
from .recording import MetricsLog, RoundProgress
from .run_models import Models
from .sampling import clients_per_round
from .server_opt import ServerOptimizer, make_server_optimizer
from .server_step import ServerStep
from .state import Checkpointer, RoundState
from .trackers import missing_package, open_trackers

log = logging.getLogger(__name__)


@dataclass
class RunParts:
    """The parts of one federated run on this rank."""
    layout: RunLayout
    method: Method
    groups: ClientGroups                # this rank's client group (one rank, or dist.ranks_per_client)
    task: Task
    models: Models
    server_step: Optional[ServerStep]   # the method's step after aggregation (None: none in this run)
    probe: ClientData                   # gradient fidelity's fixed examples
    layer_token: str                    # the name of the FM's layer list (fidelity reports per layer)
    state: RoundState                   # round 0's, or the checkpoint's this run resumes from
    server: ServerOptimizer
    checkpointer: Checkpointer
    metrics: MetricsLog
    progress: RoundProgress
    startup: dict[str, float]           # seconds to the first round, by part
    start_round: int                    # rounds done before this invocation
    clients_per_round: int
    cost: list[float]                   # each client's training examples x local epochs (the assignment's cost)
    up_bytes: int                       # bytes of the adapter a client sends
    # bytes before the models were built (the CPU's resident set: interpreter, libraries, data) and
    # the peak while they were built (environment.peak_memory_bytes); None where unreadable
    memory: dict[str, Optional[int]] = field(default_factory=dict)

    @property
    def primary(self) -> str:
        """The headline metric: accuracy (higher is better) or perplexity (lower is better)."""
        return "perplexity" if self.task.causal_lm else "accuracy"

    def close(self, ok: bool) -> None:
        """Progress bars end (an error's line starts a line of its own); the trackers' files are
        complete whether the run ended well (``ok``) or not. Later calls do nothing."""
        self.progress.close()
        self.metrics.close(ok)


def build_run(cfg: Config, rt: Runtime) -> RunParts:
    """The parts of the run of ``cfg`` on the ranks of ``rt`` (every rank)."""
    f = cfg.fed
    layout, method = RunLayout.from_config(cfg), get_method(f.method)
    groups = rt.client_groups(cfg.dist.ranks_per_client)
    check_client_sharding(cfg, method, groups)
    check_fm_sharding(cfg, rt, method, groups)
    check_outputs(cfg, rt, layout)
    fm_dir = resolve_model_dir(cfg.model.path)
    # Before anything is written: the run's fingerprint, and either the checkpoint it resumes from
    # (which must have been written with the same) or a directory free of an earlier run's.
    client = method.client_fingerprint(cfg, layout) if method.client_fingerprint else None
    checkpointer = Checkpointer(layout.round_checkpoints, f.checkpoint_every,
                                {"method": f.method, "seed": cfg.run.seed}, run_fingerprint(cfg, fm_dir, client))
    resumed = None
    if f.resume:
        resumed = resume_point(rt, checkpointer)
    else:
        clear_earlier_run(cfg, rt, checkpointer)
    if rt.is_main:
        for root in (layout.round_checkpoints, layout.round_adapters):
            remove_partial_writes(root)
        write_resolved_config(cfg)
    # Time to the first round, by part: tokenising the task, the models (with the proxy and its
    # layer-level distillation when this run makes them), the server step (its public text).
    startup: dict[str, float] = {}
    t0 = time.perf_counter()
    kind = resolve_task(cfg, fm_dir)
    tokenizer = load_tokenizer(fm_dir)
    task = prepare_task(cfg, tokenizer, kind)
    startup["task"] = time.perf_counter() - t0
    exact = cfg.run.exact_memory and rt.device.type == "cpu" and fix_mmap_threshold()
    return_freed_memory(collect=True)
    memory = {"baseline": resident_bytes() if rt.device.type == "cpu" else 0, "exact": exact}
    reset_peak_memory(rt.device)
    models = build_models(cfg, rt, method, layout, task.num_classes, fm_dir, kind, groups)
    memory["models"] = peak_memory_bytes(rt.device)
    return_freed_memory(collect=True)   # what building the client model (a distillation, say) left behind
    if exact:
        # What the peaks are measured over: the resident set that is not the models' tensors (the
        # interpreter, libraries, data, the models' Python objects and what building them left in
        # the heap), read once the models are built and their weights paged in. A GPU's allocator
        # counts tensors only; this is the CPU's nearest figure.
        memory["baseline_before_models"] = memory["baseline"]
        tensors = resident_tensor_bytes([models.client, models.evaluate])   # pages them in first
        memory["baseline"] = resident_bytes() - tensors
    startup["models"] = time.perf_counter() - t0 - startup["task"]
    t1 = time.perf_counter()
    server_step = method.server_step(cfg, rt, models, tokenizer) if method.server_step else None
    startup["public_text"] = time.perf_counter() - t1
    probe = probe_data(task, probe_indices(task, f.fidelity_examples, cfg.run.seed))
    server = make_server_optimizer(f)
    state, up_bytes = round_state(rt, models, server, resumed)
    if rt.is_main and not f.resume:
        # The models are in place, so this run goes ahead: an earlier run's summary would describe
        # another run until this one writes its own.
        layout.summary.unlink(missing_ok=True)
    metrics = open_metrics(cfg, rt, layout, state.round)
    progress = RoundProgress(rt.is_main, f.rounds, state.round, f"{f.method} rounds")
    startup["total"] = time.perf_counter() - t0
    cost = [float(task.train_mask[torch.as_tensor(p, dtype=torch.long)].sum()) * f.local_epochs for p in task.parts]
    return RunParts(layout, method, groups, task, models, server_step, probe,
                    layers_prefix(models.evaluate.get_base_model()).rsplit(".", 1)[-1], state, server, checkpointer,
                    metrics, progress, startup, state.round, clients_per_round(f.num_clients, f.client_fraction),
                    cost, up_bytes, memory)


def round_state(rt: Runtime, models: Models, server: ServerOptimizer,
                resumed: Optional[RoundState]) -> tuple[RoundState, int]:
    """(the state the rounds start from, the bytes of the adapter): round 0's, the starting adapter
    rank 0's so that every rank begins from the same tensors; or the resumed checkpoint's, its
    proxy FFN weights and server optimizer moments put in place."""
    # every rank reads it (reading a sharded adapter is a collective of the client group) and joins
    # the broadcast, resumed or not
    initial = get_adapter(models.client)
    start = rt.comm.broadcast_state(initial if rt.is_main else None, name="broadcast/initial-adapter")
    up_bytes = adapter_bytes(start)
    if resumed is None:
        return RoundState({k: v.cpu() for k, v in start.items()}), up_bytes
    if resumed.proxy_ffn is not None:
        load_full_state(models.client_backbone, resumed.proxy_ffn)
        resumed.proxy_ffn = None   # the client model holds them now
    if resumed.server_opt:
        server.load_state(resumed.server_opt)
    return resumed, up_bytes


def check_outputs(cfg: Config, rt: Runtime, layout: RunLayout) -> None:
    """Rank 0 writes the run's files and feeds the trackers: a run dir it cannot write stops every
    rank now, not at the first checkpoint, and a tracker package it lacks before the models take
    minutes to build."""
    run_dir = layout.run_dir
    problem = run_dir_problem(run_dir) if rt.is_main else None
    if rt.comm.agree(problem is not None, op="max", name="run-dir/writable"):
        raise UserError(problem or f"run.dir: rank 0 cannot write {run_dir} (see its error)")
    missing = missing_package(cfg.run.report_to) if rt.is_main else None
    if rt.comm.agree(missing is not None, op="max", name="trackers/packages"):
        raise UserError(missing or "run.report_to: rank 0 lacks a tracker's package (see its error)")


def open_metrics(cfg: Config, rt: Runtime, layout: RunLayout, resume_after: int) -> MetricsLog:
    """metrics.jsonl and the trackers of ``run.report_to`` (rank 0). A tracker that cannot start
    there stops every rank (one collective), before metrics.jsonl is touched."""
    problem, trackers = None, []
    if rt.is_main:
        try:
            trackers = open_trackers(cfg, layout, resume_after)
        except UserError as exc:
            problem = str(exc)
        except OSError as exc:   # tensorboard/ not writable, a full disk
            problem = filesystem_error(exc) or f"run.report_to: {exc}"
    if rt.comm.agree(problem is not None, op="max", name="trackers/started"):
        raise UserError(problem or "run.report_to: a tracker did not start on rank 0 (see its error)")
    return MetricsLog(layout.metrics, rt.is_main, resume_after, trackers)


def resume_point(rt: Runtime, checkpointer: Checkpointer) -> Optional[RoundState]:
    """The newest round checkpoint that verifies and was written with this run's fingerprint
    (None: there is none, the run starts at round 1). Every rank reads it; one collective checks
    that they all found the same round."""
    loaded = checkpointer.load_latest()
    mine = -1 if loaded is None else loaded.round
    seen = rt.comm.all_reduce_metrics({"newest": mine, "oldest": -mine}, op="max", name="resume/agree")
    if seen["newest"] != -seen["oldest"]:
        raise UserError(f"fed.resume: the ranks see different round checkpoints in {checkpointer.root} "
                        f"(rounds {int(-seen['oldest'])} to {int(seen['newest'])}): it must be one shared directory")
    if loaded is None:
        log.info("fed.resume: no round checkpoint in %s yet: starting at round 1", checkpointer.root)
    return loaded


def clear_earlier_run(cfg: Config, rt: Runtime, checkpointer: Checkpointer) -> None:
    """A fresh run never mixes with an earlier run's checkpoints: it stops (rank 0 looks, every rank
    learns what it saw), or with ``run.rebuild`` moves them aside."""
    root: Path = checkpointer.root
    earlier = rt.comm.agree(rt.is_main and checkpointer.any(), op="max", name="checkpoint/earlier-run")
    if earlier and not cfg.run.rebuild:
        raise UserError(f"{root} holds round checkpoints of an earlier run: continue it with fed.resume=true, "
                        f"start afresh in a new run.dir, or set run.rebuild=true to move them aside")
    if rt.is_main and earlier:
        log.warning("moved the earlier run's round checkpoints to %s (run.rebuild=true)", move_aside(root))
    rt.comm.barrier(name="checkpoint/earlier-run-cleared")

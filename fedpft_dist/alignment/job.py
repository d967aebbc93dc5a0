"""One distillation job over all ranks: data-parallel DeepSpeed, checkpoints, before/after errors.

Used by ``fedpft distill`` (layer level) and by the federated engine's alignment rounds (neuron
level). Every rank calls :func:`run_distillation` with the same arguments except its rank; batches
are a seeded function of (seed, step), so every rank knows its share without communication and a
resumed job sees exactly the batches it would have seen.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import resource
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..checkpoint import (CheckpointInvalid, checkpoint_dirs, move_aside, newest_checkpoint, rank_file, read_meta,
                          remove_partial_writes, save_checkpoint, save_tensor_file, verify_rank_file, write_meta)
from ..config import DistillConfig, ProxyConfig, RunConfig
from ..environment import fault_point, stop_received
from ..errors import Preempted, UserError
from ..fingerprint import describe_difference, first_difference
from ..fsutil import truncate_jsonl
from ..models.families import layers_prefix, layout_for, transformer_layers
from ..models.proxy import hidden_error_sums
from ..runtime import Runtime
from ..runtime.optim import adamw
from . import zero
from .distill import (AdapterPerturbation, DistillPair, NeuronSplit, apply_neuron_split, ffn_parameter_names, freeze_all_but,
                      linear_warmup_decay, param_groups)

log = logging.getLogger(__name__)

CKPT_PREFIX = "step-"
TRAIN_STATE = "train_state"

# A teacher already in memory (unpartitioned: ZeRO stages 0-2), or a function that loads it (inside
# the ZeRO-3 loading context at stage 3, so that it is partitioned as it loads).
Teacher = Union[nn.Module, Callable[[], nn.Module]]
# A student in memory, or (layer-level distillation) a function that loads it: at ZeRO-3 inside the
# loading context, so that it is partitioned as it loads and no rank holds it whole.
Student = Union[nn.Module, Callable[[], nn.Module]]
# The config's defaults, which DistillRun's are.
_DISTILL, _RUN, _PROXY = DistillConfig(), RunConfig(), ProxyConfig()


@dataclass
class DistillRun:
    """What differs between one distillation job and another; the shared settings (ZeRO stage,
    batches, warm-up, weight decay, clipping) are the ``distill`` section of the config, passed as
    it is. A setting left out takes the config's default (``distill.*``, ``run.seed``,
    ``proxy.batch_size``), so that a default lives in one place."""
    lr: float = _DISTILL.lr                   # peak learning rate
    alpha: float = _DISTILL.alpha             # weight of the W_out W_in term of the loss
    whole_layers: bool = False                # every parameter of the distilled layers trains, not only the FFN
    steps: int = _DISTILL.steps               # > 0: exact number of optimizer steps
    epoch_fraction: float = _DISTILL.epoch_fraction  # used when steps == 0: this share of one pass over the text
    seed: int = _RUN.seed
    eval_batch: int = _PROXY.batch_size
    tag: str = "distill"
    checkpoint_every: int = _DISTILL.checkpoint_every
    checkpoint_dir: Optional[str] = None
    resume: bool = _DISTILL.resume
    # What produced this job's result (fedpft_dist.fingerprint): stored with its checkpoints, which
    # resume only on a match.
    fingerprint: Optional[dict] = None
    # A fresh job (resume False) finding checkpoints of an earlier one moves them aside instead of
    # stopping with an error.
    replace_stale: bool = False
    log_path: Optional[str] = None  # JSON lines, one per step (rank 0)
    log_every: int = _DISTILL.log_every  # steps between reads of the loss terms (see _StepLog)
    progress: bool = True
    adapter_noise: float = 0.0      # > 0: adapter-perturbed distillation at this scale (a proxy only)
    adapter_noise_rank: int = _DISTILL.adapter_noise_rank
    jvp_weight: float = 0.0         # weight of the derivative term
    lm_weight: float = 0.0          # > 0: the student is a causal LM; weight of its next-token loss
    # The distilled layers whose outputs the hidden-state term compares (None: all of them). FedOT's
    # emulator: its last middle layer only (Offsite-Tuning's KD at the input of the top adapter layers).
    hidden_layers: Optional[list[int]] = None
    # Stop signals (SIGTERM, SIGUSR1) end the job at the next step that is a multiple of log_every, with a
    # checkpoint in checkpoint_dir (one small collective there decides on every rank): the layer-level
    # job, which may run for hours. Every rank of a job must set the same; it needs a checkpoint_dir.
    stoppable: bool = False


@dataclass
class DistillResult:
    # The distilled tensors of the distilled layers in their plain form, full and fp32 on every rank:
    # the FFN's (the whole layers' with ``whole_layers``); trained ones from the optimizer's fp32
    # master weights, the others as they came in.
    # Empty where the job handed them to a sink instead (``run_distillation``'s ``sink``).
    state: dict[str, torch.Tensor]
    finite: bool                                # every rank found the loss and the result finite
    state_bytes: int                            # the distilled tensors' bytes in fp32
    steps: int
    losses: list[float]
    errors_before: list[float]
    errors_after: list[float]
    step_seconds: float
    peak_memory_mb: list[float]
    teacher_bytes_held: list[int]
    teacher_bytes_full: int
    student_bytes_held: list[int]
    student_bytes_full: int
    trainable_params: int
    extra: dict = field(default_factory=dict)


def accumulation_steps(settings: DistillConfig, world_size: int) -> int:
    """Forward/backward passes per rank per optimizer step: batch_size = micro_batch x steps x W.

    The global batch and its micro-batches do not depend on W, so the gradient is the same sum of the
    same micro-batch gradients at any world size (bit for bit when batch_size / micro_batch <= 2:
    a + b is the same on one rank accumulating and on two ranks all-reducing)."""
    per_rank, rest = divmod(settings.batch_size, world_size * settings.micro_batch)
    if rest or per_rank < 1:
        from ..errors import ConfigError

        raise ConfigError("distill.batch_size", f"{settings.batch_size} must be a multiple of distill.micro_batch "
                                                f"({settings.micro_batch}) x world size ({world_size})")
    return per_rank


def total_steps(run: DistillRun, global_batch: int, n_chunks: int) -> int:
    if run.steps > 0:
        return run.steps
    return max(1, math.ceil(run.epoch_fraction * n_chunks / global_batch))


def batch_indices(step: int, rank: int, world_size: int, global_batch: int, n_chunks: int, seed: int) -> torch.Tensor:
    """Chunks of rank ``rank`` at ``step``: epoch e is a permutation seeded by (seed, e); its
    consecutive global batches are split over ranks in rank order."""
    micro = global_batch // world_size
    per_epoch = n_chunks // global_batch
    if per_epoch < 1:
        raise ValueError(f"{n_chunks} chunks are fewer than one global batch of {global_batch}")
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n_chunks, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    start = i * global_batch + rank * micro
    return perm[start: start + micro]


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _per_rank(rt: Runtime, value: float, name: str) -> list[float]:
    """Every rank's value, in rank order (one sum all-reduce of a one-hot vector)."""
    v = torch.zeros(rt.world_size, dtype=torch.float64)
    v[rt.rank] = value
    return rt.comm.all_reduce_sum({"v": v}, name=name)["v"].tolist()


def _errors(rt: Runtime, pair: DistillPair, held: torch.Tensor, batch: int, name: str,
            layer_map: Optional[Sequence[int]]) -> list[float]:
    """Per-layer relative hidden-state error on held-out chunks, sharded over ranks (equal shares:
    at ZeRO-3 every forward is a collective) and summed before the division."""
    per_rank = len(held) // rt.world_size
    shard = held[rt.rank * per_rank: (rt.rank + 1) * per_rank]
    num, den = hidden_error_sums(pair.teacher, pair.student, shard, batch, layer_map)
    total = rt.comm.all_reduce_sum({"num": num, "den": den}, name=name)
    return (total["num"] / total["den"].clamp_min(1e-12)).tolist()


# ----------------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------------

@dataclass
class _Job:
    """A distillation job set up on every rank: the DeepSpeed engine over (teacher, student) and what
    the steps and the result need."""
    engine: object
    pair: DistillPair
    perturbation: Optional[AdapterPerturbation]
    named: dict[str, nn.Parameter]   # the trainable parameters, by name
    gas: int                         # gradient-accumulation steps per optimizer step
    total: int                       # optimizer steps
    trainable: int                   # trainable parameters, whole (also where ZeRO-3 partitions them)


def _set_up(rt: Runtime, teacher: Teacher, student: Student, dtype: torch.dtype, layers: Sequence[int],
            n_chunks: int, d: DistillConfig, run: DistillRun, splits: Sequence[NeuronSplit],
            layer_map: Optional[Sequence[int]]) -> _Job:
    """Teacher and student loaded (partitioned as they load at ZeRO-3) unless they are already in
    memory, the student's trainable parameters chosen, DeepSpeed engine built. The precision is the
    student's, ``dtype`` (``model.dtype``): bf16 weights train with DeepSpeed's bf16 mode (fp32 master
    weights) on GPUs; fp32 is the default, as in the paper's code."""
    bf16 = rt.device.type == "cuda" and dtype == torch.bfloat16
    gas = accumulation_steps(d, rt.world_size)
    ds_config = zero.make_ds_config(d.zero_stage, d.micro_batch, rt.world_size, bf16, d.grad_clip, grad_accum=gas)
    zero.init_distributed(rt.backend)
    if not isinstance(teacher, nn.Module):
        with zero.zero3_loading(ds_config):
            teacher = teacher()
    if not isinstance(student, nn.Module):
        with zero.zero3_loading(ds_config):
            student = student()
    teacher.eval()
    student.eval()  # dropout off; gradients still flow
    for model in (teacher, student):
        if not any(zero.is_partitioned(p) for p in model.parameters()):
            model.to(rt.device)

    if splits:
        names = [n for sp in splits for n in apply_neuron_split(student, sp, zero.gathered, zero.partition_like)]
    elif run.whole_layers:
        names = [n for n, _ in student.named_parameters() if _in_layers(n, student, layers)]
    else:
        names = ffn_parameter_names(student, layers)
    named = freeze_all_but(student, names)
    compared = list(layers) if run.hidden_layers is None else list(run.hidden_layers)
    teacher_layers = [layer_map[l] for l in compared] if layer_map is not None else None
    pair = DistillPair(teacher, student, compared, run.alpha, teacher_layers, jvp_weight=run.jvp_weight,
                       lm_weight=run.lm_weight)
    perturbation = None
    if run.adapter_noise > 0:
        if layer_map is not None:
            raise UserError("distill.adapter_noise: adapter-perturbed distillation is for a proxy (every FM layer "
                            "kept); an emulator's dropped layers have no place for the FM's adapter")
        # hooks registered before the engine exists: the sites' shapes come from plain modules
        perturbation = AdapterPerturbation(teacher, student, layers, run.adapter_noise, run.adapter_noise_rank)
    optimizer = adamw(param_groups(named, d.weight_decay), lr=run.lr, betas=(0.9, 0.999), eps=1e-8)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in named.values())   # whole, also when partitioned
    engine = zero.initialize(pair, list(named.values()), optimizer, None, ds_config)
    return _Job(engine, pair, perturbation, named, gas, total_steps(run, d.batch_size, n_chunks), trainable)


def _resume(rt: Runtime, job: _Job, d: DistillConfig, run: DistillRun) -> tuple[int, list[float]]:
    """(first step, losses so far): from the newest checkpoint that verifies when ``run.resume``,
    else (0, []). A fresh job never mixes with an earlier job's checkpoints: it stops, or moves them
    aside with ``run.replace_stale``."""
    if not (run.checkpoint_dir and (run.resume or run.checkpoint_every)):
        return 0, []
    if rt.is_main:
        remove_partial_writes(run.checkpoint_dir)
    if not run.resume:
        stale = rt.comm.agree(bool(checkpoint_dirs(run.checkpoint_dir, CKPT_PREFIX)), op="max",
                              name=f"{run.tag}/stale-checkpoints")
        if stale:
            if not run.replace_stale:
                raise UserError(f"distill.resume: {run.checkpoint_dir} holds checkpoints of an earlier distillation: "
                                f"continue it with distill.resume=true, or set run.rebuild=true to move them aside")
            if rt.is_main:
                log.warning("%s: moved the earlier distillation's checkpoints to %s (run.rebuild=true)", run.tag,
                            move_aside(Path(run.checkpoint_dir)))
            rt.comm.barrier(name=f"{run.tag}/stale-moved")
        return 0, []
    per_rank = zero.sharded_train_state(job.named)
    found = _newest_per_rank(rt, run) if per_rank else newest_checkpoint(run.checkpoint_dir, CKPT_PREFIX,
                                                                          "distill.resume")
    if found is None:
        return 0, []
    ckpt, tensors, meta = found
    diff = None if run.fingerprint is None else first_difference(meta.get("fingerprint"), run.fingerprint)
    if diff is not None:
        raise UserError(f"distill.resume: checkpoint {ckpt} was written with {describe_difference(diff)}; resume "
                        f"with its settings, or start afresh with distill.resume=false and run.rebuild=true")
    for key, mine in (("world_size", rt.world_size), ("zero_stage", d.zero_stage), ("total_steps", job.total)):
        if meta.get(key) != mine:
            name = {"world_size": "the world size", "zero_stage": "distill.zero_stage",
                    "total_steps": "the step count (distill.steps, epoch_fraction, batch_size, max_chunks)"}[key]
            raise UserError(f"distill.resume: checkpoint {ckpt} was written with {name} {meta.get(key)}, this job "
                            f"has {mine}; resume with the same, or start afresh with distill.resume=false and run.rebuild=true")
    if bool(meta.get("per_rank")) != per_rank:
        raise UserError(f"distill.resume: checkpoint {ckpt} was written {'per rank' if meta.get('per_rank') else 'whole'}, "
                        f"this job writes {'per rank' if per_rank else 'whole'}: resume with the settings it was written "
                        f"with, or start afresh with distill.resume=false and run.rebuild=true")
    if per_rank:
        zero.set_local_train_state(job.engine, job.named, tensors["train_state"], meta["step"])
    else:
        zero.set_full_train_state(job.engine, job.named, tensors["train_state"], meta["step"])
    log.info("%s: resumed from %s (step %d of %d)", run.tag, ckpt, meta["step"], job.total)
    return meta["step"], list(meta["losses"])


# The loss terms a step sums on the device, in the order of the logged keys (sorted, as before).
PARTS = ("hidden", "jvp", "lm", "loss", "weight")


def _distill_step(rt: Runtime, job: _Job, d: DistillConfig, run: DistillRun, step: int,
                  chunks: torch.Tensor) -> tuple[float, torch.Tensor]:
    """One optimizer step over this rank's share of the global batch: (its learning rate, this rank's
    loss terms (:data:`PARTS`) summed over its micro-batches, float64 on the device).

    Reads nothing back to the host and runs no collective of its own (DeepSpeed's gradient reduction
    aside), so a GPU step queues its work without waiting: :class:`_StepLog` reads the steps' terms
    in one go at logging points. The float64 sums are what adding each ``.item()`` in Python gave."""
    lr = run.lr * linear_warmup_decay(step, job.total, d.warmup_ratio)
    for group in job.engine.optimizer.param_groups:
        group["lr"] = lr
    idx = batch_indices(step, rt.rank, rt.world_size, d.batch_size, len(chunks), run.seed)
    parts = torch.zeros(len(PARTS), dtype=torch.float64, device=rt.device)
    if job.perturbation is not None:   # one perturbation per step, the same on every rank
        job.perturbation.draw(run.seed * 1_000_003 + step, rt.device)
    for k, micro in enumerate(idx.split(d.micro_batch)):
        ids = chunks[micro].to(rt.device, non_blocking=True)   # a blocking copy would wait for the queue
        # the micro-batch's place in the global batch seeds its tangents: the same on any number of ranks
        tangent_seed = (run.seed * 1_000_003 + step) * 4099 + rt.rank * job.gas + k
        loss, hidden, weight, jvp, lm = job.engine(ids, torch.ones_like(ids), tangent_seed)
        job.engine.backward(loss)   # DeepSpeed scales by 1/gas and steps at the boundary
        job.engine.step()
        terms = {"loss": loss.detach(), "hidden": hidden.mean(), "weight": weight.mean(), "jvp": jvp.mean(),
                 "lm": lm}
        parts += torch.stack([terms[k].double() for k in PARTS])
    if job.perturbation is not None:
        job.perturbation.clear()
    return lr, parts


class _StepLog:
    """The steps' loss terms, kept on the device until a logging point reads them all at once: every
    ``run.log_every`` steps when there is a log file or a progress bar to feed, before a checkpoint,
    and at the end of the job. A read stacks the waiting steps' terms, moves them to the
    communicator's device once, sums each step's terms over ranks (one small all-reduce per step, as
    each step had before, so the sums are the same bit for bit at any world size) and reads them back
    in one transfer; then every step gets its log line (the same values as when each step read its
    own), its loss in ``losses`` and the progress bar its postfix.

    Step times: a step's own wall time covers only what the host waited for; each read spreads its
    wait over the steps it read, so the times add up to the job's wall time on a GPU too."""

    def __init__(self, rt: Runtime, job: _Job, run: DistillRun, losses: list[float], log_fh, bar):
        self.rt, self.job, self.run, self.losses, self.log_fh, self.bar = rt, job, run, losses, log_fh, bar
        self.pending: list[tuple[int, float, torch.Tensor]] = []
        self.step_times: list[float] = []

    def add(self, step: int, lr: float, parts: torch.Tensor, seconds: float) -> None:
        self.pending.append((step, lr, parts))
        self.step_times.append(seconds)
        if self.bar:
            self.bar.update(1)
        # Whether to read is the same on every rank (the read is a collective; only rank 0 holds the
        # log file and the bar).
        if (self.run.log_path or self.run.progress) and (step + 1) % self.run.log_every == 0:
            self.read()

    def read(self) -> None:
        """Read every waiting step (a collective: every rank calls it at the same steps)."""
        if not self.pending:
            return
        t0 = time.perf_counter()
        buf = torch.stack([parts for _, _, parts in self.pending]).to(self.rt.comm.device)
        for row in buf:
            self.rt.comm.all_reduce_(row, name=f"{self.run.tag}/loss")
        scale = self.rt.world_size * self.job.gas
        for (step, lr, _), values in zip(self.pending, buf.tolist()):
            m = {"lr": lr, **{k: v / scale for k, v in zip(PARTS, values)}}
            self.losses.append(m["loss"])
            if self.log_fh:
                self.log_fh.write(json.dumps({"step": step + 1, **m}) + "\n")
        if self.log_fh:
            self.log_fh.flush()
        if self.bar:
            self.bar.set_postfix(loss=f"{self.losses[-1]:.4f}")
        wait = (time.perf_counter() - t0) / len(self.pending)
        for i in range(len(self.step_times) - len(self.pending), len(self.step_times)):
            self.step_times[i] += wait
        self.pending = []


def _stop_agreed(rt: Runtime, run: DistillRun) -> bool:
    """Whether a stop signal reached any rank (the same answer on every rank)."""
    return rt.comm.agree(stop_received() is not None, op="max", name=f"{run.tag}/stop-signal")


def _stop(rt: Runtime, job: _Job, d: DistillConfig, run: DistillRun, done: int, losses: list[float],
          steps: "_StepLog") -> None:
    """End the job after ``done`` steps on a stop signal: a checkpoint (unless one was just written),
    then :class:`Preempted`, which the command turns into exit 75."""
    steps.read()
    if not (run.checkpoint_every and done % run.checkpoint_every == 0):
        _checkpoint(rt, job, d, run, done, losses)
    raise Preempted(f"{run.tag}: stopped after step {done} of {job.total} on {stop_received() or 'a stop signal (another rank)'}, "
                    f"with a checkpoint in {run.checkpoint_dir}; continue with distill.resume=true")


def _train(rt: Runtime, job: _Job, d: DistillConfig, run: DistillRun, chunks: torch.Tensor) -> tuple[list[float], list[float]]:
    """The steps (from a checkpoint when resuming), logged and checkpointed; (losses, step seconds)."""
    start, losses = _resume(rt, job, d, run)
    if start and run.log_path and rt.is_main:   # the steps after the checkpoint are done again: their rows go
        truncate_jsonl(run.log_path, lambda row: row.get("step", 0) <= start)
    log_fh = open(run.log_path, "a" if start else "w") if (run.log_path and rt.is_main) else None
    bar = None
    if rt.is_main and run.progress:
        from tqdm import tqdm

        bar = tqdm(total=job.total, initial=start, desc=run.tag, unit="step", dynamic_ncols=True)
    steps = _StepLog(rt, job, run, losses, log_fh, bar)
    try:
        for step in range(start, job.total):
            t0 = time.perf_counter()
            lr, parts = _distill_step(rt, job, d, run, step, chunks)
            steps.add(step, lr, parts, time.perf_counter() - t0)
            fault_point(f"{run.tag}-step", step + 1, rt.rank)
            if run.checkpoint_every and run.checkpoint_dir and (step + 1) % run.checkpoint_every == 0 \
                    and step + 1 < job.total:
                steps.read()
                _checkpoint(rt, job, d, run, step + 1, losses)
            # at the steps whose terms are read anyway: a check between every two steps would make a GPU
            # wait for each step before queuing the next
            if run.stoppable and (step + 1) % run.log_every == 0 and step + 1 < job.total \
                    and _stop_agreed(rt, run):
                _stop(rt, job, d, run, step + 1, losses, steps)
        steps.read()
    finally:
        if bar:
            bar.close()
        if log_fh:
            log_fh.close()
    return losses, steps.step_times


def _checkpoint(rt: Runtime, job: _Job, d: DistillConfig, run: DistillRun, step: int, losses: list[float]) -> None:
    meta = {"step": step, "total_steps": job.total, "world_size": rt.world_size, "zero_stage": d.zero_stage,
            "losses": losses, "seed": run.seed, "fingerprint": run.fingerprint}
    if zero.sharded_train_state(job.named):
        _checkpoint_per_rank(rt, job, run, f"{CKPT_PREFIX}{step:07d}", meta)
        return
    state = zero.get_full_train_state(job.engine, job.named)   # a collective: every rank calls it
    if rt.is_main:
        save_checkpoint(run.checkpoint_dir, f"{CKPT_PREFIX}{step:07d}", {"train_state": state}, meta)
    rt.comm.barrier(name=f"{run.tag}/checkpoint")


def _checkpoint_per_rank(rt: Runtime, job: _Job, run: DistillRun, name: str, meta: dict) -> None:
    """A ZeRO-3 job's checkpoint: each rank writes its own share of the fp32 weights and Adam moments
    (no rank gathers the whole state) into one directory; rank 0 records every file's size and hash,
    shared in one collective, in ``state.json`` and moves the directory into place."""
    root = Path(run.checkpoint_dir)
    tmp, final = root / f".{name}.partial", root / name
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    rt.comm.barrier(name=f"{run.tag}/checkpoint-start")
    record = save_tensor_file(tmp / rank_file(TRAIN_STATE, rt.rank), zero.get_local_train_state(job.named))
    records = torch.zeros(rt.world_size, 5, dtype=torch.int64)
    digest = bytes.fromhex(record["sha256"])
    records[rt.rank] = torch.tensor([record["bytes"], *(int.from_bytes(digest[i:i + 8], "big", signed=True)
                                                          for i in range(0, 32, 8))])
    records = rt.comm.all_reduce_sum({"records": records}, name=f"{run.tag}/checkpoint-files")["records"]
    if rt.is_main:
        files = {rank_file(TRAIN_STATE, r): {
            "bytes": int(row[0]),
            "sha256": b"".join(int(v).to_bytes(8, "big", signed=True) for v in row[1:]).hex()}
            for r, row in enumerate(records.tolist())}
        write_meta(tmp, {**meta, "per_rank": True}, files)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    rt.comm.barrier(name=f"{run.tag}/checkpoint")


def _newest_per_rank(rt: Runtime, run: DistillRun) -> Optional[tuple[Path, dict[str, torch.Tensor], dict]]:
    """The newest checkpoint whose every rank's file verifies (each rank checks its own, newest first,
    one small collective per checkpoint agrees), as (path, this rank's tensors, meta); None when there
    is none at all. One with another world size is taken as it is, for the caller to refuse by name."""
    from safetensors.torch import load_file

    found = checkpoint_dirs(run.checkpoint_dir, CKPT_PREFIX)   # one shared directory: the same on every rank
    for path in found:
        try:
            meta = read_meta(path)
            if meta.get("world_size") == rt.world_size:
                meta = verify_rank_file(path, rank_file(TRAIN_STATE, rt.rank))
            ok = True
        except CheckpointInvalid as exc:
            log.warning("distill.resume: skipping checkpoint %s on rank %d: %s", path, rt.rank, exc)
            ok = False
        if rt.comm.agree(ok, op="min", name=f"{run.tag}/resume-agree"):
            if meta.get("world_size") != rt.world_size:
                return path, {}, meta
            return path, {"train_state": load_file(str(path / rank_file(TRAIN_STATE, rt.rank)))}, meta
    if found:
        raise UserError(f"distill.resume: none of the {len(found)} checkpoints in {run.checkpoint_dir} verifies "
                        f"on every rank; start afresh with distill.resume=false and run.rebuild=true")
    return None


def _distilled_layers(job: _Job, student: nn.Module, layers: Sequence[int], splits: Sequence[NeuronSplit],
                      whole_layers: bool) -> Iterator[dict[str, torch.Tensor]]:
    """The distilled layers' tensors in plain form, one layer at a time (a collective: every rank
    takes them in the same order): what trained from the fp32 master weights (a bf16 copy would
    round every weight at every alignment) and the frozen neurons from the split's frozen pieces,
    which nothing changed (gathered where ZeRO-3 partitioned them), so they come back bit for bit.
    Everything else of the layers trained."""
    pieces = _split_pieces(student, splits)   # "<linear>.weight_train" -> (plain, dim, trainable, frozen ids, layer)
    params = dict(student.named_parameters())
    keep = None if whole_layers else set(ffn_parameter_names_plain(student, layers, splits))
    pattern = re.compile(rf"^{re.escape(layers_prefix(student))}\.(\d+)\.")
    groups: dict[int, list[str]] = {}
    for name in job.named:
        m = pattern.match(name)
        groups.setdefault(int(m.group(1)) if m else -1, []).append(name)
    for layer in sorted(groups):
        names = groups[layer]
        masters = zero.full_fp32_params(job.engine, {n: job.named[n] for n in names})   # a collective at ZeRO >= 1
        out = {name: value for name, value in masters.items() if name not in pieces}
        split = [name for name in names if name in pieces]   # (a Linear without a bias has no bias piece)
        frozen = {name: params[name[: -len("_train")] + "_frozen"] for name in split}
        with zero.gathered(list(frozen.values())):   # one gather of a layer's frozen pieces
            for name in split:
                plain, dim, trainable, frozen_ids, _ = pieces[name]
                trained = masters[name].float().cpu()
                shape = list(trained.shape)
                shape[dim] = len(trainable) + len(frozen_ids)
                whole = torch.empty(shape, dtype=torch.float32)
                whole.index_copy_(dim, frozen_ids, frozen[name].detach().float().cpu())
                whole.index_copy_(dim, trainable, trained)
                out[plain] = whole
        yield {k: v for k, v in out.items() if keep is None or k in keep}


def _hand_over(rt: Runtime, job: _Job, student: nn.Module, layers: Sequence[int], splits: Sequence[NeuronSplit],
               run: DistillRun, losses: list[float], sink: Optional[Callable[[dict[str, torch.Tensor]], None]]
               ) -> tuple[bool, dict[str, torch.Tensor], int]:
    """(finite on every rank, the distilled tensors, their bytes in fp32). Without ``sink`` the
    tensors come back whole on every rank. With one at ZeRO-3, every rank first checks its own
    partitions of the fp32 masters, and only when all ranks found them finite are the tensors
    gathered a layer at a time and each layer handed to ``sink``: no rank holds them all (55 GB in
    fp32 at 70B). At stages 0-2, where every rank holds the whole student anyway, they are gathered
    whole, checked, then handed over in one piece. Nothing reaches ``sink`` unless all is finite."""
    if sink is None or not zero.partitioned(job.engine):
        state = {k: v for part in _distilled_layers(job, student, layers, splits, run.whole_layers) for k, v in part.items()}
        finite = _all_finite(rt, losses, state, run.tag)
        nbytes = sum(v.numel() * 4 for v in state.values())
        if sink is None:
            return finite, state, nbytes
        if finite:
            sink(state)
        return finite, {}, nbytes
    ok = all(math.isfinite(x) for x in losses) and zero.local_fp32_finite(job.named)
    finite = rt.comm.agree(ok, "min", name=f"{run.tag}/finite")
    nbytes = 0
    if finite:
        for part in _distilled_layers(job, student, layers, splits, run.whole_layers):
            nbytes += sum(v.numel() * 4 for v in part.values())
            sink(part)
    return finite, {}, nbytes


def _split_pieces(student: nn.Module, splits: Sequence[NeuronSplit]
                  ) -> dict[str, tuple[str, int, torch.Tensor, torch.Tensor, int]]:
    """For each trainable piece of a :class:`SplitLinear` (``<linear>.weight_train``,
    ``<linear>.bias_train``): the plain tensor it belongs to, the neuron dimension, the neuron ids
    of the trainable and of the frozen piece, and the layer."""
    if not splits:
        return {}
    layout = layout_for(student.config.model_type)
    prefix = {id(m): n for n, m in student.named_modules()}
    out = {}
    for split in splits:
        layer = transformer_layers(student)[split.layer]
        for dim, paths in ((0, layout.rows), (1, layout.cols)):
            for path in paths:
                module = layer
                for part in path.split("."):
                    module = getattr(module, part)
                base = prefix[id(module)]
                out[f"{base}.weight_train"] = (f"{base}.weight", dim, split.trainable, split.frozen, split.layer)
                if dim == 0:
                    out[f"{base}.bias_train"] = (f"{base}.bias", 0, split.trainable, split.frozen, split.layer)
    return out


def _all_finite(rt: Runtime, losses: list[float], state: dict[str, torch.Tensor], tag: str) -> bool:
    ok = all(math.isfinite(x) for x in losses) and all(bool(torch.isfinite(v).all()) for v in state.values())
    return rt.comm.agree(ok, "min", name=f"{tag}/finite")


def run_distillation(rt: Runtime, teacher: Teacher, student: Student,
                     layers: Sequence[int], train_chunks: torch.Tensor, held_chunks: torch.Tensor,
                     d: DistillConfig, run: DistillRun, splits: Sequence[NeuronSplit] = (),
                     layer_map: Optional[Sequence[int]] = None,
                     student_dtype: Optional[torch.dtype] = None,
                     sink: Optional[Callable[[dict[str, torch.Tensor]], None]] = None) -> DistillResult:
    """Distil ``student`` against ``teacher``. The student is a plain, unpartitioned proxy (modified
    in place) or a function that loads one (its dtype ``student_dtype``): at ZeRO-3 it is then
    partitioned as it loads, as the teacher is, and no rank holds it whole (a neuron split is made
    one layer at a time, its pieces partitioned at once; the result is gathered from the fp32
    master weights). The teacher is a
    model the ranks already hold (it comes back as it was: same weights, modes and ``requires_grad``
    flags) or a function that loads one (inside the ZeRO-3 loading context at stage 3, so it is
    partitioned as it loads), with the shared settings ``d`` (the config's ``distill`` section) and this job's
    ``run``. Layer level when ``splits`` is empty (all FFN parameters of ``layers`` train); neuron
    level otherwise (only the trainable neurons of each split layer, b_out and the norm).
    ``layer_map[j]`` is the teacher layer whose output student layer j imitates (an emulator's layer
    imitates the last FM layer of the block it replaces); by default the same index. A result that is
    not finite on some rank comes back with ``finite`` False on every rank: callers keep what they had.
    ``sink``: takes the distilled tensors, a layer at a time at ZeRO-3 (:func:`_hand_over`), instead
    of the result's ``state``."""
    if isinstance(student, nn.Module):
        dtype = next(student.parameters()).dtype
    elif student_dtype is None:
        raise ValueError("a student loaded by the job needs student_dtype")
    else:
        dtype = student_dtype
    with _lent(teacher, dtype):
        t0 = time.perf_counter()
        job = _set_up(rt, teacher, student, dtype, layers, len(train_chunks), d, run, splits, layer_map)
        student = job.pair.student
        try:
            set_up_seconds = time.perf_counter() - t0
            held_bytes, full_bytes = zero.held_bytes(job.pair.teacher)
            student_held, student_full = zero.held_bytes(student)
            errors_before = _errors(rt, job.pair, held_chunks, run.eval_batch, f"{run.tag}/eval-before", layer_map)
            try:
                losses, step_times = _train(rt, job, d, run, train_chunks)
            finally:
                if job.perturbation is not None:   # a teacher the caller holds goes back without hooks
                    job.perturbation.remove()
            errors_after = _errors(rt, job.pair, held_chunks, run.eval_batch, f"{run.tag}/eval-after", layer_map)
            finite, state, state_bytes = _hand_over(rt, job, student, layers, splits, run, losses, sink)
        finally:
            zero.release(job.engine)
    return DistillResult(
        state=state, finite=finite, state_bytes=state_bytes, steps=job.total, losses=losses,
        errors_before=errors_before, errors_after=errors_after,
        step_seconds=statistics.median(step_times[1:] or step_times) if step_times else 0.0,
        peak_memory_mb=_per_rank(rt, _peak_memory_mb(rt.device), f"{run.tag}/memory"),
        teacher_bytes_held=[int(v) for v in _per_rank(rt, held_bytes, f"{run.tag}/teacher-bytes")],
        teacher_bytes_full=full_bytes, trainable_params=job.trainable,
        student_bytes_held=[int(v) for v in _per_rank(rt, student_held, f"{run.tag}/student-bytes")],
        student_bytes_full=student_full,
        extra={"set_up_seconds": set_up_seconds, "teacher_in_memory": isinstance(teacher, nn.Module)})


@contextlib.contextmanager
def _lent(teacher: Teacher, dtype: torch.dtype) -> Iterator[None]:
    """A teacher the caller holds goes back as it came: the job freezes it and puts it in eval mode, and
    DeepSpeed's engine casts every module it wraps to its training dtype (at ZeRO stages 0-2 the
    teacher is the caller's model itself, e.g. the evaluation FM with its fp32 LoRA in a bf16 run).
    A parameter not of the job's ``dtype`` (the ones a cast would change) gets its own tensor back (on
    the device the job moved it to), so its dtype and values are exactly what they were."""
    if not isinstance(teacher, nn.Module):
        yield
        return
    flags = [(p, p.requires_grad, p.data if p.dtype != dtype else None) for p in teacher.parameters()]
    modes = [(m, m.training) for m in teacher.modules()]
    try:
        yield
    finally:
        for p, flag, data in flags:
            if data is not None and p.dtype != data.dtype and not zero.is_partitioned(p):
                p.data = data.to(p.device)  # the values it had: a cast there and back would round them
            p.requires_grad_(flag)
            p.grad = None
        for m, mode in modes:
            m.training = mode


def _in_layers(name: str, model: nn.Module, layers: Sequence[int]) -> bool:
    prefix = layers_prefix(model)
    return any(name.startswith(f"{prefix}.{l}.") for l in layers)


def ffn_parameter_names_plain(model: nn.Module, layers: Sequence[int], splits: Sequence[NeuronSplit]) -> list[str]:
    """Names of the FFN parameters of ``layers`` in their plain (unsplit) form."""
    if not splits:
        return ffn_parameter_names(model, layers)
    layout = layout_for(model.config.model_type)
    prefix = layers_prefix(model)
    names = []
    for l in layers:
        for path in (*layout.rows, *layout.cols):
            names.append(f"{prefix}.{l}.{path}.weight")
            names.append(f"{prefix}.{l}.{path}.bias")
        if layout.post_norm:
            names.append(f"{prefix}.{l}.{layout.post_norm}.weight")
            names.append(f"{prefix}.{l}.{layout.post_norm}.bias")
    return names

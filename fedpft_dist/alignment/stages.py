"""The pipeline stages that need a job of ranks: the proxy (or FedOT's emulator) built once on rank 0,
layer-level distillation before federated training (Stage 2), and neuron-level alignment during it.

Every stage takes the config and the run's :class:`~fedpft_dist.run_layout.RunLayout` and returns what
it made; printing is the caller's business.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..config import Config, config_to_dict
from ..data.public import public_chunks
from ..errors import UserError
from ..fingerprint import (describe_difference, distilled_fingerprint, emulator_fingerprint, first_difference,
                           proxy_fingerprint)
from ..fsutil import atomic_write_json
from ..data.tasks import prepare_task
from ..models.adapters import add_lora_product, get_adapter, lora_pairs, merge_lora_into, with_lora
from ..models.families import layers_prefix
from ..models.build import make_emulator, make_proxy
from ..models.loading import DTYPES, config_overrides, load_model, load_tokenizer, resolve_model_dir, resolve_task
from ..models.sharded import load_sharded
from ..models.proxy import load_proxy, read_proxy_meta, save_proxy
from ..run_layout import RunLayout, is_model_dir
from ..runtime import Runtime, phase
from ..runtime.shard import full_value
from . import zero
from .distill import ffn_parameter_names, plan_neuron_split
from .job import DistillResult, DistillRun, run_distillation

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# Stage 1: the proxy (FedOT: the emulator)
# ----------------------------------------------------------------------------------------------------

def build_proxy_artifact(cfg: Config, layout: RunLayout, emulator: bool = False) -> dict:
    """Build and save the proxy (FedOT: the emulator) of ``cfg`` and its report (proxy.json /
    emulator.json); one process. Returns the report."""
    def public(tokenizer, split: str, n: int) -> torch.Tensor:
        return public_chunks(cfg, tokenizer, split, n)

    if emulator:
        report = make_emulator(cfg, layout.emulator, public)
        target = layout.emulator_report
    else:
        report = make_proxy(cfg, layout.proxy, public)
        target = layout.proxy_report
    atomic_write_json(target, {"config": config_to_dict(cfg), **report})
    return report


def ensure_proxy(cfg: Config, rt: Runtime, layout: RunLayout, emulator: bool = False) -> Path:
    """The proxy to distil (FedOT: the emulator); rank 0 builds it first when it does not exist yet,
    or (``run.rebuild``) when it was built with other settings. A proxy named by ``distill.proxy`` is
    used as it is."""
    source = layout.emulator if emulator else layout.distill_source
    if layout.source_given and not emulator:
        if rt.is_main and not is_model_dir(source):
            raise UserError(f"distill.proxy: {source} is not a proxy directory")
    else:
        fm_dir = resolve_model_dir(cfg.model.path)
        expected = (emulator_fingerprint if emulator else proxy_fingerprint)(cfg, fm_dir)
        what = "the emulator" if emulator else "the proxy"
        fresh = reusable(cfg, source, expected, what)
        rt.comm.barrier(name="distill/proxy-checked")   # every rank has looked before rank 0 rewrites it
        if not fresh and rt.is_main:
            log.info("building %s at %s", what, source)
            build_proxy_artifact(cfg, layout, emulator)
    rt.comm.barrier(name="distill/proxy-ready")
    return source


def reusable(cfg: Config, path: Path, expected: dict, what: str) -> bool:
    """True when the model directory at ``path`` exists and was made with the settings ``expected``
    describes; False when it is missing, or was made otherwise and ``run.rebuild`` asks to make it
    again. Made otherwise without ``run.rebuild``: an error naming the first setting that differs."""
    if not is_model_dir(path):
        return False
    diff = first_difference(read_proxy_meta(path).get("fingerprint"), expected)
    if diff is None:
        return True
    if cfg.run.rebuild:
        log.warning("%s at %s was made with %s: making it again (run.rebuild=true)", what, path,
                    describe_difference(diff))
        return False
    raise UserError(f"{what} at {path} was made with {describe_difference(diff)}: use a new run.dir, or set "
                    f"run.rebuild=true to make it again")


def source_fingerprint(cfg: Config, layout: RunLayout, emulator: bool = False) -> dict:
    """The fingerprint of the model layer-level distillation starts from: the emulator or proxy this
    config builds, or the one ``distill.proxy`` names (as it recorded itself)."""
    fm_dir = resolve_model_dir(cfg.model.path)
    if emulator:
        return emulator_fingerprint(cfg, fm_dir)
    if layout.source_given:
        recorded = read_proxy_meta(layout.distill_source).get("fingerprint") if is_model_dir(layout.distill_source) else None
        return recorded or {"distill.proxy": str(layout.distill_source.resolve())}
    return proxy_fingerprint(cfg, fm_dir)


# ----------------------------------------------------------------------------------------------------
# Stage 2: layer-level distillation
# ----------------------------------------------------------------------------------------------------

# Weight of the emulator's next-token loss beside the KD term in FedOT's distillation (causal LMs).
EMULATOR_LM_WEIGHT = 1.0


def layer_level_run(cfg: Config, layout: RunLayout, emulator: Optional[dict] = None,
                    fingerprint: Optional[dict] = None) -> DistillRun:
    """The layer-level job: the distill section's learning rate, loss weight, step budget (the same
    distill.steps x distill.batch_size chunks for a proxy and an emulator), checkpoints and log, and
    the run's seed. FedOT's emulator (``emulator``: its saved meta) distils the way Offsite-Tuning
    does: every parameter of its middle layers trains, on the KD term (the hidden state at the output
    of the middle block, the input of the top adapter layers, against the FM's there) plus, for a
    causal LM, its next-token loss on the public text (:mod:`fedpft_dist.alignment.distill`); no
    weight or derivative term, no adapter perturbation."""
    d = cfg.distill
    on_proxy = emulator is None
    return DistillRun(lr=d.lr, alpha=d.alpha if on_proxy else 0.0, whole_layers=not on_proxy, steps=d.steps,
                      epoch_fraction=d.epoch_fraction, seed=cfg.run.seed,
                      eval_batch=cfg.proxy.batch_size, tag="distill", checkpoint_every=d.checkpoint_every,
                      log_every=d.log_every, checkpoint_dir=str(layout.distill_checkpoints), resume=d.resume,
                      fingerprint=fingerprint, replace_stale=cfg.run.rebuild, log_path=str(layout.distill_log),
                      adapter_noise=d.adapter_noise if on_proxy else 0.0, adapter_noise_rank=d.adapter_noise_rank,
                      jvp_weight=d.jvp_weight if on_proxy else 0.0,
                      lm_weight=0.0 if on_proxy or not emulator_lm(emulator) else EMULATOR_LM_WEIGHT,
                      hidden_layers=None if on_proxy else [max(emulator["compressed_layers"])], stoppable=True)


def emulator_lm(meta: dict) -> bool:
    """Whether an emulator's distillation has the LM term: it is built as a causal LM (a decoder FM,
    also one that classifies); an encoder has no LM head."""
    return meta.get("task") == "causal-lm"


@dataclass
class Distilled:
    path: Path        # the distilled proxy (FedOT: emulator), the same on every rank
    report: dict      # what distill.json holds, besides the config


def distill_proxy(cfg: Config, rt: Runtime, layout: RunLayout, emulator: bool = False) -> Distilled:
    """Layer-level distillation of the proxy (FedOT: of the emulator's middle layers, on the KD term at
    the middle block's output and, for a causal LM, its next-token loss) on all ranks of ``rt``; rank 0 saves the
    result and ``distill.json``. A result that is not finite is not used: the proxy is saved as it
    was, and the report says so."""
    t0 = time.perf_counter()
    source = ensure_proxy(cfg, rt, layout, emulator)
    meta = read_proxy_meta(source)
    fingerprint = distilled_fingerprint(cfg, source_fingerprint(cfg, layout, emulator))
    fm_dir = resolve_model_dir(cfg.model.path)
    tokenizer = load_tokenizer(source)
    train = public_chunks(cfg, tokenizer, "train", cfg.distill.max_chunks)
    held = public_chunks(cfg, tokenizer, "held_out", cfg.distill.eval_chunks)
    lm = emulator and emulator_lm(meta)
    layers = meta["compressed_layers"]
    prefixes = []

    def load_student() -> nn.Module:   # loaded by the job: at ZeRO-3 partitioned as it loads
        student, _ = load_proxy(source, task="causal-lm" if lm else "base", dtype=cfg.model.dtype)
        prefixes.append(student.base_model_prefix)
        return student

    with phase("the emulator's distillation" if emulator else "layer-level distillation"):
        result = run_distillation(rt, lambda: load_model(fm_dir, "base", cfg.model.dtype), load_student, layers,
                                  train, held, cfg.distill,
                                  layer_level_run(cfg, layout, meta if emulator else None, fingerprint),
                                  layer_map=meta.get("target_layers"), student_dtype=DTYPES[cfg.model.dtype])
    if lm:   # the causal LM's names -> the backbone's, which the saved model is loaded by below
        prefix = prefixes[0] + "."
        result.state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in result.state.items()}
    out = layout.emulator_distilled if emulator else layout.distilled
    report = {"proxy_in": str(source), "proxy_out": str(out), "fm_path": str(fm_dir),
              "world_size": rt.world_size, "zero_stage": cfg.distill.zero_stage,
              **distill_report(result, layers, train, held)}
    if not emulator and cfg.fed.fidelity_every != 0 and result.finite:
        report["fidelity_before"], report["fidelity_after"] = proxy_fidelity(cfg, rt, source, [None, result.state])
    if not result.finite:
        log.warning("layer-level distillation gave non-finite values (loss or weights): the proxy is kept "
                    "undistilled; lower distill.lr")
    if rt.is_main:
        plain, plain_meta = load_proxy(source, dtype=cfg.model.dtype)
        if result.finite:
            _, unexpected = plain.base_model.load_state_dict(result.state, strict=False)
            if unexpected:
                raise RuntimeError(f"distilled tensors do not fit the proxy: {unexpected[:3]}")
        plain_meta["distilled"] = {k: report[k] for k in ("steps", "zero_stage", "world_size", "finite",
                                                           "hidden_error_before", "hidden_error_after")}
        plain_meta["fingerprint"] = fingerprint
        save_proxy(plain, tokenizer, out, plain_meta)
        report["seconds"] = time.perf_counter() - t0
        atomic_write_json(layout.distill_report, {"config": config_to_dict(cfg), **report})
        log.info("distilled %d layers for %d steps: hidden-state error on held-out text %.4f -> %.4f; saved %s",
                 len(layers), result.steps, report["hidden_error_before"], report["hidden_error_after"], out)
    rt.comm.barrier(name="distill/saved")
    return Distilled(out, report)


def proxy_fidelity(cfg: Config, rt: Runtime, proxy_dir: Path, states: list[Optional[dict]]) -> list[dict]:
    """Gradient fidelity against the FM of the proxy at ``proxy_dir`` with each of ``states`` (FFN
    tensors; None: as saved) loaded, before any federated training: the clients' starting adapter
    (attention LoRA, B = 0, and a fresh head, seeded as the federated run seeds it) on both, the
    monitor's probe set. The task and the FM are prepared once for all states."""
    from .fidelity import FidelitySetting, fidelity_with_fm_gradients, probe_data, probe_indices

    f = cfg.fed
    fm_dir = resolve_model_dir(cfg.model.path)
    kind = resolve_task(cfg, fm_dir)
    task = prepare_task(cfg, load_tokenizer(fm_dir), kind)
    lora = (f.lora_r, f.lora_alpha, f.lora_dropout)
    if cfg.model.fm_sharding != "none" and rt.world_size > 1:   # the FM side with all ranks (alignment.fidelity)
        fm, _ = load_sharded(fm_dir, kind, rt.comm, cfg.model.dtype, wrap=lambda m: with_lora(m, *lora, task=kind),
                             **config_overrides(fm_dir, kind, task.num_classes))
    else:
        fm = with_lora(load_model(fm_dir, kind, cfg.model.dtype, num_labels=task.num_classes).to(rt.device), *lora,
                       task=kind)
    probe = probe_data(task, probe_indices(task, f.fidelity_examples, cfg.run.seed))
    token = layers_prefix(fm.get_base_model()).rsplit(".", 1)[-1]
    out, first, fm_grads = [], None, None
    for state in states:
        torch.manual_seed(cfg.run.seed)   # the same starting adapter for every state
        proxy, _ = load_proxy(proxy_dir, task=kind, dtype=cfg.model.dtype, num_labels=task.num_classes)
        if state is not None:
            proxy.base_model.load_state_dict(state, strict=False)
        client = with_lora(proxy.to(rt.device), *lora, task=kind)
        adapter = get_adapter(client)
        # The FM side depends only on the adapter: computed once when every state starts from the same one.
        same = first is not None and adapter.keys() == first.keys() and all(
            torch.equal(adapter[k], first[k]) for k in first)
        setting = FidelitySetting(task.causal_lm, token, seed=cfg.run.seed,
                                  batch_size=f.fidelity_batch_size or f.batch_size)
        metrics, fm_grads = fidelity_with_fm_gradients(rt, client, fm, adapter, lambda a: a, probe, setting,
                                                       fm_grads if same else None)
        first = first or adapter
        out.append(metrics)
    return out


def distill_report(result: DistillResult, layers: list[int], train: torch.Tensor, held: torch.Tensor) -> dict:
    return {
        "steps": result.steps, "finite": result.finite, "compressed_layers": layers,
        "trainable_params": result.trainable_params,
        "train_chunks": int(len(train)), "held_out_chunks": int(len(held)), "chunk_tokens": int(train.shape[1]),
        "loss_first": result.losses[0] if result.losses else None,
        "loss_last": result.losses[-1] if result.losses else None, "losses": result.losses,
        "hidden_error_per_layer_before": result.errors_before,
        "hidden_error_per_layer_after": result.errors_after,
        "hidden_error_before": sum(result.errors_before) / len(result.errors_before),
        "hidden_error_after": sum(result.errors_after) / len(result.errors_after),
        "step_seconds_median": result.step_seconds, "peak_memory_mb_per_rank": result.peak_memory_mb,
        "teacher_bytes_held_per_rank": result.teacher_bytes_held, "teacher_bytes_full": result.teacher_bytes_full,
        "student_bytes_held_per_rank": result.student_bytes_held, "student_bytes_full": result.student_bytes_full,
    }


def distilled_proxy(cfg: Config, rt: Runtime, layout: RunLayout, emulator: bool = False) -> Path:
    """The distilled proxy (FedOT: emulator): distilled now unless a previous run left one made with
    this config's settings."""
    done = layout.emulator_distilled if emulator else layout.distilled
    expected = distilled_fingerprint(cfg, source_fingerprint(cfg, layout, emulator))
    if reusable(cfg, done, expected, "the distilled emulator" if emulator else "the distilled proxy"):
        return done
    return distill_proxy(cfg, rt, layout, emulator).path


# ----------------------------------------------------------------------------------------------------
# Neuron-level alignment (every fed.align_every rounds)
# ----------------------------------------------------------------------------------------------------

def alignment_run(cfg: Config, round_idx: int) -> DistillRun:
    """An alignment job: the fed section's learning rate, loss weight and short budget, a seed of
    its own per round, no checkpoints."""
    f = cfg.fed
    return DistillRun(lr=f.align_lr or cfg.distill.lr, alpha=f.align_alpha, steps=cfg.fed.align_steps, epoch_fraction=cfg.fed.align_fraction,
                      seed=cfg.run.seed * 7919 + round_idx, eval_batch=cfg.proxy.batch_size,
                      tag=f"align/round-{round_idx + 1}", progress=False)


class AlignmentStudent:
    """The proxy that neuron-level alignment distils, loaded from disk once per run.

    Each alignment distils a copy of this module, never the module itself: a DeepSpeed ZeRO-3
    engine converts the parameters of the module it wraps in place (each becomes a partition with
    ``ds_*`` attributes and an empty ``data``) and hooks every submodule, and DeepSpeed has no
    supported way back to plain parameters; a later engine would take such parameters as already
    partitioned and keep the old partitioning. At stages 1-2 the optimizer turns trainable
    parameters (a post-norm FFN's LayerNorm among them) into views of its flat buffer and hooks
    their gradients. So the module a job hands to DeepSpeed lives for that job only, and this one,
    never wrapped, is read from the proxy's files for each job (inside ZeRO-3's loading context, so
    each rank reads its partition only): a copy kept between alignment rounds would hold a whole
    proxy in every rank's host memory for the run (55 GB at 70B)."""

    def __init__(self, proxy_dir: Path, dtype: str):
        self.proxy_dir, self.dtype = proxy_dir, dtype

    def fresh(self) -> nn.Module:
        """The proxy with the weights as saved in ``proxy_dir`` (partitioned as it loads when called
        inside ZeRO-3's loading context)."""
        model, _ = load_proxy(self.proxy_dir, task="base", dtype=self.dtype)
        return model


def align_neurons(cfg: Config, rt: Runtime, student: AlignmentStudent, backbone: nn.Module, prefix: str,
                  layers: list[int], global_adapter: dict, stats: dict, public: tuple[torch.Tensor, torch.Tensor],
                  round_idx: int, fm: Optional[nn.Module] = None,
                  sink: Optional[Callable[[dict[str, torch.Tensor]], None]] = None) -> DistillResult:
    """Neuron-level distillation on all ranks: rank the neurons of each compressed layer by activity
    on client data (``stats``, summed over ranks), freeze the most active ``fed.align_keep`` share,
    distil the rest against the FM with the global adapter in both. ``backbone`` (the clients' proxy
    without its head, whose task model calls it ``prefix``) gives the current FFN weights, which
    go into a fresh copy of the ``student`` proxy; the result's ``state`` holds the new ones.

    ``fm``: the FM backbone the ranks already hold, with the global adapter plugged in (its LoRA
    layers active), used as the teacher as it is (ZeRO stages 0-2). Without it (ZeRO-3, or a caller
    that holds no FM) the FM is loaded, partitioned at stage 3, and the adapter merged into it.
    ``sink``: takes the new FFN tensors, a layer at a time at ZeRO-3, once every rank found them
    finite (the result's ``state`` is then empty)."""
    f = cfg.fed
    scaling = f.lora_alpha / f.lora_r
    gen = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + round_idx)
    splits = []
    for l in layers:
        activity = stats[l].mean_abs() if f.align_score == "mean_abs" else 1.0 - stats[l].apoz()
        splits.append(plan_neuron_split(activity, f.align_keep, gen, l))
    fm_dir = resolve_model_dir(cfg.model.path)

    def load_teacher() -> nn.Module:
        teacher = load_model(fm_dir, "base", cfg.model.dtype)
        merge_lora_into(teacher, global_adapter, scaling, gather=lambda ps: zero.gathered(ps, modifier_rank=0),
                        strip=[prefix])
        return teacher

    def load_student() -> nn.Module:
        # called inside ZeRO-3's loading context: partitioned as it loads
        model = student.fresh()
        fill_student(model, backbone, set(ffn_parameter_names(model, layers)), global_adapter, scaling, prefix)
        return model

    return run_distillation(rt, fm if fm is not None else load_teacher, load_student, layers, public[0], public[1],
                            cfg.distill, alignment_run(cfg, round_idx), splits, student_dtype=DTYPES[cfg.model.dtype],
                            sink=sink)


@torch.no_grad()
def fill_student(model: nn.Module, backbone: nn.Module, names: set[str], adapter: dict, scaling: float,
                 prefix: str) -> None:
    """The clients' FFN weights (``names``, read from ``backbone``) and the adapter's LoRA products
    written into ``model`` layer by layer: one gather of a layer's tensors at a time where ZeRO-3
    partitioned them (rank 0's values are partitioned back; every rank has the same), the FFN
    tensors first, then ``scaling * B @ A`` added to each adapted Linear."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    pattern = re.compile(rf"^{re.escape(layers_prefix(model))}\.(\d+)\.")

    def layer_of(name: str) -> int:
        m = pattern.match(name)
        return int(m.group(1)) if m else -1

    groups: dict[int, tuple[list, list]] = {}
    # in the same order on every rank: a sharded client model's full values are collectives
    for name, value in backbone.state_dict().items():
        if name in names:
            groups.setdefault(layer_of(name), ([], []))[0].append((name, value))
    for path, a, b in lora_pairs(adapter):
        path = path[len(prefix) + 1:] if path.startswith(prefix + ".") else path
        if path in modules:
            groups.setdefault(layer_of(path + "."), ([], []))[1].append((modules[path], a, b))
    for key in sorted(groups):
        ffn, merges = groups[key]
        targets = [params[n] for n, _ in ffn] + [lin.weight for lin, _, _ in merges]
        with zero.gathered(targets, modifier_rank=0):
            for name, value in ffn:
                params[name].copy_(full_value(value).to(params[name].device, params[name].dtype))
            for lin, a, b in merges:
                add_lora_product(lin.weight, a, b, scaling)


def alignment_metrics(result: DistillResult) -> dict:
    """The metrics row entries of an alignment round."""
    return {"align_steps": result.steps, "align_loss_first": result.losses[0], "align_loss_last": result.losses[-1],
            "align_error_before": sum(result.errors_before) / len(result.errors_before),
            "align_error_after": sum(result.errors_after) / len(result.errors_after),
            "align_ffn_bytes": result.state_bytes,
            "align_step_seconds": result.step_seconds, "align_set_up_seconds": result.extra["set_up_seconds"],
            "align_teacher_in_memory": result.extra["teacher_in_memory"]}


def public_pair(cfg: Config, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(training chunks, held-out chunks) of the public text for alignment."""
    return (public_chunks(cfg, tokenizer, "train", cfg.distill.max_chunks),
            public_chunks(cfg, tokenizer, "held_out", cfg.distill.eval_chunks))


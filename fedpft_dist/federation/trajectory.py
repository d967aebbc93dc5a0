"""Scoring a client model along a fixed adapter trajectory.

The fidelity monitor of a run measures the client model at the adapters its own training reached, so
two variants (two proxies, a proxy and an emulator) are measured at different points. A trajectory
is a sequence of global adapters saved once (``fed.save_round_adapters``, for example every round of
one FedPETuning run); scoring puts each of them into the client model of a config and into the FM,
and measures the gradient fidelity and the update transfer there. Variants scored on the same
trajectory are compared on the same adapters.

Each adapter enters the client model through the part of it the client model can hold (its LoRA
tensors, renamed from the FM's layers to the client's where an emulator numbers them differently);
tensors the trajectory lacks keep the client's seeded starting values. The FM gets what the client
holds, as in the monitor, so both sides carry the same adapter.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..alignment.fidelity import gradient_fidelity, probe_data, probe_indices
from ..checkpoint import CheckpointInvalid, checkpoint_dirs, load_checkpoint
from ..config import Config
from ..data.tasks import prepare_task
from ..errors import UserError
from ..models.adapters import get_adapter
from ..models.families import layers_prefix
from ..models.loading import load_tokenizer, resolve_model_dir, resolve_task
from ..run_layout import RunLayout
from ..runtime import Runtime
from .build import build_models
from .callbacks import fidelity_setting, transfer_setting
from .methods import get_method
from .run_models import Models
from .transfer import update_transfer

PREFIX = "round-"


@dataclass
class Trajectory:
    rounds: list[int]
    adapters: list[dict[str, torch.Tensor]]   # FM module names
    meta: list[dict]


def load_trajectory(root: Path) -> Trajectory:
    """The round adapters under ``root`` (``round-NNNNNN/`` as ``fed.save_round_adapters`` writes them),
    in round order; every one must verify against the sizes and hashes written with it."""
    dirs = sorted(checkpoint_dirs(root, PREFIX))
    if not dirs:
        raise UserError(f"--trajectory: no round adapters ({PREFIX}NNNNNN/) in {root}; train a run with "
                        f"fed.save_round_adapters=true to make one")
    out = Trajectory([], [], [])
    for d in dirs:
        try:
            tensors, meta = load_checkpoint(d)
        except CheckpointInvalid as exc:
            raise UserError(f"--trajectory: {d} does not verify: {exc}") from None
        if "adapter" not in tensors or not isinstance(meta.get("round"), int):
            raise UserError(f"--trajectory: {d} is not a round adapter (no adapter.safetensors or round number)")
        out.rounds.append(meta["round"])
        out.adapters.append(tensors["adapter"])
        out.meta.append(meta)
    return out


def client_names(models: Models, start: dict[str, torch.Tensor]) -> dict[str, str]:
    """FM tensor name -> client tensor name, for every tensor of the client's adapter."""
    return {next(iter(models.to_fm({k: v}))): k for k, v in start.items()}


def into_client(fm_adapter: dict[str, torch.Tensor], names: dict[str, str], start: dict[str, torch.Tensor],
                where: str) -> tuple[dict[str, torch.Tensor], int]:
    """The client adapter holding ``fm_adapter``'s tensors where the client has them (``start``'s
    values elsewhere), and how many of the client's tensors the trajectory supplied."""
    adapter, found = dict(start), 0
    for fm_key, key in names.items():
        if fm_key in fm_adapter:
            value = fm_adapter[fm_key]
            if value.shape != start[key].shape:
                raise UserError(f"--trajectory: {where}: {fm_key} has shape {tuple(value.shape)}, the client model's "
                                f"{tuple(start[key].shape)}: fed.lora_r and fed.lora_targets must be the trajectory's")
            adapter[key] = value.to(start[key].dtype)
            found += 1
    if not any(".lora_" in names[k] for k in names if k in fm_adapter):
        raise UserError(f"--trajectory: {where} holds none of the client model's LoRA tensors (another model or "
                        f"fed.lora_targets?)")
    return adapter, found


def score_trajectory(cfg: Config, rt: Runtime, trajectory: Trajectory,
                     progress: Optional[Callable[[dict], None]] = None) -> dict:
    """Build the client model of ``cfg`` (its proxy or emulator as a run would, reused by fingerprint),
    the FM and the probe set, then the gradient fidelity and the update transfer at every adapter of
    ``trajectory`` (every rank; collectives inside). Returns the rows, their means and the costs."""
    f = cfg.fed
    method = get_method(f.method)
    if not method.uses_proxy:
        raise UserError(f"fed.method: {f.method} trains the FM itself: there is no client model to score "
                        f"(use fedpft, fedot or one of fedpft's ablations)")
    if method.full_tuning(cfg):
        raise UserError(f"fed.fedot_tuning: full tuning trains whole layers, not the LoRA a trajectory holds: set "
                        f"fed.fedot_tuning=lora to score the emulator along a LoRA trajectory")
    t0 = time.perf_counter()
    fm_dir = resolve_model_dir(cfg.model.path)
    kind = resolve_task(cfg, fm_dir)
    task = prepare_task(cfg, load_tokenizer(fm_dir), kind)
    groups = rt.client_groups(cfg.dist.ranks_per_client)
    models = build_models(cfg, rt, method, RunLayout.from_config(cfg), task.num_classes, fm_dir, kind, groups)
    probe = probe_data(task, probe_indices(task, f.fidelity_examples, cfg.run.seed))
    token = layers_prefix(models.evaluate.get_base_model()).rsplit(".", 1)[-1]
    setting = fidelity_setting(cfg, task.causal_lm, models, token)
    sharded = groups if f.client_sharding != "none" else None
    start = get_adapter(models.client)
    names = client_names(models, start)
    build_seconds = time.perf_counter() - t0
    rows = []
    for i, (rnd, fm_adapter) in enumerate(zip(trajectory.rounds, trajectory.adapters)):
        t1 = time.perf_counter()
        adapter, found = into_client(fm_adapter, names, start, f"round {rnd}")
        row = {"round": rnd, "tensors_from_trajectory": found, "client_tensors": len(start)}
        row.update(gradient_fidelity(rt, models.client, models.evaluate, adapter, models.to_fm, probe, setting,
                                     sharded))
        if f.fidelity_transfer_steps:
            row.update(update_transfer(models.client, models.evaluate, adapter, models.to_fm, probe,
                                       transfer_setting(cfg, task.causal_lm, f.lr, i),
                                       groups.comm if sharded else None,
                                       rt.comm if cfg.model.fm_sharding != "none" else None))
        row["seconds"] = round(time.perf_counter() - t1, 4)
        rows.append(row)
        if progress is not None:
            progress(row)
    return {"method": f.method, "model": cfg.model.path, "client_model": str(models.proxy_dir),
            "world_size": rt.world_size, "probe_examples": len(probe), "common_layers": list(setting.common_layers),
            "transfer_steps": f.fidelity_transfer_steps, "rounds": rows, **means(rows),
            "build_seconds": round(build_seconds, 4), "score_seconds": round(sum(r["seconds"] for r in rows), 4)}


def means(rows: list[dict]) -> dict:
    """The mean of each headline figure over the rounds that have it."""
    out = {}
    for key in ("grad_cosine", "grad_cosine_common", "grad_example_cosine", "grad_norm_ratio", "transfer"):
        values = [r[key] for r in rows if r.get(key) is not None and math.isfinite(r[key])]
        out[f"mean_{key}"] = sum(values) / len(values) if values else None
    return out

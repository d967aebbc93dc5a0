"""Building the models of a federated run (:class:`~fedpft_dist.federation.run_models.Models`): the
peft model the clients train (proxy, emulator or FM, as the method says) and the FM's peft model that
the global adapter is plugged into for evaluation."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..config import Config
from ..errors import ConfigError
from ..models.adapters import adapter_slots, full_width_layers, rebind_adapter_slots, with_full_layers, with_lora
from ..models.compat import activation_checkpointing
from ..models.families import layers_prefix, transformer_layers
from ..models.loading import config_overrides, load_model
from ..models.sharded import build_on_meta, materialise_sharded, real_new_parameters
from ..models.proxy import count_params, load_proxy, read_proxy_meta, resolve_retained_layers
from ..run_layout import RunLayout
from ..runtime import ClientGroups, Runtime
from ..runtime.shard import local_parameter_bytes, shard_client_model
from .methods import Method
from .run_models import Models


def non_embedding_params(model: nn.Module) -> int:
    """Parameters outside embedding tables: the ones every token's compute touches."""
    emb = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in emb)


def _checkpointing(model: nn.Module, on: bool) -> None:
    """Per-layer gradient checkpointing in training mode (evaluation never stores activations).
    Non-reentrant: the frozen embeddings' outputs need not require grad, and dropout masks repeat."""
    if on:
        activation_checkpointing(model, True)


def check_client_sharding(cfg: Config, method: Method, groups: Optional[ClientGroups]) -> None:
    """``fed.client_sharding`` needs client groups of 2 or more ranks, and a client model of its own."""
    f = cfg.fed
    if f.client_sharding == "none":
        return
    if groups is None or groups.size < 2:
        raise ConfigError("fed.client_sharding", f"{f.client_sharding!r} shards the client model over a client group: "
                                                 "set dist.ranks_per_client to 2 or more")
    if not method.uses_proxy and cfg.model.fm_sharding == "none":
        raise ConfigError("fed.client_sharding", f"fed.method={f.method} trains the FM itself, which evaluation uses "
                                                 "whole on every rank: shard it with model.fm_sharding=fsdp")


def check_fm_sharding(cfg: Config, rt: Runtime, method: Method, groups: Optional[ClientGroups]) -> None:
    """``model.fm_sharding: fsdp`` needs 2 or more ranks and alignment at ZeRO-3 (whose teacher is
    partitioned; at stages 0-2 the teacher is the FM in memory). A method whose clients train the FM
    itself (FedPETuning) holds it sharded over each client group, which trains one client at a time
    with the batch split over its ranks: groups of 2 or more with ``fed.client_sharding: fsdp``."""
    if cfg.model.fm_sharding == "none":
        return
    if rt.world_size < 2:
        raise ConfigError("model.fm_sharding", "'fsdp' shards the FM over the ranks: run on 2 or more")
    if not method.uses_proxy and (groups is None or groups.size < 2 or cfg.fed.client_sharding == "none"):
        raise ConfigError("model.fm_sharding", f"fed.method={cfg.fed.method} trains the FM itself at the clients, so "
                                               "each client group holds it sharded: set dist.ranks_per_client to 2 "
                                               "or more and fed.client_sharding=fsdp")
    if method.aligns and cfg.fed.align_every > 0 and cfg.distill.zero_stage != 3:
        raise ConfigError("distill.zero_stage", "with model.fm_sharding=fsdp, alignment's teacher is the FM "
                                                "partitioned by ZeRO-3: set 3")


def build_models(cfg: Config, rt: Runtime, method: Method, layout: RunLayout, num_labels: int, fm_dir: Path,
                 task: str, groups: Optional[ClientGroups] = None) -> Models:
    """The clients' peft model and the FM's (for plug-in evaluation) for ``method`` and ``task``.
    Every rank loads the whole FM, or with ``model.fm_sharding`` its shard of it (built on the meta
    device): sharded over the world when the clients hold a proxy or an emulator (the FM is only
    evaluated and probed, which all ranks do together), over the client group when the clients train
    the FM itself. With ``fed.client_sharding`` the client model is sharded over the ranks of this
    rank's client group (``groups``)."""
    f = cfg.fed
    check_client_sharding(cfg, method, groups)
    check_fm_sharding(cfg, rt, method, groups)
    sharding = f.client_sharding != "none"
    fm_sharded = cfg.model.fm_sharding != "none"
    lora = (f.lora_r, f.lora_alpha, f.lora_dropout)
    dropout = None if cfg.model.dropout < 0 else cfg.model.dropout
    torch.manual_seed(cfg.run.seed)  # the head's initialisation is part of the shared starting point
    if fm_sharded:   # on the meta device until its shards are read, after the adapter is attached
        fm = build_on_meta(fm_dir, task, cfg.model.dtype, **config_overrides(fm_dir, task, num_labels, dropout))
    else:
        fm = load_model(fm_dir, task, cfg.model.dtype, num_labels=num_labels, dropout=dropout).to(rt.device)
    fm_prefix = fm.base_model_prefix
    fm_params = count_params(fm)
    ffn = f.lora_targets == "attention+ffn"
    if not method.uses_proxy:
        nonemb = non_embedding_params(fm)
        _checkpointing(fm, f.gradient_checkpointing)
        attention_fm = None
        if f.lora_attention_layers == "retained":
            attention_fm = resolve_retained_layers(cfg.proxy.retained_layers, len(transformer_layers(fm)))
        with real_new_parameters():   # LoRA's initialisation kept when the FM is on the meta device
            model = with_lora(fm, *lora, task=task, ffn_layers=fm_ffn_lora_layers(cfg, fm) if ffn else [],
                              attention_layers=attention_fm)
        if fm_sharded:   # the client model and the evaluated one, sharded over this rank's client group
            materialise_sharded(model, fm_dir, groups.comm, fm_prefix)
        held = local_parameter_bytes(model)
        return Models(model, model, None, [], fm_params, fm_params, nonemb, held, held)
    proxy_dir = method.client_model(cfg, rt, layout)
    meta = read_proxy_meta(proxy_dir)
    torch.manual_seed(cfg.run.seed)
    proxy, _ = load_proxy(proxy_dir, task=task, dtype=cfg.model.dtype, num_labels=num_labels, dropout=dropout)
    if not sharding:
        proxy = proxy.to(rt.device)   # sharded: fully_shard moves each rank's shards there, not the whole proxy
    _checkpointing(proxy, f.gradient_checkpointing)
    client_params, nonemb = count_params(proxy), non_embedding_params(proxy)  # before LoRA is added
    layer_map = meta.get("layer_map")
    whole = [j for j in range(len(transformer_layers(proxy))) if j not in meta["compressed_layers"]]
    on_fm = (lambda layers: [layer_map[j] for j in layers]) if layer_map is not None else (lambda layers: layers)
    if method.full_tuning(cfg):
        if sharding:
            raise ConfigError("fed.client_sharding", "clients that tune whole layers (fed.fedot_tuning=full) hold "
                                                     "unsharded models: set fed.fedot_tuning=lora to shard")
        # the layers the client holds whole train in full; the FM's copies of them take the result
        client = with_full_layers(proxy, whole, task=task)
        evaluate = with_full_layers(fm, on_fm(whole), task=task)
    else:
        client_ffn = _ffn_lora_layers(proxy, fm, meta) if ffn else []
        attention = None
        if not method.tune_compressed or f.lora_attention_layers == "retained":
            attention = whole
        # LoRA's initialisation draws from the seeded generator: client model first, then the FM.
        client = with_lora(proxy, *lora, task=task, ffn_layers=client_ffn, attention_layers=attention)
        evaluate = with_lora(fm, *lora, task=task, ffn_layers=on_fm(client_ffn),
                             attention_layers=None if attention is None else on_fm(attention))
    if fm_sharded:
        materialise_sharded(evaluate, fm_dir, rt.comm, fm_prefix)
    if sharding:
        adapter_slots(client)   # found by storage, which only plain tensors have: before sharding
        shard_client_model(client, transformer_layers(client.get_base_model()), groups.comm)
        rebind_adapter_slots(client)
    models = Models(client, evaluate, proxy_dir, list(meta["compressed_layers"]), client_params, fm_params, nonemb,
                    client_bytes_per_rank=local_parameter_bytes(client),
                    fm_bytes_per_rank=local_parameter_bytes(evaluate))
    if layer_map is not None and method.to_fm is not None:  # an emulator numbers its layers differently
        token = layers_prefix(proxy)
        models.to_fm = lambda adapter: method.to_fm(adapter, layer_map, token)
    return models


def fm_ffn_lora_layers(cfg: Config, fm: nn.Module) -> list[int]:
    """The FM layers whose FFN carries LoRA when the client model is the FM itself: the proxy's
    retained layers (``fed.lora_ffn_layers=retained``, the adapter FedPFT's clients tune) or all."""
    n = len(transformer_layers(fm))
    if cfg.fed.lora_ffn_layers == "all":
        return list(range(n))
    return resolve_retained_layers(cfg.proxy.retained_layers, n)


def _ffn_lora_layers(proxy: nn.Module, fm: nn.Module, meta: dict) -> list[int]:
    """A proxy's compressed layers are narrower than the FM's (and alignment rewrites them; an
    emulator's middle layers stand for several FM layers), so FFN LoRA goes on the layers the client
    holds whole: LoRA on W_gate/W_up/W_down there has the FM's shapes and plugs in as it is."""
    layers = full_width_layers(proxy, fm, meta.get("layer_map"), exclude=meta["compressed_layers"])
    if not layers:
        raise ConfigError("fed.lora_targets", "no layer of the client model keeps the FM's whole FFN "
                                              "(proxy.retained_layers is empty), so no FFN LoRA would fit the FM")
    return layers

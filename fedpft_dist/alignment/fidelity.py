"""Gradient fidelity: how well the client model's LoRA gradients stand in for the FM's.

FedPFT's premise is that the gradient a client computes on the proxy points where the FM's gradient
would. On a fixed probe set, with the same adapter plugged into both, this module computes the
gradient of the summed loss with respect to every adapter tensor of the client model (proxy or
emulator) and of the FM, and compares them:

    grad_cosine     = <g_client, g_FM> / (|g_client| |g_FM|)     over the attention/FFN LoRA tensors
    grad_rel_error  = |g_client - g_FM| / |g_FM|
    grad_cosine_head, grad_cosine_per_layer, grad_rel_error_per_layer   the same per part

The probe examples are sharded over ranks (rank r takes every W-th one); each rank sums its
examples' gradients and one all-reduce of both gradient vectors (float64) gives every rank the
totals, so the numbers do not depend on the number of ranks. Dropout is off (eval mode): the
gradients are deterministic.
"""
from __future__ import annotations

import re
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.tasks import ClientData, Task
from ..models.adapters import set_adapter
from ..models.lm import next_token_labels, next_token_sums
from ..runtime import ClientGroups, Communicator, Runtime
from ..runtime.shard import full_value

LORA_MARK = (".lora_A.", ".lora_B.")


def probe_indices(task: Task, n: int, seed: int) -> torch.Tensor:
    """A fixed seeded subset of the test set (rows), the same on every rank."""
    total = len(task.test_ids)
    g = torch.Generator().manual_seed(seed * 7_368_787 + 17)
    return torch.sort(torch.randperm(total, generator=g)[:min(n, total)]).values


def probe_data(task: Task, rows: torch.Tensor) -> ClientData:
    types = task.test_types[rows] if task.test_types is not None else None
    labels = task.test_labels[rows] if task.test_labels is not None else None
    return ClientData(task.test_ids[rows], task.test_mask[rows], labels, types)


def _adapter_key(param_name: str) -> str:
    """A peft parameter name as the adapter's state dict names it (no adapter name, no
    modules_to_save wrapper)."""
    return param_name.replace(".modules_to_save.default.", ".").replace(".default.", ".")


def adapter_gradients(model: nn.Module, adapter: dict[str, torch.Tensor], data: ClientData, batch_size: int,
                      loss_fn: Callable[[nn.Module, dict, Optional[torch.Tensor]], torch.Tensor],
                      group: Optional[Communicator] = None) -> dict[str, torch.Tensor]:
    """Sum over ``data``'s examples of d(loss)/d(adapter tensor), float64 on the CPU, keyed like the
    adapter. ``loss_fn(model, batch, labels)`` returns the batch's summed loss. The model's
    gradients are cleared before and after; its train/eval mode is restored.

    ``group``: the model is sharded over this client group, whose ranks all call this with the same
    ``data``; each computes its row block of every batch (the sharded backward sums them), and the
    group's first rank returns the sums (the others zeros), so that summing over ranks counts them once."""
    set_adapter(model, adapter)
    was_training = model.training
    model.eval()
    params = {_adapter_key(n): p for n, p in model.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = None
    device = next(iter(params.values())).device
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        weight = 1.0
        if group is not None:
            rows = idx.tensor_split(group.world_size)[group.rank]
            # every rank of a sharded model runs each forward and backward: one row at weight 0 if none
            idx, weight = (rows, 1.0) if len(rows) else (idx[:1], 0.0)
        mask = data.attention_mask[idx]
        width = max(1, int(data.attention_mask[start: start + batch_size].sum(1).max()))
        batch = {"input_ids": data.input_ids[idx, :width].to(device), "attention_mask": mask[:, :width].to(device)}
        if data.token_type_ids is not None:
            batch["token_type_ids"] = data.token_type_ids[idx, :width].to(device)
        labels = data.labels[idx].to(device) if data.labels is not None else None
        (weight * loss_fn(model, batch, labels)).backward()
    keep = group is None or group.rank == 0
    grads = {}
    for k, p in params.items():
        g = full_value(p.grad.detach()) if p.grad is not None else torch.zeros(p.shape)
        grads[k] = g.double().cpu() if keep else torch.zeros(p.shape, dtype=torch.float64)
    for p in params.values():
        p.grad = None
    model.train(was_training)
    return grads


def classification_loss(model: nn.Module, batch: dict, labels: Optional[torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(**batch).logits.float(), labels, reduction="sum")


def next_token_loss(model: nn.Module, batch: dict, labels: Optional[torch.Tensor]) -> torch.Tensor:
    total, _, _ = next_token_sums(model(**batch).logits, next_token_labels(batch["input_ids"], batch["attention_mask"]))
    return total.float()


def compare(client: dict[str, torch.Tensor], fm: dict[str, torch.Tensor], layer_token: str) -> dict:
    """Cosine and relative error of the client's gradients against the FM's, over the tensors both
    have: LoRA tensors (total and per FM layer) and, separately, the head."""
    keys = sorted(set(client) & set(fm))
    lora = [k for k in keys if any(m in k for m in LORA_MARK)]
    head = [k for k in keys if k not in lora]
    pattern = re.compile(rf"(?:^|\.){re.escape(layer_token)}\.(\d+)\.")
    by_layer: dict[int, list[str]] = {}
    for k in lora:
        m = pattern.search(k)
        if m:
            by_layer.setdefault(int(m.group(1)), []).append(k)
    out = {"grad_cosine": None, "grad_rel_error": None, **_pair_stats(client, fm, lora)}
    out.update({f"{k}_head": v for k, v in _pair_stats(client, fm, head).items()})
    layers = range(max(by_layer) + 1) if by_layer else range(0)
    per = [_pair_stats(client, fm, by_layer[l]) if l in by_layer else None for l in layers]
    out["grad_cosine_per_layer"] = [p["grad_cosine"] if p else None for p in per]
    out["grad_rel_error_per_layer"] = [p["grad_rel_error"] if p else None for p in per]
    return out


def _pair_stats(client: dict, fm: dict, keys: list[str]) -> dict:
    if not keys:
        return {}
    a = torch.cat([client[k].reshape(-1) for k in keys])
    b = torch.cat([fm[k].reshape(-1) for k in keys])
    na, nb = float(a.norm()), float(b.norm())
    # None where undefined (a zero gradient): metrics rows stay valid JSON
    cos = float(a @ b) / (na * nb) if na > 0 and nb > 0 else None
    rel = float((a - b).norm()) / nb if nb > 0 else None
    return {"grad_cosine": cos, "grad_rel_error": rel}


def _rows(data: ClientData, rows: torch.Tensor) -> ClientData:
    return ClientData(*(t[rows] if t is not None else None for t in
                        (data.input_ids, data.attention_mask, data.labels, data.token_type_ids)))


def gradient_fidelity(rt: Runtime, client_model: nn.Module, fm_model: nn.Module, client_adapter: dict,
                      to_fm: Callable[[dict], dict], probe: ClientData, batch_size: int, causal: bool,
                      layer_token: str, sharded_over: Optional[ClientGroups] = None) -> dict:
    """The fidelity of ``client_model``'s adapter gradients against ``fm_model``'s, with
    ``client_adapter`` in the client model and ``to_fm(client_adapter)`` in the FM, on this rank's
    share of ``probe`` (every rank calls it; one all-reduce). ``sharded_over``: the client groups
    the client model is sharded over (its share of the probe is then the group's)."""
    return fidelity_with_fm_gradients(rt, client_model, fm_model, client_adapter, to_fm, probe, batch_size, causal,
                                      layer_token, sharded_over=sharded_over)[0]


def fidelity_with_fm_gradients(rt: Runtime, client_model: nn.Module, fm_model: nn.Module, client_adapter: dict,
                               to_fm: Callable[[dict], dict], probe: ClientData, batch_size: int, causal: bool,
                               layer_token: str, fm_gradients: Optional[dict] = None,
                               sharded_over: Optional[ClientGroups] = None) -> tuple[dict, dict]:
    """:func:`gradient_fidelity`, and the FM's gradients summed over ranks, so that a caller comparing
    several client models with the same FM and adapter computes the FM side once: given
    ``fm_gradients`` (what an earlier call returned), the FM is not run again."""
    share = _rows(probe, torch.arange(rt.rank, len(probe), rt.world_size))
    loss_fn = next_token_loss if causal else classification_loss
    if sharded_over is None:
        g_client = adapter_gradients(client_model, client_adapter, share, batch_size, loss_fn)
    else:
        group_share = _rows(probe, torch.arange(sharded_over.index, len(probe), sharded_over.count))
        g_client = adapter_gradients(client_model, client_adapter, group_share, batch_size, loss_fn, sharded_over.comm)
    g_client = to_fm(g_client)
    both = {f"client/{k}": v for k, v in g_client.items()}
    if fm_gradients is None:
        g_fm = adapter_gradients(fm_model, to_fm(client_adapter), share, batch_size, loss_fn)
        both.update({f"fm/{k}": v for k, v in g_fm.items()})
    total = rt.comm.all_reduce_sum(both, name="fidelity/gradients")
    client = {k[len("client/"):]: v for k, v in total.items() if k.startswith("client/")}
    fm = fm_gradients if fm_gradients is not None else {k[len("fm/"):]: v for k, v in total.items()
                                                        if k.startswith("fm/")}
    return {**compare(client, fm, layer_token), "grad_probe_examples": len(probe)}, fm

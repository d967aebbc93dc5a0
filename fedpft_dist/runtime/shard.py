"""Sharding a client model over the ranks of its client group (``fed.client_sharding: fsdp``).

PyTorch FSDP2 (``fully_shard``) over the group's process group: every parameter becomes a DTensor
sharded along its first dimension, so a rank holds 1/G of the frozen weights, of the LoRA adapter
and of its AdamW state; each transformer layer's full weights are all-gathered for its forward and
backward and freed after. FSDP2 was chosen over DeepSpeed ZeRO-3 for the clients because the client
loop is a plain torch loop with a fresh AdamW per client: FSDP2 shards per parameter, takes any torch
optimizer, keeps frozen and trainable parameters in one module, and needs no engine rebuilt for
every client (DeepSpeed stays the distillations' back-end, in ``alignment``).

Gradients are summed inside the group, not averaged: each rank's loss is already its share of the
whole batch's mean (see ``federation.client.train_client``), so the sum is the batch's gradient.

A sharded parameter must never be read or written as a plain tensor: :func:`full_value` gathers it
(a collective of the group: every rank of the group calls it, in the same order) and
:func:`assign_full` writes a full value into this rank's shard (local, no communication).
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor

from .comm import Communicator


def is_sharded(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


def shard_client_model(model: nn.Module, layers: Iterable[nn.Module], comm: Communicator) -> None:
    """``fully_shard`` each of ``layers`` (the transformer blocks: one all-gather each) and then the
    whole ``model`` (embeddings, head) over the ranks of ``comm`` (a client group, or the world), > 1."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    import torch.distributed as dist

    if comm.world_size < 2:
        raise ValueError("shard_client_model needs at least 2 ranks")
    device_type = "cuda" if comm.device.type == "cuda" else "cpu"
    mesh = DeviceMesh.from_group(comm.group if comm.group is not None else dist.group.WORLD, device_type=device_type)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    # Every sharded module's own setting (they do not inherit the root's): a plain SUM reduce-scatter
    # (gloo has no PREMUL_SUM for it), divided by 1.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
            module.set_gradient_divide_factor(1.0)


def shard_rows(param: torch.Tensor) -> tuple[int, int]:
    """(first row, row count) of this rank's shard of a parameter FSDP2 shards along dim 0: with
    ``n`` rows over ``W`` ranks, rank ``r`` holds rows from ``r * ceil(n / W)`` (torch.chunk's split)."""
    from torch.distributed.tensor import Shard

    if len(param.placements) != 1 or not isinstance(param.placements[0], Shard) or param.placements[0].dim != 0:
        raise ValueError(f"expected a parameter sharded along dim 0, got placements {param.placements}")
    world, rank = param.device_mesh.size(), param.device_mesh.get_local_rank()
    chunk = math.ceil(param.shape[0] / world)
    return min(param.shape[0], rank * chunk), param.to_local().shape[0]


def full_value(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind ``t``: gathered from the group when sharded (a collective), else ``t``."""
    if is_sharded(t):
        return t.full_tensor()
    return t


def assign_full(param: torch.Tensor, value: torch.Tensor) -> None:
    """Write the whole tensor ``value`` into ``param``: its local shard when sharded (every rank of
    the group holds ``value`` whole; no communication), in place otherwise."""
    with torch.no_grad():
        if is_sharded(param):
            local = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                                      src_data_rank=None).to_local()
            param.to_local().copy_(local)
        else:
            param.copy_(value)


def load_full_state(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """``module.load_state_dict(state, strict=False)`` for whole tensors, whether or not the module's
    parameters are sharded (buffers are never sharded)."""
    own = dict(module.named_parameters())
    plain = {}
    for name, value in state.items():
        if name in own and is_sharded(own[name]):
            assign_full(own[name], value)
        else:
            plain[name] = value
    if plain:
        unexpected = module.load_state_dict(plain, strict=False).unexpected_keys
        if unexpected:
            raise KeyError(f"tensors that fit no parameter or buffer: {unexpected[:3]}")


def local_parameter_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters this rank holds (its shards when sharded)."""
    return sum((p.to_local() if is_sharded(p) else p).numel() * p.element_size() for p in module.parameters())

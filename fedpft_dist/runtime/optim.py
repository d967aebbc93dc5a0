"""The AdamW that client training and distillation build: torch's fused CUDA kernel where every
parameter allows it (one launch per step for all tensors, and the step count kept on the device, so
the optimizer step reads nothing back to the host), torch's default implementation elsewhere."""
from __future__ import annotations

from typing import Iterable, Union

import torch

# the dtypes torch's fused Adam(W) kernels take on CUDA
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

ParamsOrGroups = Union[Iterable[torch.Tensor], Iterable[dict]]


def fusable(params: Iterable[torch.Tensor]) -> bool:
    """True when every parameter (there is at least one) is a CUDA tensor of a dtype the fused kernel
    takes (an FSDP2 shard, a DTensor, counts by its device too)."""
    params = list(params)
    return bool(params) and all(p.device.type == "cuda" and p.dtype in FUSED_DTYPES for p in params)


def adamw(params: ParamsOrGroups, **kwargs) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, **kwargs)``, with ``fused=True`` when :func:`fusable` says so.
    On the CPU it is the plain AdamW, bit for bit what it was."""
    params = list(params)
    flat = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else params
    if fusable(flat):
        kwargs.setdefault("fused", True)
    return torch.optim.AdamW(params, **kwargs)

"""The adapter that clients train and the server averages: LoRA on every attention projection plus
the task head, trained in full. Same module names on the FM and on the proxy, so one state dict
moves between them."""
from __future__ import annotations

import contextlib

from typing import Sequence

import torch
import torch.nn as nn

from ..models.families import layout_for

ADAPTER_PREFIX = "base_model.model."


def head_modules(model: nn.Module) -> list[str]:
    """Top-level modules of a task model that are not its backbone and hold parameters (the head)."""
    backbone = model.base_model_prefix
    return [n for n, m in model.named_children()
            if n != backbone and any(p.numel() for p in m.parameters())]


def lora_config(model: nn.Module, r: int, alpha: float, dropout: float):
    from peft import LoraConfig

    layout = layout_for(model.config.model_type)
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(layout.attention),
                      modules_to_save=head_modules(model), bias="none")


def with_lora(model: nn.Module, r: int, alpha: float, dropout: float) -> nn.Module:
    """``model`` wrapped by peft: LoRA on attention, the head trainable, everything else frozen."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, r, alpha, dropout))


def get_adapter(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (peft's own naming, as saved by ``save_pretrained``), detached copies."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def set_adapter(peft_model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise KeyError(f"adapter tensors that fit no module: {unexpected[:3]}")


def adapter_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


def is_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values())


def lora_pairs(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(module path inside the task model, A, B) for every LoRA-adapted module of the adapter."""
    out = []
    for key in sorted(state):
        if key.endswith(".lora_A.weight"):
            path = key[: -len(".lora_A.weight")]
            path = path[len(ADAPTER_PREFIX):] if path.startswith(ADAPTER_PREFIX) else path
            out.append((path, state[key], state[key.replace(".lora_A.", ".lora_B.")]))
    return out


def merge_lora_into(model: nn.Module, state: dict[str, torch.Tensor], scaling: float,
                    gather=None, strip: Sequence[str] = ()) -> int:
    """Add ``scaling * B @ A`` of every LoRA pair to the matching Linear of ``model`` (a plain model,
    possibly a backbone without the task model's prefix: give the prefixes to ``strip``). ``gather``
    is a context factory for partitioned weights (ZeRO-3); returns the number of merged modules."""
    modules = dict(model.named_modules())
    merged = 0
    for path, a, b in lora_pairs(state):
        for prefix in strip:
            if path.startswith(prefix + "."):
                path = path[len(prefix) + 1:]
        lin = modules.get(path)
        if lin is None:
            continue
        ctx = gather([lin.weight]) if gather is not None else contextlib.nullcontext()
        with ctx, torch.no_grad():
            lin.weight.add_((b.float() @ a.float()).to(lin.weight.dtype) * scaling)
        merged += 1
    return merged


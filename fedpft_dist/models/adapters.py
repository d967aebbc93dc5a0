"""The adapter that clients train and the server averages: LoRA on every attention projection (and,
with ``fed.lora_targets=attention+ffn``, on the FFN projections of the layers listed in
``ffn_layers``) plus, for classification, the task head trained in full. Same module names on the FM
and on the proxy, so one state dict moves between them.

FFN LoRA only goes on layers whose FFN has the FM's full width in the client model: on a compressed
layer, W_gate/W_up have fewer output rows and W_down fewer input columns than on the FM, so the LoRA
matrices would not fit the FM's modules."""
from __future__ import annotations

import contextlib

from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..runtime.shard import assign_full, full_value, is_sharded
from .families import ffn_width, layers_prefix, layout_for, transformer_layers

ADAPTER_PREFIX = "base_model.model."


def head_modules(model: nn.Module) -> list[str]:
    """Top-level modules of a task model that are not its backbone and hold parameters (the head)."""
    backbone = model.base_model_prefix
    return [n for n, m in model.named_children()
            if n != backbone and any(p.numel() for p in m.parameters())]


def ffn_target_names(model: nn.Module, layers: Sequence[int]) -> list[str]:
    """Full module names of the FFN projections of ``layers`` (W_gate, W_up, W_down / W_in, W_out)."""
    layout = layout_for(model.config.model_type)
    prefix = layers_prefix(model)
    return [f"{prefix}.{l}.{path}" for l in layers for path in (*layout.rows, *layout.cols)]


def full_width_layers(client: nn.Module, fm: nn.Module, layer_map: Sequence[int] | None = None,
                      exclude: Sequence[int] = ()) -> list[int]:
    """Layers of ``client`` whose FFN is as wide as that of the FM layer they stand for
    (``layer_map[j]``, default j), minus ``exclude``."""
    layout = layout_for(client.config.model_type)
    ours, theirs = transformer_layers(client), transformer_layers(fm)
    mapping = list(layer_map) if layer_map is not None else list(range(len(ours)))
    return [j for j, layer in enumerate(ours)
            if j not in set(exclude) and ffn_width(layer, layout) == ffn_width(theirs[mapping[j]], layout)]


def lora_config(model: nn.Module, r: int, alpha: float, dropout: float, task: str = "sequence-classification",
                ffn_layers: Sequence[int] = (), attention_layers: Optional[Sequence[int]] = None):
    """LoRA on the attention projections (of every layer, or of ``attention_layers``) and the FFN
    projections of ``ffn_layers``. A classifier's head trains in full; a causal LM's output layer
    (tied to the embeddings) stays frozen."""
    from peft import LoraConfig

    layout = layout_for(model.config.model_type)
    if attention_layers is None:
        attention = list(layout.attention)
    else:
        prefix = layers_prefix(model)
        attention = [f"{prefix}.{l}.{path}" for l in attention_layers for path in layout.attention]
    targets = attention + ffn_target_names(model, ffn_layers)
    causal = task == "causal-lm"
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                      modules_to_save=None if causal else head_modules(model), bias="none",
                      task_type="CAUSAL_LM" if causal else None)


def full_layers_config(model: nn.Module, layers: Sequence[int], task: str = "sequence-classification"):
    """No LoRA anywhere: every parameter of the transformer layers ``layers`` trains in full (peft's
    ``modules_to_save``: each such layer holds a trainable copy, which the adapter's state dict carries
    under the layer's own names), and a classifier's head as with LoRA. Offsite-Tuning's adapter."""
    from peft import LoraConfig
    from peft.utils.constants import DUMMY_TARGET_MODULES

    prefix = layers_prefix(model)
    causal = task == "causal-lm"
    saved = [f"{prefix}.{l}" for l in layers] + ([] if causal else head_modules(model))
    return LoraConfig(r=1, target_modules=DUMMY_TARGET_MODULES, modules_to_save=saved, bias="none",
                      task_type="CAUSAL_LM" if causal else None)


def with_full_layers(model: nn.Module, layers: Sequence[int], task: str = "sequence-classification") -> nn.Module:
    """``model`` wrapped by peft with the layers ``layers`` (and a classifier's head) trainable in full,
    everything else frozen, no LoRA (:func:`full_layers_config`)."""
    from peft import get_peft_model

    return get_peft_model(model, full_layers_config(model, layers, task))


def with_lora(model: nn.Module, r: int, alpha: float, dropout: float, task: str = "sequence-classification",
              ffn_layers: Sequence[int] = (), attention_layers: Optional[Sequence[int]] = None) -> nn.Module:
    """``model`` wrapped by peft: LoRA on attention (of every layer, or of ``attention_layers``) and on
    the FFNs of ``ffn_layers``, a classifier's head trainable, everything else frozen."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, r, alpha, dropout, task, ffn_layers, attention_layers))


def adapter_slots(peft_model: nn.Module) -> Optional[dict[str, nn.Parameter]]:
    """The parameter behind each adapter tensor (peft's naming), found once per model and kept on it:
    reading and writing them directly costs a fraction of a millisecond, where peft's state-dict
    functions walk the whole model's state dict every time (about 10 ms per call for MiniLM, which
    adds up over thousands of clients). None when some adapter tensor is not a parameter."""
    slots = getattr(peft_model, "_fedpft_adapter_slots", None)
    if slots is None:
        from peft import get_peft_model_state_dict

        params = dict(peft_model.named_parameters())
        keys = get_peft_model_state_dict(peft_model)
        if any(is_sharded(p) for p in params.values()):
            # a shard's storage does not say which tensor it is (an empty shard has none): peft's own
            # naming, the parameter's name without the adapter's name "default" (and modules_to_save)
            by_name = {n.replace(".modules_to_save.default.", ".").replace(".default.", "."): n for n in params}
            names = {k: by_name.get(k) for k in keys}
        else:
            by_storage = {(p.data_ptr(), tuple(p.shape)): name for name, p in params.items()}
            names = {k: by_storage.get((v.data_ptr(), tuple(v.shape))) for k, v in keys.items()}
        names = names if all(n is not None for n in names.values()) else {}
        object.__setattr__(peft_model, "_fedpft_adapter_names", names)
        slots = rebind_adapter_slots(peft_model)
    return slots or None


def rebind_adapter_slots(peft_model: nn.Module) -> dict[str, nn.Parameter]:
    """Point the cached slots at the model's current parameters by name: sharding replaces every
    parameter object (with a DTensor of the same name)."""
    names = getattr(peft_model, "_fedpft_adapter_names", None)
    if names is None:
        raise RuntimeError("rebind_adapter_slots: call adapter_slots before the parameters are replaced")
    params = dict(peft_model.named_parameters())
    slots = {k: params[n] for k, n in names.items()}
    object.__setattr__(peft_model, "_fedpft_adapter_slots", slots)   # a plain attribute, not a submodule
    return slots


def get_adapter(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (peft's own naming, as saved by ``save_pretrained``), detached copies.
    Sharded parameters are gathered first (a collective of the client group)."""
    slots = adapter_slots(peft_model)
    if slots is not None:
        return {k: full_value(p.detach()).clone() for k, p in slots.items()}
    from peft import get_peft_model_state_dict

    return {k: full_value(v.detach()).clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def set_adapter(peft_model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors (peft's naming) into the model, in place (into this rank's shards when
    the model is sharded)."""
    slots = adapter_slots(peft_model)
    if slots is not None and state.keys() == slots.keys():
        for k, p in slots.items():
            assign_full(p, state[k])
        return
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise KeyError(f"adapter tensors that fit no module: {unexpected[:3]}")


def adapter_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


def lora_pairs(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(module path inside the task model, A, B) for every LoRA-adapted module of the adapter."""
    out = []
    for key in sorted(state):
        if key.endswith(".lora_A.weight"):
            path = key[: -len(".lora_A.weight")]
            path = path[len(ADAPTER_PREFIX):] if path.startswith(ADAPTER_PREFIX) else path
            out.append((path, state[key], state[key.replace(".lora_A.", ".lora_B.")]))
    return out


def add_lora_product(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
    """``weight += scaling * B @ A`` (the product in fp32, added in ``weight``'s dtype), in place."""
    weight.add_((b.float() @ a.float()).to(weight.device, weight.dtype) * scaling)


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
            add_lora_product(lin.weight, a, b, scaling)
        merged += 1
    return merged


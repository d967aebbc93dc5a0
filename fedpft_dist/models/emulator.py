"""The FedOT baseline's emulator (offsite tuning): the FM with every other middle layer dropped.

The bottom ``keep_bottom`` and top ``keep_top`` layers stay whole; of the middle layers, the first,
third, fifth ... are kept. The emulator is a standard model of the FM's class with fewer layers, saved
like a proxy (``fedpft_proxy.json`` with ``kind: emulator``), where ``layer_map[j]`` is the FM layer
that emulator layer j came from, ``compressed_layers`` are the kept middle layers (they are distilled,
and stay frozen at the clients) and ``target_layers[j]`` the last FM layer of the block that emulator
layer j stands for: a kept middle layer replaces itself and the dropped layers after it, so it
imitates that block's output (as Offsite-Tuning's emulator imitates the output of the dropped block).
"""
from __future__ import annotations

import re
from typing import Sequence

import torch.nn as nn

from ..errors import ConfigError
from .families import layers_prefix, transformer_layers


def emulator_layers(num_layers: int, keep_bottom: int, keep_top: int) -> list[int]:
    """FM layers the emulator keeps, in order."""
    if keep_bottom + keep_top >= num_layers:
        raise ConfigError("fed.fedot_keep_bottom", f"bottom {keep_bottom} + top {keep_top} layers leave no middle "
                                                   f"layer of a {num_layers}-layer model to drop")
    middle = list(range(keep_bottom, num_layers - keep_top))
    return list(range(keep_bottom)) + middle[::2] + list(range(num_layers - keep_top, num_layers))


def emulator_targets(kept: Sequence[int], num_layers: int) -> list[int]:
    """For each emulator layer j, the last FM layer of the block it stands for: the FM layers from
    ``kept[j]`` up to the next kept one (the last emulator layer: up to the FM's last layer)."""
    return [kept[j + 1] - 1 if j + 1 < len(kept) else num_layers - 1 for j in range(len(kept))]


def build_emulator(fm: nn.Module, kept: Sequence[int]) -> nn.Module:
    """A model of the FM's class with only the layers ``kept`` (renumbered 0..len-1)."""
    config = fm.config.__class__.from_dict(fm.config.to_dict())
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[l] for l in kept]
    emulator = type(fm)(config).to(dtype=next(fm.parameters()).dtype)
    prefix = layers_prefix(fm)
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    new_index = {old: new for new, old in enumerate(kept)}
    state = {}
    for key, value in fm.state_dict().items():
        m = pattern.match(key)
        if m is None:
            state[key] = value
        elif int(m.group(1)) in new_index:
            state[f"{prefix}.{new_index[int(m.group(1))]}.{m.group(2)}"] = value
    emulator.load_state_dict(state, strict=True)
    if getattr(fm, "generation_config", None) is not None and hasattr(emulator, "generation_config"):
        emulator.generation_config = fm.generation_config
    assert len(transformer_layers(emulator)) == len(kept)
    emulator.eval()
    return emulator


def adapter_to_fm(adapter: dict, layer_map: Sequence[int], layer_token: str) -> dict:
    """Rename an emulator adapter's layer indices to the FM's (``<layer_token>.<j>.`` ->
    ``<layer_token>.<layer_map[j]>.``). FM layers without an emulator counterpart get no tensors:
    their LoRA keeps B = 0 and changes nothing."""
    pattern = re.compile(rf"(^|\.){re.escape(layer_token)}\.(\d+)\.")

    def rename(key: str) -> str:
        return pattern.sub(lambda m: f"{m.group(1)}{layer_token}.{layer_map[int(m.group(2))]}.", key, count=1)

    return {rename(k): v for k, v in adapter.items()}

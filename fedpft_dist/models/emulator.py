"""The FedOT baseline's emulator (Offsite-Tuning): the FM's bottom and top layers (the adapter) whole,
and a few of its middle layers standing for the rest.

``fed.fedot_adapter_layers`` 'B+T' names the adapter: the FM's bottom B and top T layers (Offsite-Tuning:
2+2). Of the m middle layers, the emulator keeps k evenly spaced ones: the middle is cut into k blocks
of as equal sizes as can be (block i holds middle layers floor(i m / k) .. floor((i+1) m / k) - 1) and
each block keeps its first layer. k is ``fed.fedot_middle_layers``, or with 0 (auto) the k in 1..m
whose emulator is the closest in parameter count to the FedPFT proxy of the same config
(``proxy.keep_ratio(s)``, ``proxy.retained_layers``): the clients of both methods then hold models of
about the same size (ties go to the smaller emulator).

The emulator is a standard model of the FM's class with fewer layers, saved like a proxy
(``fedpft_proxy.json`` with ``kind: emulator``), where ``layer_map[j]`` is the FM layer that emulator
layer j came from, ``compressed_layers`` are the kept middle layers (they are distilled, and stay
frozen at the clients), ``retained_layers`` the adapter layers, and ``target_layers[j]`` the last FM
layer of the block that emulator layer j stands for.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..config import Config, parse_adapter_layers
from ..errors import ConfigError
from .families import layers_prefix, transformer_layers


def middle_positions(m: int, k: int) -> list[int]:
    """The first layer of each of k near-equal blocks of m middle layers (0-based, within the middle)."""
    return [i * m // k for i in range(k)]


def emulator_layers(num_layers: int, keep_bottom: int, keep_top: int, middle: Optional[int] = None) -> list[int]:
    """FM layers the emulator keeps, in order: the bottom and top adapter layers and ``middle``
    evenly spaced middle layers (None: every other one, half of them rounded up)."""
    m = num_layers - keep_bottom - keep_top
    if m <= 0:
        raise ConfigError("fed.fedot_adapter_layers", f"bottom {keep_bottom} + top {keep_top} adapter layers leave "
                                                      f"no middle layer of a {num_layers}-layer model to emulate")
    k = -(-m // 2) if middle is None else middle
    if not 1 <= k <= m:
        raise ConfigError("fed.fedot_middle_layers", f"{k} middle layers: a {num_layers}-layer model with "
                                                     f"{keep_bottom}+{keep_top} adapter layers has 1 to {m}")
    kept_middle = [keep_bottom + i for i in middle_positions(m, k)]
    return list(range(keep_bottom)) + kept_middle + list(range(num_layers - keep_top, num_layers))


def emulator_param_count(fm: nn.Module, kept: Sequence[int]) -> int:
    """Parameters of the emulator of ``fm`` that keeps layers ``kept`` (the FM's, less its dropped
    layers'); ``fm`` may live on the meta device."""
    layers = transformer_layers(fm)
    dropped = set(range(len(layers))) - set(kept)
    return sum(p.numel() for p in fm.parameters()) - sum(p.numel() for l in dropped for p in layers[l].parameters())


def proxy_param_count(fm: nn.Module, retained_layers: Sequence[int], keep_ratio: float,
                      keep_ratios: Sequence[float] = ()) -> int:
    """Parameters of the FedPFT proxy of ``fm`` with these ``proxy.*`` settings, built on the meta device."""
    from .proxy import count_params, plan_proxy
    from .proxy_arch import proxy_class_for, proxy_config_from

    plan = plan_proxy(fm, retained_layers, keep_ratio, keep_ratios)
    sizes = [plan.keep.get(l, w) for l, w in enumerate(plan.widths)]
    with torch.device("meta"):
        proxy = proxy_class_for(fm)(proxy_config_from(fm.config, sizes))
    return count_params(proxy)


def auto_middle_layers(fm: nn.Module, bottom: int, top: int, proxy_params: int) -> int:
    """The number of middle layers k whose emulator (kept layers evenly spaced) is the closest in
    parameters to ``proxy_params``; ties go to the smaller k."""
    n = len(transformer_layers(fm))
    m = n - bottom - top
    if m <= 0:
        emulator_layers(n, bottom, top)   # raises the error naming fed.fedot_adapter_layers
    return min(range(1, m + 1),
               key=lambda k: (abs(emulator_param_count(fm, emulator_layers(n, bottom, top, k)) - proxy_params), k))


def fedot_layers(cfg: Config, fm: nn.Module) -> tuple[list[int], dict]:
    """The FM layers the emulator of ``cfg`` keeps, and how its size was chosen (for the report)."""
    bottom, top = parse_adapter_layers(cfg.fed.fedot_adapter_layers)
    n = len(transformer_layers(fm))
    info: dict = {"adapter_layers": [bottom, top]}
    middle = cfg.fed.fedot_middle_layers
    if middle == 0:
        p = cfg.proxy
        target = proxy_param_count(fm, p.retained_layers, p.keep_ratio, p.keep_ratios)
        middle = auto_middle_layers(fm, bottom, top, target)
        info.update(middle_layers_rule="auto: closest in parameters to the FedPFT proxy",
                    proxy_params_target=target)
    else:
        info["middle_layers_rule"] = "fed.fedot_middle_layers"
    info["middle_layers"] = middle
    return emulator_layers(n, bottom, top, middle), info


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

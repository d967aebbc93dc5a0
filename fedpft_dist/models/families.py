"""Where the FFN of each supported architecture lives, so one code path handles them all.

Neuron j of an FFN is output row j of every ``rows`` Linear (W_in, or W_gate and W_up) together with
input column j of every ``cols`` Linear (W_out / W_down). The input of the ``cols`` Linear is the
intermediate activation ``a`` (act(W_in h) or act(W_gate h) * W_up h), where activation statistics are
read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn as nn

from ..errors import UserError

PROXY_TYPE_PREFIX = "fedpft_"


@dataclass(frozen=True)
class FFNLayout:
    family: str                 # "encoder" | "decoder" | "vision"
    layers: str                 # path from the base model to the ModuleList of transformer layers
    rows: tuple[str, ...]       # Linear modules (path from a layer) with out_features = d_ff
    cols: tuple[str, ...]       # Linear modules with in_features = d_ff
    post_norm: Optional[str]    # norm applied right after the FFN's residual add (post-norm models)
    attention: tuple[str, ...]  # attention projections: the LoRA targets (module-name suffixes)
    gated: bool = False


_BERT = FFNLayout("encoder", "encoder.layer", ("intermediate.dense",), ("output.dense",), "output.LayerNorm",
                  ("attention.self.query", "attention.self.key", "attention.self.value",
                   "attention.output.dense"))
_LLAMA = FFNLayout("decoder", "layers", ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",), None,
                   ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"), gated=True)

LAYOUTS: dict[str, FFNLayout] = {
    "bert": _BERT,
    "roberta": _BERT,
    "distilbert": FFNLayout("encoder", "transformer.layer", ("ffn.lin1",), ("ffn.lin2",), "output_layer_norm",
                            ("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin")),
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "mistral": _LLAMA,
    "vit": FFNLayout("vision", "layers", ("mlp.fc1",), ("mlp.fc2",), None,
                     ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj")),
}


def base_type(model_type: str) -> str:
    return model_type[len(PROXY_TYPE_PREFIX):] if model_type.startswith(PROXY_TYPE_PREFIX) else model_type


def layout_for(model_type: str) -> FFNLayout:
    key = base_type(model_type)
    if key not in LAYOUTS:
        raise UserError(f"model type {model_type!r} is not supported; supported: {', '.join(sorted(LAYOUTS))}")
    return LAYOUTS[key]


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer layers of a model with or without a task head."""
    layout = layout_for(model.config.model_type)
    base = getattr(model, "base_model", model)
    return _get(base, layout.layers)


def layers_prefix(model: nn.Module) -> str:
    """Dotted name of the layer list inside ``model`` (e.g. ``bert.encoder.layer``)."""
    target = transformer_layers(model)
    for name, module in model.named_modules():
        if module is target:
            return name
    raise RuntimeError("layer list not found among the model's modules")


def ffn_modules(layer: nn.Module, layout: FFNLayout) -> tuple[list[nn.Linear], list[nn.Linear]]:
    """(rows, cols) Linear modules of one layer's FFN."""
    return [_get(layer, p) for p in layout.rows], [_get(layer, p) for p in layout.cols]


def ffn_width(layer: nn.Module, layout: FFNLayout) -> int:
    rows, _ = ffn_modules(layer, layout)
    return rows[0].out_features

"""The smallest wrapper that lets transformers express a different FFN width per layer.

transformers configs have one ``intermediate_size`` for every layer. For each supported architecture
this module defines a config subclass with model type ``fedpft_<type>`` and the extra field
``fedpft_intermediate_sizes`` (one width per layer), and model subclasses that build the standard
model and then give each layer's FFN Linear modules their width. Module names do not change, so
LoRA adapters, ``save_pretrained`` and ``from_pretrained`` work unchanged between the FM and its proxy.

The classes are registered with the Auto classes when this module is imported; nothing is loaded
from the model directory as code (no ``trust_remote_code``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn as nn
import transformers

from .families import LAYOUTS, PROXY_TYPE_PREFIX, ffn_modules, layout_for, transformer_layers

SIZES_KEY = "fedpft_intermediate_sizes"

_AUTO_CLASSES = ("AutoModel", "AutoModelForSequenceClassification", "AutoModelForCausalLM",
                 "AutoModelForImageClassification")
_CONFIG_CLASSES = {"bert": "BertConfig", "roberta": "RobertaConfig", "distilbert": "DistilBertConfig",
                   "llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig", "vit": "ViTConfig"}

PROXY_CONFIGS: dict[str, type] = {}
PROXY_MODELS: dict[tuple[str, str], type] = {}  # (auto class name, base model type) -> proxy class


def _narrow_linear(old: nn.Linear, out_features: Optional[int] = None, in_features: Optional[int] = None) -> nn.Linear:
    """A Linear like ``old`` with fewer outputs or inputs (same dtype and device, fresh weights)."""
    new = nn.Linear(in_features or old.in_features, out_features or old.out_features, bias=old.bias is not None,
                    device=old.weight.device, dtype=old.weight.dtype)
    return new


def resize_ffn(model: nn.Module, sizes: Sequence[int]) -> None:
    """Give layer l's FFN width ``sizes[l]`` (new, uninitialised Linear modules where it changes)."""
    layout = layout_for(model.config.model_type)
    layers = transformer_layers(model)
    if len(sizes) != len(layers):
        raise ValueError(f"{SIZES_KEY} has {len(sizes)} entries but the model has {len(layers)} layers")
    for layer, width in zip(layers, sizes):
        rows, cols = ffn_modules(layer, layout)
        if rows[0].out_features == width:
            continue
        for path, old in zip(layout.rows, rows):
            _replace(layer, path, _narrow_linear(old, out_features=width))
        for path, old in zip(layout.cols, cols):
            _replace(layer, path, _narrow_linear(old, in_features=width))
        mlp = _parent(layer, layout.rows[0])
        if hasattr(mlp, "intermediate_size"):  # LLaMA-style MLPs keep their width as an attribute
            mlp.intermediate_size = width


def _parent(root: nn.Module, path: str) -> nn.Module:
    for part in path.split(".")[:-1]:
        root = getattr(root, part)
    return root


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    setattr(_parent(root, path), path.split(".")[-1], module)


def _make_config_class(base_cls: type) -> type:
    model_type = PROXY_TYPE_PREFIX + base_cls.model_type
    return type(f"Proxy{base_cls.__name__}", (base_cls,), {"model_type": model_type, "__module__": __name__})


def _make_model_class(base_cls: type, config_cls: type) -> type:
    def __init__(self, config, *args, **kwargs):
        base_cls.__init__(self, config, *args, **kwargs)
        sizes = getattr(config, SIZES_KEY, None)
        if sizes:
            resize_ffn(self, sizes)

    return type(f"Proxy{base_cls.__name__}", (base_cls,),
                {"config_class": config_cls, "__init__": __init__, "__module__": __name__})


def _register() -> None:
    for base_type, cfg_name in _CONFIG_CLASSES.items():
        base_cfg = getattr(transformers, cfg_name)
        cfg_cls = _make_config_class(base_cfg)
        transformers.AutoConfig.register(cfg_cls.model_type, cfg_cls, exist_ok=True)
        PROXY_CONFIGS[base_type] = cfg_cls
        for auto_name in _AUTO_CLASSES:
            auto = getattr(transformers, auto_name)
            try:
                base_model = auto._model_mapping[base_cfg]
            except KeyError:
                continue
            proxy_cls = _make_model_class(base_model, cfg_cls)
            globals()[proxy_cls.__name__] = proxy_cls  # importable by name, e.g. for pickling
            auto.register(cfg_cls, proxy_cls, exist_ok=True)
            PROXY_MODELS[(auto_name, base_type)] = proxy_cls


def proxy_config_from(fm_config, sizes: Sequence[int]):
    """The proxy config: the FM's config with the proxy model type and per-layer FFN widths."""
    base_type = fm_config.model_type
    if base_type not in PROXY_CONFIGS:
        raise ValueError(f"no proxy architecture for model type {base_type!r}")
    values = fm_config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "quantization_config"):
        values.pop(key, None)
    values[SIZES_KEY] = [int(s) for s in sizes]
    return PROXY_CONFIGS[base_type](**values)


def proxy_class_for(fm_model: nn.Module) -> type:
    """The proxy class matching the FM's class (same head)."""
    base_type = fm_model.config.model_type
    for (auto_name, btype), cls in PROXY_MODELS.items():
        if btype == base_type and issubclass(cls, type(fm_model)):
            return cls
    raise ValueError(f"no proxy class for {type(fm_model).__name__}")


_register()
assert set(PROXY_CONFIGS) == set(LAYOUTS)

"""A model held sharded from the start: built on the meta device, wrapped (LoRA, a head), sharded per
transformer layer with FSDP2 over a process group, and each rank's shard read from the safetensors
files. No rank builds, reads or holds the whole model: parameters are created on the meta device
(buffers, such as rotary tables, are small and built for real), ``to_empty`` allocates this rank's
shards only, and each shard is a slice of the file read through safetensors' lazy slices, so the
host memory of a load is the rank's shard plus one tensor being converted.

FSDP2 shards every parameter along its first dimension in ``torch.chunk`` fashion: with ``n`` rows
over ``W`` ranks, rank ``r`` holds rows ``[r * ceil(n / W), (r + 1) * ceil(n / W))`` (the last ones
fewer, or none). A parameter the files do not hold keeps the value it was created with where that
value is real: a new classifier head is initialised at build time as ``from_pretrained`` would
(the same draws from the seeded generator, so a run starts where the unsharded one does), and LoRA
tensors added inside :func:`real_new_parameters` keep peft's initialisation. Anything else the files
do not hold starts at zero.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn

from ..runtime import Communicator
from ..runtime.shard import assign_full, is_sharded, local_parameter_bytes, shard_client_model, shard_rows
from .families import transformer_layers
from .loading import DTYPES, auto_class, quiet_transformers

log = logging.getLogger(__name__)

# The most bytes of a tensor read from a file at once (see load_shards).
PIECE_BYTES = 4 << 20


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Every parameter registered inside lives on the meta device (no memory, no initialisation
    cost once there); buffers are made for real. A parameter is created where its module creates it
    and moved at registration, so at most one parameter is ever allocated at a time."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


@contextlib.contextmanager
def real_new_parameters() -> Iterator[None]:
    """Parameters added inside (peft's LoRA tensors, made for real and then moved to the device of
    the layer they wrap) stay where they were made when that layer is on the meta device: their
    initial values survive until :func:`materialise_sharded` writes them into the shards. A dtype
    change still applies."""
    original = nn.Module.to

    def to(module: nn.Module, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and device.type == "meta":
            return original(module, dtype=dtype) if dtype is not None else module
        return original(module, *args, **kwargs)

    nn.Module.to = to
    try:
        yield
    finally:
        nn.Module.to = original


def build_on_meta(model_dir: Path, task: str, dtype: str = "float32", **config_overrides) -> nn.Module:
    """The model of ``model_dir``'s config for ``task``, its parameters on the meta device, except the
    modules the files do not hold (a new classifier head): those are made for real and initialised
    by the model's own rule, in module order, as ``from_pretrained`` initialises what it does not
    find (the same draws from the global generator)."""
    from transformers import AutoConfig

    quiet_transformers()
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True, **config_overrides)
    with meta_parameters():
        model = auto_class(task).from_config(config, dtype=DTYPES[dtype], attn_implementation="sdpa")
    keys, prefix = checkpoint_keys(model_dir), model.base_model_prefix
    # a tied parameter (an output layer sharing the embeddings) under the first name it has, the
    # name the files hold it under
    canonical = {id(p): n for n, p in model.named_parameters()}
    for module in model.modules():
        own = [canonical[id(p)] for p in module.parameters(recurse=False)]
        if own and all(checkpoint_name(n, keys, prefix) is None for n in own):
            module.to_empty(device="cpu", recurse=False)
            model._init_weights(module)
    return model


def checkpoint_keys(model_dir: Path) -> dict[str, Path]:
    """Each tensor name of the model's safetensors files -> its file."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return {k: model_dir / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            out.update({k: path for k in fh.keys()})
    return out


def checkpoint_name(param_name: str, keys: dict[str, Path], prefix: str) -> Optional[str]:
    """The file's name for a parameter of the (possibly peft-wrapped) model: peft's wrapper prefix,
    ``base_layer`` and ``modules_to_save`` parts dropped; the backbone prefix (``model.``) added or
    dropped when the file was saved from the other form. None when the files do not hold it."""
    name = param_name
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    name = name.replace(".base_layer.", ".").replace(".original_module.", ".").replace(".modules_to_save.default.", ".")
    for candidate in (name, name[len(prefix) + 1:] if name.startswith(prefix + ".") else f"{prefix}.{name}"):
        if candidate in keys:
            return candidate
    return None


@torch.no_grad()
def load_shards(model: nn.Module, model_dir: Path, prefix: str, initial: Optional[dict] = None) -> dict:
    """Each of ``model``'s parameters (this rank's shard when sharded) read from ``model_dir``'s
    safetensors files, a slice at a time; what the files do not hold takes its whole value in
    ``initial`` (by parameter name), else zero. A file is opened for each tensor and closed after it:
    its pages mapped while a slice is read leave memory with it, so the load holds the rank's shards
    plus one tensor's slice. Returns the names loaded, initialised from ``initial`` and left at zero,
    and the bytes read."""
    from safetensors import safe_open

    keys = checkpoint_keys(model_dir)
    loaded, zeroed, kept, read = [], [], [], 0
    for name, param in model.named_parameters():
        local = param.to_local() if is_sharded(param) else param
        key = checkpoint_name(name, keys, prefix)
        if key is None:
            if initial is not None and name in initial:
                assign_full(param, initial[name])
                kept.append(name)
            else:
                local.zero_()
                zeroed.append(name)
            continue
        start, rows = shard_rows(param) if is_sharded(param) else (0, local.shape[0] if local.dim() else 1)
        with safe_open(str(keys[key]), framework="pt") as fh:
            source = fh.get_slice(key)
            shape = source.get_shape()
            expected = [rows, *shape[1:]] if local.dim() else shape   # a scalar is never sharded
            if list(expected) != list(local.shape):
                raise ValueError(f"{model_dir}: {key} has shape {tuple(shape)}, which does not give this rank's "
                                 f"{tuple(local.shape)}")
            if not local.dim():
                local.copy_(fh.get_tensor(key))
                read += local.element_size()
            else:   # pieces of at most PIECE_BYTES: a piece read is a tensor of its own before it is copied
                step = max(1, PIECE_BYTES // max(1, local[:1].numel() * local.element_size()))
                for at in range(0, rows, step):
                    piece = source[start + at: start + min(rows, at + step)]
                    local[at: at + len(piece)].copy_(piece)
                    read += piece.numel() * piece.element_size()
        loaded.append(name)
    return {"loaded": loaded, "zeroed": zeroed, "initialised": kept, "bytes_read": read}


def materialise_sharded(model: nn.Module, model_dir: Path, comm: Communicator, prefix: str) -> dict:
    """``model`` (built on the meta device, possibly wrapped) sharded over ``comm``'s ranks, each
    transformer layer and then the rest, its shards allocated on ``comm``'s device and read from
    ``model_dir``'s files, the parameters made for real before (a new head, LoRA tensors: small) kept
    at their values; training mode off. Returns :func:`load_shards`' report and the bytes this rank
    holds."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    initial = {name: p.detach().clone() for name, p in model.named_parameters() if p.device.type != "meta"}
    shard_client_model(model, transformer_layers(base), comm)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.to_empty(device=comm.device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])
    report = load_shards(model, model_dir, prefix, initial)
    model.eval()
    report["bytes_held"] = local_parameter_bytes(model)
    return report


def load_sharded(model_dir: Path, task: str, comm: Communicator, dtype: str = "float32",
                 wrap: Optional[Callable[[nn.Module], nn.Module]] = None, **config_overrides) -> tuple[nn.Module, dict]:
    """The model of ``model_dir`` for ``task``, sharded over ``comm``'s ranks after ``wrap`` (e.g.
    LoRA, inside :func:`real_new_parameters`) is applied on the meta device (:func:`materialise_sharded`). Returns the model and the
    report: the bytes this rank holds and read, and the parameters the files did not hold (zero)."""
    model = build_on_meta(model_dir, task, dtype, **config_overrides)
    prefix = model.base_model_prefix
    if wrap is not None:
        with real_new_parameters():
            model = wrap(model)
    return model, materialise_sharded(model, model_dir, comm, prefix)

"""A model run one transformer layer at a time, read from its safetensors files as each layer comes.

The model is built on the meta device. Its root (everything outside the transformer layers: the
embeddings, the final norm, the output layer; small beside the layers) is read whole; a layer is
read when :meth:`LayerStream.layer` enters and goes back to the meta device when it exits, so the
host holds the root, one layer and the hidden states of the text being run.

A pass over the text is layer-major: :meth:`LayerStream.layer_inputs` runs the model's own forward
up to the first layer and keeps, per batch, the hidden states and every argument the model passes
its layers (attention mask, rotary tables, ...); :meth:`LayerStream.run_layer` then runs one layer on
every batch, and :meth:`LayerStream.tail` runs the model's own forward once more with the layers
replaced by the last layer's outputs, which gives what follows the layers (the final norm, the
logits) from the model's code. Each layer sees exactly the inputs and weights it sees inside a whole
forward, so the numbers are those of the whole model.

:meth:`LayerStream.offloaded` instead reads each layer inside the forward, for what needs whole
forwards (generation): the whole model is read once per forward.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import UserError
from .families import layers_prefix, transformer_layers
from .sharded import build_on_meta, checkpoint_keys, checkpoint_name

# A safetensors file of a streamed save holds at most this many bytes (a tensor bigger than that
# gets a file of its own); what is not yet written is held in memory, so this bounds the writer.
SHARD_BYTES = 2 << 30


class _Reached(Exception):
    """Raised by the first layer once its inputs are kept: the rest of the forward is not run."""


def _slots(module: nn.Module, prefix: str = "") -> dict[int, list[tuple[nn.Module, str, str]]]:
    """Every parameter slot under ``module`` grouped by parameter (a tied parameter has several):
    id -> [(owning module, attribute, full name)], in module order."""
    out: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for mod_name, mod in module.named_modules(prefix=prefix, remove_duplicate=False):
        for name, p in mod._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((mod, name, f"{mod_name}.{name}" if mod_name else name))
    return out


class LayerStream:
    """A model built on the meta device whose layers are made real one at a time (see the module's
    description): from ``model_dir``'s files, or, without files, from tensors the caller gives
    (:meth:`layer`), its root then taken from another stream (:meth:`share_root`)."""

    def __init__(self, model: nn.Module, model_dir: Optional[Path] = None, root_from: Optional["LayerStream"] = None,
                 read_root: bool = True):
        self.model = model.eval()
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.keys = checkpoint_keys(self.model_dir) if model_dir is not None else {}
        self.prefix = model.base_model_prefix
        self.layers = transformer_layers(model)
        self.layers_prefix = layers_prefix(model)
        self.bytes_read = 0
        in_layers = {id(p) for layer in self.layers for p in layer.parameters()}
        self._root = {k: v for k, v in _slots(model).items() if k not in in_layers}
        if root_from is not None:
            self.share_root(root_from)
        elif model_dir is not None and read_root:
            self.read_root()

    def read_root(self) -> None:
        """Read the root's parameters from the files (done at construction unless told not to)."""
        self._load(self._root)

    @classmethod
    def open(cls, model_dir: Path, task: str, dtype: str = "float32", root_from: Optional["LayerStream"] = None,
             read_root: bool = True, **config_overrides) -> "LayerStream":
        """The model of ``model_dir`` for ``task``, its root read (or ``root_from``'s, shared; or, with
        ``read_root`` false, left for :meth:`read_root`), its layers still on the meta device."""
        return cls(build_on_meta(Path(model_dir), task, dtype, **config_overrides), model_dir, root_from, read_root)

    def share_root(self, other: "LayerStream") -> None:
        """This model's root parameters are ``other``'s of the same names (the same tensors)."""
        theirs = {full: mod._parameters[name] for slots in other._root.values() for mod, name, full in slots}
        for slots in self._root.values():
            source = next((theirs[full] for _, _, full in slots if full in theirs), None)
            if source is None:
                raise ValueError(f"{slots[0][2]} has no counterpart to share")
            for mod, name, _ in slots:
                mod._parameters[name] = source

    def root_state(self) -> dict[str, torch.Tensor]:
        """The root's parameters by name (a tied one once, under its first name)."""
        return {slots[0][2]: slots[0][0]._parameters[slots[0][1]].detach() for slots in self._root.values()}

    def _load(self, groups: dict[int, list[tuple[nn.Module, str, str]]]) -> None:
        """Each meta parameter of ``groups`` read from the files and put in all its slots."""
        from safetensors import safe_open

        for slots in groups.values():
            current = slots[0][0]._parameters[slots[0][1]]
            if current.device.type != "meta":
                continue   # made for real at build time (a new head): kept
            if self.model_dir is None:
                raise ValueError(f"{slots[0][2]}: no files to read it from")
            key = next((k for k in (checkpoint_name(full, self.keys, self.prefix) for _, _, full in slots)
                        if k is not None), None)
            if key is None:
                raise UserError(f"{self.model_dir}: the safetensors files hold no tensor for {slots[0][2]}")
            with safe_open(str(self.keys[key]), framework="pt") as fh:
                value = fh.get_tensor(key)
            if tuple(value.shape) != tuple(current.shape):
                raise UserError(f"{self.model_dir}: {key} has shape {tuple(value.shape)}, the model's config gives "
                                f"{tuple(current.shape)}")
            param = nn.Parameter(value.to(current.dtype), requires_grad=False)
            self.bytes_read += value.numel() * value.element_size()
            for mod, name, _ in slots:
                mod._parameters[name] = param

    @contextlib.contextmanager
    def layer(self, index: int, tensors: Optional[dict[str, torch.Tensor]] = None) -> Iterator[nn.Module]:
        """Layer ``index`` made real inside (from the files, or ``tensors``: its parameters by name
        within the layer), back on the meta device after."""
        layer = self.layers[index]
        prefix = f"{self.layers_prefix}.{index}"
        groups = _slots(layer, prefix)
        originals = {k: v[0][0]._parameters[v[0][1]] for k, v in groups.items()}
        try:
            if tensors is None:
                self._load(groups)
            else:
                for slots in groups.values():
                    value = tensors[slots[0][2][len(prefix) + 1:]]
                    param = nn.Parameter(value, requires_grad=False)
                    for mod, name, _ in slots:
                        mod._parameters[name] = param
            yield layer
        finally:
            for k, slots in groups.items():
                for mod, name, _ in slots:
                    mod._parameters[name] = originals[k]

    # -- layer-major passes ----------------------------------------------------------------------

    @torch.no_grad()
    def layer_inputs(self, batches: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, tuple, dict]]:
        """Per batch of token ids: (the first layer's hidden-state input, its other positional
        arguments, its keyword arguments), from the model's own forward (every token real)."""
        kept: list[tuple[torch.Tensor, tuple, dict]] = []
        first = self.layers[0]

        def reach(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            kept.append((hidden, tuple(args[1:]), kwargs))
            raise _Reached

        base = getattr(self.model, "base_model", self.model)
        first.forward = reach
        try:
            for ids in batches:
                try:
                    base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
                except _Reached:
                    pass
        finally:
            del first.forward
        return kept

    @staticmethod
    @torch.no_grad()
    def run_layer(layer: nn.Module, inputs: list[tuple[torch.Tensor, tuple, dict]],
                  hidden: Optional[list[torch.Tensor]] = None) -> list[torch.Tensor]:
        """``layer``'s output for every batch of ``inputs``, its hidden-state inputs replaced by
        ``hidden`` when given (a later layer's)."""
        out = []
        for b, (h, args, kwargs) in enumerate(inputs):
            y = layer(h if hidden is None else hidden[b], *args, **kwargs)
            out.append(y[0] if isinstance(y, tuple) else y)
        return out

    @torch.no_grad()
    def tail(self, batches: Sequence[torch.Tensor], last: list[torch.Tensor],
             call: Callable[[nn.Module, torch.Tensor], object]) -> list[object]:
        """``call(model, ids)`` per batch with every layer's forward replaced: the last layer returns
        ``last[b]`` (its output, computed layer by layer), the others their input. What the model
        computes after its layers (a final norm, the output layer) then runs as in a whole forward."""
        batch = {"b": 0}
        n = len(self.layers)

        def replay(index: int):
            def forward(*args, **kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                return last[batch["b"]] if index == n - 1 else hidden
            return forward

        for i, layer in enumerate(self.layers):
            layer.forward = replay(i)
        try:
            out = []
            for b, ids in enumerate(batches):
                batch["b"] = b
                out.append(call(self.model, ids))
            return out
        finally:
            for layer in self.layers:
                del layer.forward

    @contextlib.contextmanager
    def offloaded(self) -> Iterator[nn.Module]:
        """The model whose every layer is read from the files as its forward starts and released as
        it ends (whole forwards, e.g. generation: the files are read once per forward)."""
        stack: list[contextlib.ExitStack] = []

        def enter(module, args):
            es = contextlib.ExitStack()
            es.enter_context(self.layer(self._index[id(module)]))
            stack.append(es)

        def leave(module, args, output):
            stack.pop().close()

        self._index = {id(layer): i for i, layer in enumerate(self.layers)}
        handles = [h for layer in self.layers for h in (layer.register_forward_pre_hook(enter),
                                                        layer.register_forward_hook(leave))]
        try:
            yield self.model
        finally:
            for h in handles:
                h.remove()
            while stack:
                stack.pop().close()


def batches_of(chunks: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """``chunks`` [n, seq] in batches of ``batch_size`` rows (the last one fewer)."""
    return [chunks[start: start + batch_size] for start in range(0, len(chunks), batch_size)]


class ShardedWriter:
    """Tensors written to safetensors files of at most ``shard_bytes`` as they come, in order, as
    ``save_pretrained`` lays them out: one ``model.safetensors`` when everything fits one file, else
    ``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``. Only the tensors of
    the file being filled are held."""

    def __init__(self, out_dir: Path, shard_bytes: int = SHARD_BYTES):
        self.out_dir = Path(out_dir)
        self.shard_bytes = shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        part = f"part-{len(self._files):05d}.safetensors"
        save_file(self._pending, str(self.out_dir / part), metadata={"format": "pt"})
        self._files.append((part, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write what is pending and name the files; returns their names."""
        if self._pending or not self._files:
            self._flush()
        if len(self._files) == 1:
            (self.out_dir / self._files[0][0]).rename(self.out_dir / "model.safetensors")
            return ["model.safetensors"]
        n, names, weight_map = len(self._files), [], {}
        for i, (part, keys) in enumerate(self._files):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out_dir / part).rename(self.out_dir / name)
            names.append(name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names

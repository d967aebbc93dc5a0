"""Stage 1: build the proxy (sub-FM) by keeping the most salient FFN neurons of compressed layers.

Retained layers keep their whole FFN; every other layer keeps its top-k neurons by saliency, in their
original order. Embeddings, attention, norms and heads are copied unchanged, so attention adapters
move between FM and proxy as they are. The FM's own weights are never modified.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError, UserError
from ..fsutil import atomic_directory
from .families import FFNLayout, base_type, ffn_modules, layers_prefix, layout_for, transformer_layers

log = logging.getLogger(__name__)

PROXY_META = "fedpft_proxy.json"
SALIENCIES = ("weight", "mean_abs", "apoz")


# ----------------------------------------------------------------------------------------------------
# Saliency
# ----------------------------------------------------------------------------------------------------

def weight_saliency_scores(model: nn.Module, layer_ids: Iterable[int]) -> dict[int, torch.Tensor]:
    """The paper's weight saliency ``||[W_in[j,:], (W_gate[j,:], W_up[j,:]), W_out[:,j]]||_2``."""
    from fedpft_kernels import weight_saliency

    layout = layout_for(model.config.model_type)
    layers = transformer_layers(model)
    out = {}
    with torch.no_grad():
        for l in layer_ids:
            rows, cols = ffn_modules(layers[l], layout)
            out[l] = weight_saliency([m.weight for m in rows], [m.weight for m in cols]).float().cpu()
    return out


class ActivationRecorder:
    """Forward pre-hooks on each FFN's output projection that accumulate activation statistics of
    the intermediate activations (the projection's input) over real tokens.

    Set :attr:`mask` to the batch's attention mask before each forward: each layer records once per
    mask, so gradient checkpointing, which runs a layer's forward again in the backward pass, does
    not count a batch twice. Remove the hooks with :meth:`close` (or use as a context manager).
    """

    def __init__(self, model: nn.Module, layer_ids: Iterable[int], eps: float):
        from fedpft_kernels import ActivationStats

        layout = layout_for(model.config.model_type)
        layers = transformer_layers(model)
        self.eps = eps
        self._mask: Optional[torch.Tensor] = None
        self._recorded: set[int] = set()
        self.stats: dict[int, "ActivationStats"] = {}
        self._handles = []
        for l in layer_ids:
            _, cols = ffn_modules(layers[l], layout)
            proj = cols[0]
            self.stats[l] = ActivationStats.zeros(proj.in_features, device=proj.weight.device)
            self._handles.append(proj.register_forward_pre_hook(self._hook(l)))

    @property
    def mask(self) -> Optional[torch.Tensor]:
        return self._mask

    @mask.setter
    def mask(self, value: Optional[torch.Tensor]) -> None:
        self._mask = value
        self._recorded = set()

    def _hook(self, l: int):
        def hook(module: nn.Module, inputs: tuple) -> None:
            if l in self._recorded:
                return
            self._recorded.add(l)
            self.stats[l].update(inputs[0].detach(), self._mask, self.eps)
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "ActivationRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def activation_saliency_scores(model: nn.Module, layer_ids: Sequence[int], chunks: torch.Tensor,
                               batch_size: int, kind: str, eps: float) -> dict[int, torch.Tensor]:
    """Mean |a| (higher = more salient) or 1 - APoZ (share of tokens where |a| > eps) per neuron,
    from forward passes of the model over calibration ``chunks`` [n, seq]."""
    device = _input_device(model)
    model.eval()
    with ActivationRecorder(model, layer_ids, eps) as rec, torch.no_grad():
        for start in range(0, len(chunks), batch_size):
            ids = chunks[start: start + batch_size].to(device)
            rec.mask = torch.ones_like(ids)
            _forward_hidden(model, ids, rec.mask)
        if kind == "mean_abs":
            return {l: s.mean_abs().float().cpu() for l, s in rec.stats.items()}
        return {l: (1.0 - s.apoz()).float().cpu() for l, s in rec.stats.items()}


def select_neurons(scores: torch.Tensor, k: int, generator: torch.Generator) -> list[int]:
    """Indices of the ``k`` highest scores, in their original order. Ties are broken at random (with
    GELU exact zeros are rare, and APoZ alone often does not rank)."""
    n = scores.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    # The generator is a CPU one (seeded the same on every rank): rank on the CPU, wherever the scores are.
    scores = scores.detach().float().cpu()
    perm = torch.randperm(n, generator=generator)
    order = perm[torch.argsort(scores[perm], descending=True, stable=True)]
    return sorted(order[:k].tolist())


# ----------------------------------------------------------------------------------------------------
# Construction
# ----------------------------------------------------------------------------------------------------

@dataclass
class ProxyPlan:
    """Which layers are compressed and how many neurons each keeps."""
    num_layers: int
    retained: list[int]
    widths: list[int]           # FM FFN width per layer
    keep: dict[int, int] = field(default_factory=dict)  # compressed layer -> neurons kept

    @property
    def compressed(self) -> list[int]:
        return sorted(self.keep)


def resolve_retained_layers(retained_layers: Sequence[int], num_layers: int) -> list[int]:
    """``proxy.retained_layers`` as sorted layer ids of a ``num_layers``-layer model."""
    retained = set()
    for l in retained_layers:
        if not -num_layers <= l < num_layers:
            raise ConfigError("proxy.retained_layers", f"layer {l} is outside a {num_layers}-layer model")
        retained.add(l % num_layers)
    return sorted(retained)


def plan_proxy(model: nn.Module, retained_layers: Sequence[int], keep_ratio: float,
               keep_ratios: Sequence[float] = ()) -> ProxyPlan:
    """Resolve negative layer ids and per-layer keep ratios against the model's depth."""
    layout = layout_for(model.config.model_type)
    layers = transformer_layers(model)
    n = len(layers)
    retained = resolve_retained_layers(retained_layers, n)
    if keep_ratios and len(keep_ratios) != n:
        raise ConfigError("proxy.keep_ratios", f"has {len(keep_ratios)} entries but the model has {n} layers")
    widths = [ffn_modules(layer, layout)[0][0].out_features for layer in layers]
    plan = ProxyPlan(n, retained, widths)
    for l in range(n):
        if l in retained:
            continue
        ratio = keep_ratios[l] if keep_ratios else keep_ratio
        plan.keep[l] = max(1, min(widths[l], round(ratio * widths[l])))
    return plan


def count_params(model: nn.Module) -> int:
    """Parameters, shared (tied) tensors counted once."""
    return sum(p.numel() for p in model.parameters())


def build_proxy(fm: nn.Module, kept: dict[int, list[int]]) -> nn.Module:
    """A proxy of ``fm`` keeping neurons ``kept[l]`` of each compressed layer l (others whole)."""
    from .proxy_arch import proxy_class_for, proxy_config_from

    layout = layout_for(fm.config.model_type)
    layers = transformer_layers(fm)
    sizes = [len(kept[l]) if l in kept else ffn_modules(layer, layout)[0][0].out_features
             for l, layer in enumerate(layers)]
    config = proxy_config_from(fm.config, sizes)
    proxy = proxy_class_for(fm)(config).to(dtype=next(fm.parameters()).dtype)
    state = fm.state_dict()
    prefix = layers_prefix(fm)
    for l, idx in kept.items():
        index = torch.as_tensor(idx, dtype=torch.long, device=state[f"{prefix}.{l}.{layout.rows[0]}.weight"].device)
        for path in layout.rows:
            key = f"{prefix}.{l}.{path}"
            state[f"{key}.weight"] = state[f"{key}.weight"].index_select(0, index)
            if f"{key}.bias" in state:
                state[f"{key}.bias"] = state[f"{key}.bias"].index_select(0, index)
        for path in layout.cols:
            key = f"{prefix}.{l}.{path}"
            state[f"{key}.weight"] = state[f"{key}.weight"].index_select(1, index)
    proxy.load_state_dict(state, strict=True)
    if getattr(fm, "generation_config", None) is not None and hasattr(proxy, "generation_config"):
        proxy.generation_config = fm.generation_config
    proxy.eval()
    return proxy


# ----------------------------------------------------------------------------------------------------
# Compensation: the kept neurons' output projection refitted to the whole FFN's output
# ----------------------------------------------------------------------------------------------------

@dataclass
class ActivationMoments:
    """Sums over real tokens of one FFN's intermediate activations a (the output projection's input):
    ``gram`` = sum a a^T, ``total`` = sum a (float64), ``tokens``."""
    gram: torch.Tensor
    total: torch.Tensor
    tokens: int = 0


class MomentRecorder:
    """Forward pre-hooks on the output projection of the FFNs of ``layer_ids`` that add each forward's
    activations into :attr:`moments` (layer -> :class:`ActivationMoments`; every token counts: pass
    unpadded chunks). Memory: d_ff^2 float64 per layer. A context manager; it removes its hooks."""

    def __init__(self, model: nn.Module, layer_ids: Sequence[int]):
        layout = layout_for(model.config.model_type)
        layers = transformer_layers(model)
        self.moments: dict[int, ActivationMoments] = {}
        self._handles = []
        for l in layer_ids:
            proj = ffn_modules(layers[l], layout)[1][0]
            d_ff, device = proj.in_features, proj.weight.device
            self.moments[l] = ActivationMoments(torch.zeros(d_ff, d_ff, dtype=torch.float64, device=device),
                                                torch.zeros(d_ff, dtype=torch.float64, device=device))
            self._handles.append(proj.register_forward_pre_hook(self._hook(l)))

    def _hook(self, l: int):
        def record(module: nn.Module, inputs: tuple) -> None:
            a = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            m = self.moments[l]
            m.gram += a.T @ a
            m.total += a.sum(0)
            m.tokens += a.shape[0]
        return record

    def __enter__(self) -> "MomentRecorder":
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@torch.no_grad()
def activation_moments(model: nn.Module, layer_ids: Sequence[int], chunks: torch.Tensor,
                       batch_size: int) -> dict[int, ActivationMoments]:
    """:class:`ActivationMoments` of the FFNs of ``layer_ids`` from forward passes of ``model`` over
    ``chunks`` [n, seq] (every token real)."""
    device = _input_device(model)
    model.eval()
    with MomentRecorder(model, layer_ids) as rec:
        for start in range(0, len(chunks), batch_size):
            ids = chunks[start: start + batch_size].to(device)
            _forward_hidden(model, ids, torch.ones_like(ids))
    return rec.moments


def compensated_projection(weight: torch.Tensor, bias: Optional[torch.Tensor], moments: ActivationMoments,
                           kept: Sequence[int], ridge: float) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The output projection (``weight`` [d, d_ff], ``bias`` [d] or None) of an FFN that keeps
    neurons ``kept``, fitted so that sum over tokens |W' a_kept + b' - (W a + b)|^2 is least,
    with a ridge ``ridge`` x (the kept neurons' mean squared activation) on W'. Returns (W' [d, k],
    b' or None); b' is fitted too where the FFN has a bias. float64 algebra, results in ``weight``'s dtype."""
    n = max(moments.tokens, 1)
    idx = torch.as_tensor(list(kept), dtype=torch.long, device=moments.gram.device)
    w = weight.detach().to(moments.gram.device, torch.float64)
    g = moments.gram / n                                    # E[a a^T]
    mean = moments.total / n                                # E[a]
    k = len(idx)
    lhs = g[idx][:, idx]                                    # E[a_K a_K^T]
    rhs = g[idx] @ w.T                                      # E[a_K y^T], y = W a (+ b below)
    lam = ridge * float(lhs.diagonal().mean().clamp_min(1e-30))
    if bias is not None:
        b = bias.detach().to(moments.gram.device, torch.float64)
        top = torch.cat([lhs, mean[idx, None]], 1)
        lhs = torch.cat([top, torch.cat([mean[idx], mean.new_ones(1)])[None]], 0)
        rhs = torch.cat([rhs + mean[idx, None] * b[None], (w @ mean + b)[None]], 0)
    reg = torch.zeros(lhs.shape[0], dtype=torch.float64, device=lhs.device)
    reg[:k] = lam
    x = torch.linalg.solve(lhs + torch.diag(reg), rhs)     # [k (+1), d]
    new_w = x[:k].T.to(weight.dtype)
    new_b = x[k].to(bias.dtype) if bias is not None else None
    return new_w, new_b


@torch.no_grad()
def compensate_proxy(proxy: nn.Module, fm: nn.Module, kept: dict[int, list[int]],
                     moments: dict[int, ActivationMoments], ridge: float) -> None:
    """Replace the output projection of each compressed FFN of ``proxy`` (built from ``fm`` keeping
    ``kept``) by :func:`compensated_projection` fitted on ``moments`` (the FM's activations)."""
    layout = layout_for(fm.config.model_type)
    fm_layers, proxy_layers = transformer_layers(fm), transformer_layers(proxy)
    for l, idx in kept.items():
        for src, dst in zip(ffn_modules(fm_layers[l], layout)[1], ffn_modules(proxy_layers[l], layout)[1]):
            w, b = compensated_projection(src.weight, src.bias, moments[l], idx, ridge)
            dst.weight.copy_(w.to(dst.weight.device))
            if b is not None:
                dst.bias.copy_(b.to(dst.bias.device))


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------

def _forward_hidden(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor):
    base = getattr(model, "base_model", model)
    return base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states


@torch.no_grad()
def hidden_error_sums(fm: nn.Module, proxy: nn.Module, chunks: torch.Tensor, batch_size: int,
                      layer_map: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per proxy layer j (outputs of layers 0..L-1): sum((H_FM - H_proxy)^2) and sum(H_FM^2) over all
    tokens of ``chunks``, comparing with FM layer ``layer_map[j]`` (default j). Sums, so that shards
    of the text on several ranks add up exactly. The sums stay on the device until the last batch
    (one read; on the CPU when they come back)."""
    fm.eval()
    proxy.eval()
    n_layers = len(transformer_layers(proxy))
    layer_map = list(layer_map) if layer_map is not None else list(range(n_layers))
    device = _input_device(fm)
    num = torch.zeros(n_layers, dtype=torch.float64, device=device)
    den = torch.zeros(n_layers, dtype=torch.float64, device=device)
    for start in range(0, len(chunks), batch_size):
        ids = chunks[start: start + batch_size].to(device, non_blocking=True)
        mask = torch.ones_like(ids)
        ht = _forward_hidden(fm, ids, mask)[1:]
        hs = _forward_hidden(proxy, ids, mask)[1:]
        ht = [ht[l] for l in layer_map]
        num += torch.stack([(t.float() - s.float()).pow(2).sum() for t, s in zip(ht, hs)]).double().to(device)
        den += torch.stack([t.float().pow(2).sum() for t in ht]).double().to(device)
    return num.cpu(), den.cpu()


def hidden_state_errors(fm: nn.Module, proxy: nn.Module, chunks: torch.Tensor, batch_size: int,
                        layer_map: Optional[Sequence[int]] = None) -> list[float]:
    """Per layer: mean((H_FM - H_proxy)^2) / mean(H_FM^2) over all tokens of ``chunks``."""
    if len(chunks) == 0:
        raise UserError("no held-out text to measure the proxy on (public_text is too small)")
    num, den = hidden_error_sums(fm, proxy, chunks, batch_size, layer_map)
    return (num / den.clamp_min(1e-12)).tolist()


@torch.no_grad()
def next_token_losses(models: Sequence[nn.Module], chunks: torch.Tensor, batch_size: int) -> list[float]:
    """Each causal LM's mean next-token loss (nats) over ``chunks`` [n, seq] (every token real)."""
    from .lm import IGNORE, next_token_labels, next_token_loss_sum

    out = []
    for model in models:
        device = _input_device(model)
        sums = torch.zeros(2, dtype=torch.float64, device=device)   # [loss sum, targets], read once
        for start in range(0, len(chunks), batch_size):
            ids = chunks[start: start + batch_size].to(device)
            mask = torch.ones_like(ids)
            labels = next_token_labels(ids, mask)
            loss = next_token_loss_sum(model(input_ids=ids, attention_mask=mask).logits, labels)
            sums += torch.stack([loss.double(), (labels[:, 1:] != IGNORE).sum().double()])
        total, count = sums.tolist()
        out.append(total / max(count, 1))
    return out


def _input_device(model: nn.Module) -> torch.device:
    """Where inputs go: the embedding's device (parameters may be ZeRO-3 partitions, still placed)."""
    return model.get_input_embeddings().weight.device


# ----------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------

def save_proxy(proxy: nn.Module, tokenizer, out_dir: str | os.PathLike, meta: dict) -> Path:
    """Hugging Face directory (config + safetensors + tokenizer) plus ``fedpft_proxy.json``, written to
    a temporary directory next to ``out_dir`` and renamed into place."""
    out = Path(out_dir)
    with atomic_directory(out) as tmp:
        proxy.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / PROXY_META).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_proxy_meta(proxy_dir: str | os.PathLike) -> dict:
    path = Path(proxy_dir) / PROXY_META
    if not path.is_file():
        raise UserError(f"{proxy_dir} is not a proxy directory (no {PROXY_META})")
    return json.loads(path.read_text())


def load_proxy(proxy_dir: str | os.PathLike, task: Optional[str] = None, dtype: str = "float32",
               num_labels: Optional[int] = None, dropout: Optional[float] = None):
    """Reload a saved proxy in one call, without the FM: returns (model, meta)."""
    from .loading import load_model

    meta = read_proxy_meta(proxy_dir)
    model = load_model(Path(proxy_dir), task or meta["task"], dtype=dtype, num_labels=num_labels, dropout=dropout)
    return model, meta


def describe_layout(model: nn.Module) -> dict:
    layout: FFNLayout = layout_for(model.config.model_type)
    return {"family": layout.family, "model_type": base_type(model.config.model_type), "gated": layout.gated}

"""Layer-level and neuron-level distillation of the proxy against the FM, as one data-parallel
DeepSpeed job over all ranks: FedPFT's Stage 2 (the proxy's compressed layers learn the FM's hidden
states on public text before federated training) and the alignment of Stage 3 (every
``fed.align_every`` rounds, the proxy is distilled again with its most active neurons frozen).

Loss, averaged over the compressed layers l (relative errors: means over elements):

    mean((H_l^T - H_l^S)^2) / mean((H_l^T)^2)
      + alpha * mean((W_out^T W_in^T - W_out^S W_in^S)^2) / mean((W_out^T W_in^T)^2)

H_l is the hidden state after layer l; the hidden term is computed per sequence and averaged over the
batch, so a batch split over W ranks gives the same loss and gradient as on one rank. The weight
products are computed by running the FFN's own Linear modules on an identity matrix, so gradients
reach the student's W_in and W_out (the weight term carries gradients) and ZeRO-3 gathers the
weights as for any forward. For gated FFNs the product is taken for each input projection (W_gate
and W_up) and averaged.

Dropout is off in both models: the student learns the teacher's deterministic hidden states, and a
resumed run repeats the uninterrupted one exactly.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.families import FFNLayout, ffn_modules, layout_for, transformer_layers
from .losses import relative_sq_error, relative_sq_error_per_sample

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------

def ffn_products(layer: nn.Module, layout: FFNLayout) -> list[torch.Tensor]:
    """``(W_out W_in)^T`` ([d, d]) for each input projection, biases removed, via module forwards."""
    rows, cols = ffn_modules(layer, layout)
    ref = next(cols[0].parameters())  # a Linear or a SplitLinear; only dtype and device matter
    d = rows[0].in_features
    probe = torch.cat([torch.eye(d, dtype=ref.dtype, device=ref.device),
                       torch.zeros(1, d, dtype=ref.dtype, device=ref.device)])
    out = []
    for proj in rows:
        a = proj(probe)
        a = a[:-1] - a[-1:]                                  # W_in^T, bias removed
        a = torch.cat([a, torch.zeros_like(a[:1])])
        y = cols[0](a)
        out.append(y[:-1] - y[-1:])                          # W_in^T W_out^T
    return out


class DistillPair(nn.Module):
    """Teacher (frozen) and student in one module, so one DeepSpeed engine holds both; its forward
    returns the distillation loss and its parts."""

    def __init__(self, teacher: nn.Module, student: nn.Module, layers: Sequence[int], alpha: float,
                 teacher_layers: Optional[Sequence[int]] = None):
        super().__init__()
        self.teacher = teacher
        self.student = student
        self.layers = list(layers)
        # The teacher layer whose output each student layer imitates: the same index for a proxy; for
        # an emulator with dropped layers, the last FM layer of the block the student layer stands for.
        self.teacher_layers = list(teacher_layers) if teacher_layers is not None else list(layers)
        self.alpha = alpha
        self.layout = layout_for(student.config.model_type)
        for p in teacher.parameters():
            p.requires_grad_(False)

    def _hidden(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor):
        base = getattr(model, "base_model", model)
        return base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        t_layers, s_layers = transformer_layers(self.teacher), transformer_layers(self.student)
        with torch.no_grad():
            ht = self._hidden(self.teacher, input_ids, attention_mask)
        hs = self._hidden(self.student, input_ids, attention_mask)
        hidden = torch.stack([relative_sq_error_per_sample(ht[tl + 1], hs[l + 1], attention_mask).mean()
                              for l, tl in zip(self.layers, self.teacher_layers)])
        if self.alpha == 0:  # no weight term (alignment as the paper's code does it; FedOT's emulator)
            weight = torch.zeros_like(hidden)
            return hidden.mean(), hidden.detach(), weight
        with torch.no_grad():
            wt = [ffn_products(t_layers[l], self.layout) for l in self.teacher_layers]
        weight = torch.stack([
            torch.stack([relative_sq_error(t, s) for t, s in zip(wt_l, ffn_products(s_layers[l], self.layout))]).mean()
            for l, wt_l in zip(self.layers, wt)])
        loss = hidden.mean() + self.alpha * weight.mean()
        return loss, hidden.detach(), weight.detach()


# ----------------------------------------------------------------------------------------------------
# What trains
# ----------------------------------------------------------------------------------------------------

def ffn_parameter_names(model: nn.Module, layers: Sequence[int]) -> list[str]:
    """Names of the FFN parameters of ``layers``: W_in (and W_gate/W_up), b_in, W_out, b_out and the
    norm after the FFN (post-norm models)."""
    layout = layout_for(model.config.model_type)
    all_layers = transformer_layers(model)
    prefix = {id(m): n for n, m in model.named_modules()}
    names = []
    for l in layers:
        layer = all_layers[l]
        paths = list(layout.rows) + list(layout.cols) + ([layout.post_norm] if layout.post_norm else [])
        for path in paths:
            module = layer
            for part in path.split("."):
                module = getattr(module, part)
            base = prefix[id(module)]
            names.extend(f"{base}.{n}" for n, p in module.named_parameters(recurse=True))
    return names


def freeze_all_but(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Parameter]:
    """requires_grad only for ``names``; returns them by name, in the model's order."""
    wanted = set(names)
    chosen = {}
    for n, p in model.named_parameters():
        p.requires_grad_(n in wanted)
        if n in wanted:
            chosen[n] = p
    missing = wanted - set(chosen)
    if missing:
        raise KeyError(f"parameters not found: {sorted(missing)[:3]}")
    return chosen


def param_groups(named: dict[str, nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on biases and norm weights."""
    decay = [p for p in named.values() if p.ndim >= 2]
    no_decay = [p for p in named.values() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def linear_warmup_decay(step: int, total: int, warmup_ratio: float) -> float:
    """Learning-rate factor: linear warm-up over ``warmup_ratio`` of the steps, then linear to zero."""
    warm = max(1, math.ceil(warmup_ratio * total)) if warmup_ratio > 0 else 0
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


# ----------------------------------------------------------------------------------------------------
# Neuron-level split: frozen neurons cannot be touched by the optimizer
# ----------------------------------------------------------------------------------------------------

class SplitLinear(nn.Module):
    """A Linear whose neurons (output rows when ``dim == 0``, input columns when ``dim == 1``) are split
    into a frozen part and a trainable part, frozen first.

    The frozen part is a parameter with ``requires_grad=False`` that is never given to the optimizer,
    so neither Adam's moments nor weight decay can reach it. The layer's neurons are reordered
    (frozen, then trainable) consistently in W_in and W_out, which leaves the FFN's function
    unchanged; the distillation job writes the trained pieces back into the plain layer's tensors.
    """

    def __init__(self, linear: nn.Linear, frozen: torch.Tensor, trainable: torch.Tensor, dim: int):
        super().__init__()
        w = linear.weight.detach()
        frozen, trainable = frozen.to(w.device), trainable.to(w.device)
        self.dim = dim
        self.in_features = linear.in_features if dim == 0 else len(frozen) + len(trainable)
        self.out_features = len(frozen) + len(trainable) if dim == 0 else linear.out_features
        self.weight_frozen = nn.Parameter(w.index_select(dim, frozen).clone(), requires_grad=False)
        self.weight_train = nn.Parameter(w.index_select(dim, trainable).clone())
        b = linear.bias
        if b is None:
            self.bias_frozen = self.bias_train = self.bias = None
        elif dim == 0:  # b_in follows its neurons
            self.bias_frozen = nn.Parameter(b.detach().index_select(0, frozen).clone(), requires_grad=False)
            self.bias_train = nn.Parameter(b.detach().index_select(0, trainable).clone())
            self.bias = None
        else:           # b_out belongs to the output: it trains
            self.bias_frozen = self.bias_train = None
            self.bias = nn.Parameter(b.detach().clone())

    def full_weight(self) -> torch.Tensor:
        return torch.cat([self.weight_frozen, self.weight_train], dim=self.dim)

    def full_bias(self) -> Optional[torch.Tensor]:
        if self.bias_train is not None:
            return torch.cat([self.bias_frozen, self.bias_train])
        return self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.full_weight(), self.full_bias())


@dataclass
class NeuronSplit:
    layer: int
    frozen: torch.Tensor     # neuron ids (original order positions) kept frozen
    trainable: torch.Tensor  # neuron ids that train


def plan_neuron_split(activity: torch.Tensor, keep: float, generator: torch.Generator, layer: int) -> NeuronSplit:
    """The most active ``keep`` share of neurons stays frozen; ties are broken at random."""
    n = activity.numel()
    k = min(n, max(0, round(keep * n)))
    # Statistics live on the weights' device, the seeded generator on the CPU: the split is planned on
    # the CPU (and its index tensors stay there; SplitLinear moves them to the weights).
    activity = activity.detach().float().cpu()
    perm = torch.randperm(n, generator=generator)
    order = perm[torch.argsort(activity[perm], descending=True, stable=True)]
    frozen, _ = torch.sort(order[:k])
    trainable, _ = torch.sort(order[k:])
    return NeuronSplit(layer, frozen, trainable)


def apply_neuron_split(model: nn.Module, split: NeuronSplit) -> list[str]:
    """Replace the FFN Linears of ``split.layer`` with :class:`SplitLinear`; returns the names of
    the parameters that train (trainable neurons, b_out, the norm after the FFN)."""
    layout = layout_for(model.config.model_type)
    layer = transformer_layers(model)[split.layer]
    for dim, paths in ((0, layout.rows), (1, layout.cols)):
        for path in paths:
            parent = layer
            parts = path.split(".")
            for part in parts[:-1]:
                parent = getattr(parent, part)
            old = getattr(parent, parts[-1])
            setattr(parent, parts[-1], SplitLinear(old, split.frozen, split.trainable, dim))
    names = []
    prefix = {id(m): n for n, m in model.named_modules()}
    for n, p in layer.named_parameters():
        if p.requires_grad and not n.endswith(("weight_frozen", "bias_frozen")):
            if any(n.startswith(path + ".") for path in (*layout.rows, *layout.cols)) or \
                    (layout.post_norm and n.startswith(layout.post_norm + ".")):
                names.append(f"{prefix[id(layer)]}.{n}")
    return names

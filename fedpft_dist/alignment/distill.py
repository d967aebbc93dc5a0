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

Two optional terms fit the proxy where federated training will use it (layer level only):

- **adapter perturbation** (``distill.adapter_noise``): at every optimizer step both models carry the
  same random low-rank change of the weights LoRA tunes, drawn from (seed, step), so the student
  matches the teacher's hidden states near the FM as well as at it. A proxy keeps the FM's attention
  and its retained layers' FFNs, so the same change applies to both.
- **a derivative term** (``distill.jvp_weight``): per compressed FFN f and its student f', with x the
  teacher's FFN input (teacher forcing) and v a random tangent,
  mean(|J_f(x) v - J_f'(x) v|^2) / mean(|J_f(x) v|^2), each JVP a central difference
  (f(x + h v) - f(x - h v)) / 2h with h v at 1e-2 of each token's |x|: plain module forwards, so
  ZeRO-3 gathers and frees the weights as for any forward, and the student's side carries gradients.
  The W_out W_in term is this derivative's data-free, linear part.

FedOT's emulator distils as Offsite-Tuning's does: every parameter of its kept middle layers trains,
on the hidden-state term at the output of the middle block alone (the emulator's last middle layer
against the FM's last middle layer: the input of the top adapter layers), which Offsite-Tuning calls
the KD term, plus, for a causal LM, the emulator's own next-token loss on the text (the LM term,
weight ``lm_weight``; per sequence, averaged over the batch like the hidden term). An encoder
(classification) has no LM head: the KD term alone.

Dropout is off in both models: the student learns the teacher's deterministic hidden states, and a
resumed run repeats the uninterrupted one exactly.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.families import FFNLayout, ffn_modules, layout_for, transformer_layers
from .losses import next_token_loss_per_sample, relative_sq_error, relative_sq_error_per_sample

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


def _module(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def ffn_map(layer: nn.Module, layout: FFNLayout):
    """The FFN of ``layer`` as a function of its input, without its residual add and norm: the module
    holding both projections where there is one (LLaMA's ``mlp``), else the input projection's module
    (which applies the activation, as BERT's ``intermediate``) followed by the output projection."""
    rows, cols = layout.rows[0].split("."), layout.cols[0].split(".")
    common = []
    for a, b in zip(rows[:-1], cols[:-1]):
        if a != b:
            break
        common.append(a)
    if common:
        return _module(layer, ".".join(common))
    inner, out = _module(layer, ".".join(rows[:-1])), _module(layer, layout.cols[0])
    return lambda x: out(inner(x))


JVP_STEP = 1e-2   # |h v| / |x| per token of the derivative term's central difference


def central_jvp(f, x: torch.Tensor, hv: torch.Tensor) -> torch.Tensor:
    """(f(x + hv) - f(x - hv)) / 2, i.e. h times the JVP of f at x along v (h cancels in a relative error)."""
    return (f(x + hv) - f(x - hv)) / 2


def jvp_tangents(x: torch.Tensor, seed: int) -> torch.Tensor:
    """h v for :func:`central_jvp`: Gaussian directions drawn on the CPU from ``seed``, scaled per token
    to ``JVP_STEP`` of the token's norm."""
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    v = v.to(x.device, x.dtype, non_blocking=True)   # without waiting for the device's queue
    scale = JVP_STEP * x.norm(dim=-1, keepdim=True) / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return v * scale


class AdapterPerturbation:
    """The same random low-rank change ``B A`` of every LoRA-tunable weight in teacher and student,
    added by forward hooks (``output + x A^T B^T``) so a ZeRO-3-partitioned teacher needs nothing
    gathered. :meth:`draw` sets the change for a step; :meth:`clear` removes it (the models are then
    exactly themselves)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, layers: Sequence[int], scale: float, rank: int):
        """``layers``: the compressed layers, whose FFNs are being distilled (no site there); the
        attention of every layer and the FFN of every other layer are sites."""
        self.scale, self.rank = scale, rank
        layout = layout_for(student.config.model_type)
        t_layers, s_layers = transformer_layers(teacher), transformer_layers(student)
        if len(t_layers) != len(s_layers):
            raise ValueError("adapter perturbation needs a student with the teacher's layers (a proxy)")
        self.sites: list[tuple[str, int, int]] = []     # (name, in_features, out_features)
        self._delta: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = []
        for l in range(len(s_layers)):
            paths = list(layout.attention) + ([] if l in layers else [*layout.rows, *layout.cols])
            for path in paths:
                name = f"{l}.{path}"
                s_mod, t_mod = _module(s_layers[l], path), _module(t_layers[l], path)
                self.sites.append((name, s_mod.in_features, s_mod.out_features))
                for mod in (t_mod, s_mod):
                    self._handles.append(mod.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, inputs, output):
            delta = self._delta.get(name)
            if delta is None:
                return None
            a, b = delta
            x = inputs[0]
            return output + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))
        return hook

    def draw(self, seed: int, device: torch.device) -> None:
        """A = N(0, 1/d_in) entries, B = N(0, scale^2 / rank): B A has entries of std scale / sqrt(d_in)."""
        gen = torch.Generator().manual_seed(seed)
        self._delta = {}
        for name, d_in, d_out in self.sites:
            a = torch.randn(self.rank, d_in, generator=gen) / math.sqrt(d_in)
            b = torch.randn(d_out, self.rank, generator=gen) * (self.scale / math.sqrt(self.rank))
            # copies that do not wait for the device's queue (a blocking one per site would, every step)
            self._delta[name] = (a.to(device, non_blocking=True), b.to(device, non_blocking=True))

    def clear(self) -> None:
        self._delta = {}

    def remove(self) -> None:
        self.clear()
        for h in self._handles:
            h.remove()
        self._handles = []


class DistillPair(nn.Module):
    """Teacher (frozen) and student in one module, so one DeepSpeed engine holds both; its forward
    returns the distillation loss and its parts (hidden-state, weight and derivative terms)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, layers: Sequence[int], alpha: float,
                 teacher_layers: Optional[Sequence[int]] = None, jvp_weight: float = 0.0, lm_weight: float = 0.0):
        super().__init__()
        self.teacher = teacher
        self.student = student
        self.layers = list(layers)
        # The teacher layer whose output each student layer imitates: the same index for a proxy; for
        # an emulator with dropped layers, the last FM layer of the block the student layer stands for.
        self.teacher_layers = list(teacher_layers) if teacher_layers is not None else list(layers)
        self.alpha = alpha
        self.jvp_weight = jvp_weight
        # > 0: the student is a causal LM, and its next-token loss on the text is a term of the loss
        # (FedOT's emulator, as Offsite-Tuning distils it)
        self.lm_weight = lm_weight
        self.layout = layout_for(student.config.model_type)
        for p in teacher.parameters():
            p.requires_grad_(False)

    def _hidden(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor):
        base = getattr(model, "base_model", model)
        return base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states

    def _teacher_forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[tuple, dict[int, torch.Tensor]]:
        """The teacher's hidden states and, with the derivative term, its compressed layers' FFN inputs."""
        inputs: dict[int, torch.Tensor] = {}
        handles = []
        if self.jvp_weight > 0:
            t_layers = transformer_layers(self.teacher)
            for tl in self.teacher_layers:
                def grab(module, args, tl=tl):
                    inputs[tl] = args[0].detach()
                handles.append(_module(t_layers[tl], self.layout.rows[0]).register_forward_pre_hook(grab))
        try:
            with torch.no_grad():
                return self._hidden(self.teacher, ids, mask), inputs
        finally:
            for h in handles:
                h.remove()

    def derivative_term(self, inputs: dict[int, torch.Tensor], mask: torch.Tensor, seed: int) -> torch.Tensor:
        """Per compressed layer: relative squared error of the student's FFN JVPs against the teacher's,
        at the teacher's FFN inputs, along tangents drawn from ``seed`` (one draw per layer)."""
        t_layers, s_layers = transformer_layers(self.teacher), transformer_layers(self.student)
        out = []
        for i, (l, tl) in enumerate(zip(self.layers, self.teacher_layers)):
            x = inputs[tl]
            hv = jvp_tangents(x, seed * 1009 + i)
            with torch.no_grad():
                jt = central_jvp(ffn_map(t_layers[tl], self.layout), x, hv)
            js = central_jvp(ffn_map(s_layers[l], self.layout), x, hv)
            out.append(relative_sq_error_per_sample(jt, js, mask).mean())
        return torch.stack(out)

    def _student_forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[tuple, torch.Tensor]:
        """The student's hidden states and, with the LM term, its next-token loss (else a zero)."""
        if self.lm_weight == 0:
            return self._hidden(self.student, ids, mask), torch.zeros((), device=ids.device)
        out = self.student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        return out.hidden_states, next_token_loss_per_sample(out.logits, ids, mask).mean()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tangent_seed: int = 0):
        """(loss, hidden term per layer, weight term per layer, derivative term per layer, LM term);
        the terms detached."""
        t_layers, s_layers = transformer_layers(self.teacher), transformer_layers(self.student)
        ht, ffn_inputs = self._teacher_forward(input_ids, attention_mask)
        hs, lm = self._student_forward(input_ids, attention_mask)
        hidden = torch.stack([relative_sq_error_per_sample(ht[tl + 1], hs[l + 1], attention_mask).mean()
                              for l, tl in zip(self.layers, self.teacher_layers)])
        loss = hidden.mean()
        if self.lm_weight > 0:
            loss = loss + self.lm_weight * lm
        if self.jvp_weight > 0:
            jvp = self.derivative_term(ffn_inputs, attention_mask, tangent_seed)
            loss = loss + self.jvp_weight * jvp.mean()
        else:
            jvp = torch.zeros_like(hidden)
        if self.alpha == 0:  # no weight term (alignment as the paper's code does it; FedOT's emulator)
            return loss, hidden.detach(), torch.zeros_like(hidden), jvp.detach(), lm.detach()
        with torch.no_grad():
            wt = [ffn_products(t_layers[l], self.layout) for l in self.teacher_layers]
        weight = torch.stack([
            torch.stack([relative_sq_error(t, s) for t, s in zip(wt_l, ffn_products(s_layers[l], self.layout))]).mean()
            for l, wt_l in zip(self.layers, wt)])
        loss = loss + self.alpha * weight.mean()
        return loss, hidden.detach(), weight.detach(), jvp.detach(), lm.detach()


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
            module = _module(layer, path)
            names.extend(f"{prefix[id(module)]}.{n}" for n, p in module.named_parameters(recurse=True))
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
    """AdamW groups: decay on matrices, none on biases and norm weights (by the whole parameter's
    shape: a ZeRO-3 partition is a flat piece, ``ds_shape`` the shape it is a piece of)."""
    def ndim(p: nn.Parameter) -> int:
        return len(getattr(p, "ds_shape", p.shape))

    decay = [p for p in named.values() if ndim(p) >= 2]
    no_decay = [p for p in named.values() if ndim(p) < 2]
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


def apply_neuron_split(model: nn.Module, split: NeuronSplit, gather=None, partition=None) -> list[str]:
    """Replace the FFN Linears of ``split.layer`` with :class:`SplitLinear`; returns the names of
    the parameters that train (trainable neurons, b_out, the norm after the FFN). For a partitioned
    model (ZeRO-3), ``gather`` (a context factory) gives the layer's FFN weights whole while its
    splits are made and ``partition`` partitions the splits' new parameters at once, so a rank holds
    one layer's FFN whole at a time."""
    layout = layout_for(model.config.model_type)
    layer = transformer_layers(model)[split.layer]
    sites = []
    for dim, paths in ((0, layout.rows), (1, layout.cols)):
        for path in paths:
            parent = layer
            parts = path.split(".")
            for part in parts[:-1]:
                parent = getattr(parent, part)
            sites.append((parent, parts[-1], getattr(parent, parts[-1]), dim))
    olds = [p for _, _, old, _ in sites for p in old.parameters()]
    with gather(olds) if gather is not None else contextlib.nullcontext():
        news = [SplitLinear(old, split.frozen, split.trainable, dim) for _, _, old, dim in sites]
    if partition is not None:
        partition([p for new in news for p in new.parameters()], olds[0])
    for (parent, attr, _, _), new in zip(sites, news):
        setattr(parent, attr, new)
    names = []
    prefix = {id(m): n for n, m in model.named_modules()}
    for n, p in layer.named_parameters():
        if p.requires_grad and not n.endswith(("weight_frozen", "bias_frozen")):
            if any(n.startswith(path + ".") for path in (*layout.rows, *layout.cols)) or \
                    (layout.post_norm and n.startswith(layout.post_norm + ".")):
                names.append(f"{prefix[id(layer)]}.{n}")
    return names

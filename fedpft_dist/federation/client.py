"""Local training of one client: a plain loop, fresh AdamW state, the round's learning rate.

Two tasks: sequence classification (``ClientData.labels`` holds a class per example) and causal-LM
fine-tuning (``labels`` is None: every real token after the first is the target of the position before
it; the loss is the token-weighted mean next-token cross-entropy).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.tasks import ClientData
from ..models.adapters import get_adapter, set_adapter
from ..models.lm import IGNORE, next_token_labels, next_token_sums
from ..runtime import Communicator
from ..runtime.shard import is_sharded


@dataclass
class ClientUpdate:
    adapter: dict[str, torch.Tensor]
    num_samples: int
    loss_sum: float           # this rank's share of the loss summed over loss_count (all of it without a group)
    steps: int
    tokens: int               # real tokens this rank computed on
    loss_count: float = 0.0   # what loss_sum sums over: examples x epochs, or next-token targets
    # where the client's time went: set_up (adapter in, optimizer), compute (the batches), collect
    # (adapter out); all but compute is the per-client fixed cost
    seconds: dict = field(default_factory=dict)


def train_client(model: nn.Module, global_adapter: dict[str, torch.Tensor], data: ClientData, epochs: int,
                 batch_size: int, lr: float, weight_decay: float, seed: int, recorder=None,
                 prox_mu: float = 0.0, group: Optional[Communicator] = None,
                 head_lr_scale: float = 1.0) -> ClientUpdate:
    """Start from the global adapter, train ``epochs`` local epochs, return the new adapter.

    ``seed`` fixes the batch order and dropout, so the update depends only on (client, round), not on
    the rank that trains it. Each batch is cut to its longest real sequence. ``recorder`` (an
    :class:`~fedpft_dist.models.proxy.ActivationRecorder`) receives each batch's attention mask.
    The loss is the mean over the batch's examples (classification) or next-token targets (causal LM).
    ``prox_mu`` > 0 adds FedProx's proximal term ``mu/2 * sum |theta - theta_global|^2`` over the
    trainable parameters to what is minimised (not to the reported loss). ``head_lr_scale`` scales
    the learning rate of the task head (peft's ``modules_to_save``) against the LoRA tensors'.

    ``group`` (a client group of G ranks, all calling this for the same client) splits every batch
    into G consecutive row blocks, one per rank. Each rank's loss is its rows' loss sum divided by
    the whole batch's count, so the sum of the G gradients, all-reduced inside the group before
    every step, is the whole batch's gradient; every rank then takes the same step and ends with
    the same adapter. A model sharded over the group (``fed.client_sharding``) sums the gradients in
    its own backward pass instead.
    """
    t0 = time.perf_counter()
    set_adapter(model, global_adapter)
    model.train()
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    anchor = [p.detach().clone() for p in params] if prox_mu > 0 else None
    opt = torch.optim.AdamW(_param_groups(named, lr, head_lr_scale), lr=lr, weight_decay=weight_decay)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = params[0].device
    n = len(data)
    causal = data.labels is None
    split = group is not None and group.world_size > 1
    sharded = split and is_sharded(params[0])
    loss_sum, loss_count, steps, tokens = 0.0, 0.0, 0, 0
    t1 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            batch = order[start: start + batch_size]
            # the whole batch's width and count, whichever rows this rank computes
            width = int(data.attention_mask[batch].sum(1).max())
            if causal:
                count = int((next_token_labels(data.input_ids[batch, :width],
                                               data.attention_mask[batch, :width])[:, 1:] != IGNORE).sum())
            else:
                count = len(batch)
            rows = batch.tensor_split(group.world_size)[group.rank] if split else batch
            if len(rows) or sharded:
                # a sharded model's forward and backward are collectives of the group: a rank without
                # rows of this batch runs one row at weight 0 (recording nothing)
                total = _loss_sum(model, data, rows if len(rows) else batch[:1], width, device, causal, recorder,
                                  weight=1.0 if len(rows) else 0.0)
                (total / max(1, count)).float().backward()
                loss_sum += float(total.detach())
                tokens += int(data.attention_mask[rows].sum())
            if split and not sharded:
                _sum_gradients(params, group)   # a sharded model's backward sums them (reduce-scatter)
            if anchor is not None:
                # d/dtheta of mu/2 |theta - theta_global|^2, added once (after the group's sum)
                for p, p0 in zip(params, anchor):
                    p.grad.add_(p.detach() - p0, alpha=prox_mu)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_count += count
            steps += 1
    t2 = time.perf_counter()
    adapter = get_adapter(model)
    seconds = {"set_up": t1 - t0, "compute": t2 - t1, "collect": time.perf_counter() - t2}
    return ClientUpdate(adapter, n, loss_sum, steps, tokens, loss_count, seconds)


def _param_groups(named: list[tuple[str, nn.Parameter]], lr: float, head_lr_scale: float) -> list[dict]:
    """The trainable ``(name, parameter)``s in model order; with a head scale other than 1, the head
    (peft's ``modules_to_save`` copy) in a group of its own at ``lr * head_lr_scale``."""
    if head_lr_scale == 1.0:
        return [{"params": [p for _, p in named]}]
    head = [p for n, p in named if ".modules_to_save." in n]
    rest = [p for n, p in named if ".modules_to_save." not in n]
    return [g for g in ({"params": rest}, {"params": head, "lr": lr * head_lr_scale}) if g["params"]]


def _loss_sum(model: nn.Module, data: ClientData, rows: torch.Tensor, width: int, device: torch.device,
              causal: bool, recorder, weight: float = 1.0) -> torch.Tensor:
    """``weight`` x the loss summed over ``rows`` (examples, or their next-token targets), cut to
    ``width``; the recorder sees the rows only at weight 1."""
    mask = data.attention_mask[rows, :width].to(device)
    ids = data.input_ids[rows, :width].to(device)
    if recorder is not None:
        recorder.mask = mask if weight else torch.zeros_like(mask)
    extra = {} if data.token_type_ids is None else {"token_type_ids": data.token_type_ids[rows, :width].to(device)}
    logits = model(input_ids=ids, attention_mask=mask, **extra).logits
    if causal:
        return weight * next_token_sums(logits, next_token_labels(ids, mask))[0]
    return weight * F.cross_entropy(logits.float(), data.labels[rows].to(device), reduction="sum")


def _sum_gradients(params: list[nn.Parameter], group: Communicator) -> None:
    """One all-reduce of every trainable parameter's gradient inside the client group (a rank that
    had no rows of this batch sends zeros)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).to(group.device)
    group.all_reduce_(flat, name="client/gradients")
    offset = 0
    for p in params:
        k = p.numel()
        p.grad = flat[offset: offset + k].view_as(p).to(p.device, p.dtype)
        offset += k


def eval_batches(input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int, device: torch.device,
                 token_type_ids: Optional[torch.Tensor] = None) -> Iterator[dict[str, torch.Tensor]]:
    """Model inputs of consecutive ``batch_size`` rows, each batch cut to its longest real sequence
    (right padding) and moved to ``device``."""
    for start in range(0, len(input_ids), batch_size):
        rows = slice(start, start + batch_size)
        width = max(1, int(attention_mask[rows].sum(1).max()))
        batch = {"input_ids": input_ids[rows, :width].to(device),
                 "attention_mask": attention_mask[rows, :width].to(device)}
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids[rows, :width].to(device)
        yield batch


def length_order(attention_mask: torch.Tensor) -> torch.Tensor:
    """Row indices by falling real length, ties in row order: consecutive batches of this order hold
    rows of similar length, so cutting each batch to its longest row leaves little padding. A pure
    function of the rows, so every rank orders its shard the same way at any world size."""
    return torch.sort(attention_mask.sum(1), descending=True, stable=True).indices


@torch.no_grad()
def next_token_eval(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int,
                    device: Optional[torch.device] = None, by_length: bool = True) -> torch.Tensor:
    """float64 [loss sum, correct, targets] of next-token prediction over the rows (model in eval
    mode), in batches of rows of similar length (``by_length``) or in row order."""
    model.eval()
    out = torch.zeros(3, dtype=torch.float64)
    if by_length:
        order = length_order(attention_mask)
        input_ids, attention_mask = input_ids[order], attention_mask[order]
    for batch in eval_batches(input_ids, attention_mask, batch_size, device or next(model.parameters()).device):
        logits = model(**batch).logits
        loss, correct, count = next_token_sums(logits, next_token_labels(batch["input_ids"], batch["attention_mask"]))
        out += torch.tensor([float(loss), correct, count], dtype=torch.float64)
    return out


def perplexity_and_accuracy(sums: torch.Tensor) -> tuple[float, float, float]:
    """(mean next-token loss, perplexity = exp(mean loss), next-token accuracy) from summed
    [loss sum, correct, targets]."""
    loss_sum, correct, count = (float(x) for x in sums)
    if count == 0:
        return math.nan, math.nan, math.nan
    mean = loss_sum / count
    return mean, (math.exp(mean) if mean < 709 else math.inf), correct / count  # exp overflows past 709


@torch.no_grad()
def predict(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int,
            device: Optional[torch.device] = None, token_type_ids: Optional[torch.Tensor] = None,
            by_length: bool = True) -> torch.Tensor:
    """Argmax class of every row, in the rows' order (the model in eval mode). ``by_length`` runs the
    rows in batches of similar length (less padding to compute), then puts the predictions back."""
    model.eval()
    device = device or next(model.parameters()).device
    if len(input_ids) == 0:
        return torch.zeros(0, dtype=torch.long)
    order = length_order(attention_mask) if by_length else torch.arange(len(input_ids))
    types = token_type_ids[order] if token_type_ids is not None else None
    preds = torch.cat([model(**batch).logits.argmax(-1).cpu()
                       for batch in eval_batches(input_ids[order], attention_mask[order], batch_size, device, types)])
    out = torch.empty_like(preds)
    out[order] = preds
    return out


def confusion_counts(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """Per-class true positives, false positives, false negatives (float64, to be summed over ranks)."""
    tp = torch.zeros(num_classes, dtype=torch.float64)
    fp = torch.zeros(num_classes, dtype=torch.float64)
    fn = torch.zeros(num_classes, dtype=torch.float64)
    for c in range(num_classes):
        p, y = preds == c, labels == c
        tp[c] = float((p & y).sum())
        fp[c] = float((p & ~y).sum())
        fn[c] = float((~p & y).sum())
    return {"tp": tp, "fp": fp, "fn": fn}


def accuracy_and_macro_f1(counts: dict[str, torch.Tensor]) -> tuple[float, float]:
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    total = float((tp + fn).sum())
    accuracy = float(tp.sum()) / total if total else 0.0
    f1 = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp_min(1e-12), torch.zeros_like(tp))
    return accuracy, float(f1.mean())

"""Local training of one client: a plain loop, fresh AdamW state, the round's learning rate.

Two tasks: sequence classification (``ClientData.labels`` holds a class per example) and causal-LM
fine-tuning (``labels`` is None: every real token after the first is the target of the position before
it; the loss is the token-weighted mean next-token cross-entropy).
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.tasks import ClientData
from ..models.adapters import get_adapter, set_adapter
from ..models.lm import IGNORE, next_token_labels, next_token_loss_sum, next_token_stats
from ..runtime import Communicator
from ..runtime.optim import adamw
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
                 head_lr_scale: float = 1.0, grad_accum: int = 1) -> ClientUpdate:
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

    ``grad_accum`` (``fed.grad_accum``) computes each step's rows (this rank's block of the batch) in
    that many consecutive micro-batches, each cut to the whole batch's width, their gradients summed
    before the one optimizer step: the same step as without it, up to the order of floating-point
    sums, with the activations of 1/grad_accum of the rows at a time.

    Host syncs: the batches' widths, counts and token counts are worked out before the first step
    (:func:`_batch_plan`, one read of the masks), the steps (:func:`_train_step`) read nothing back,
    and the loss sum stays on the device until it is read once, after the last step.
    """
    t0 = time.perf_counter()
    local = _set_up(model, global_adapter, lr, weight_decay, seed, data.labels is None, recorder, prox_mu, group,
                    head_lr_scale)
    plan = _batch_plan(data, epochs, batch_size, torch.Generator().manual_seed(seed), local.group, local.sharded,
                       grad_accum)
    loss = torch.zeros((), dtype=torch.float64, device=local.device)
    t1 = time.perf_counter()
    for batch in plan:
        total = _train_step(local, data, batch)
        if total is not None:
            loss += total.double()   # float64, as the sum of the steps' values read one by one was
    loss_sum = float(loss)           # the client's one read of its loss
    t2 = time.perf_counter()
    adapter = get_adapter(model)
    seconds = {"set_up": t1 - t0, "compute": t2 - t1, "collect": time.perf_counter() - t2}
    return ClientUpdate(adapter, len(data), loss_sum, len(plan), sum(b.tokens for b in plan),
                        float(sum(b.count for b in plan)), seconds)


@dataclass
class _Local:
    """One client's local training, set up: what every step uses."""
    model: nn.Module
    opt: torch.optim.Optimizer
    params: list[nn.Parameter]                # the trainable parameters, in model order
    anchor: Optional[list[torch.Tensor]]      # FedProx: the global adapter's values (None without it)
    prox_mu: float
    group: Optional[Communicator]             # the client group when it has more than one rank
    sharded: bool                             # the model is sharded over the group
    device: torch.device
    causal: bool
    recorder: object = None


def _set_up(model: nn.Module, global_adapter: dict[str, torch.Tensor], lr: float, weight_decay: float, seed: int,
            causal: bool, recorder=None, prox_mu: float = 0.0, group: Optional[Communicator] = None,
            head_lr_scale: float = 1.0) -> _Local:
    """The global adapter in, training mode, a fresh AdamW (fused on CUDA), FedProx's anchor, and the
    seed of dropout: a client's training up to its first step (see :func:`train_client`)."""
    set_adapter(model, global_adapter)
    model.train()
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    anchor = [p.detach().clone() for p in params] if prox_mu > 0 else None
    opt = adamw(_param_groups(named, lr, head_lr_scale), lr=lr, weight_decay=weight_decay)
    split = group is not None and group.world_size > 1
    torch.manual_seed(seed)
    return _Local(model, opt, params, anchor, prox_mu, group if split else None, split and is_sharded(params[0]),
                  params[0].device, causal, recorder)


@dataclass(frozen=True)
class _Micro:
    """One forward and backward of a step: some of this rank's rows of the batch."""
    rows: torch.Tensor   # the rows this rank computes (a stand-in row at weight 0: see ``weight``)
    weight: float        # 1; 0 for the stand-in row of a sharded model's rank without rows here
    compute: bool        # whether this rank runs the model for this micro-batch
    tokens: int          # real tokens of these rows


@dataclass(frozen=True)
class _Batch:
    """One step of a client's plan, with everything the host needs to know about it as Python values."""
    micro: tuple[_Micro, ...]   # fed.grad_accum micro-batches, their gradients summed before the step
    width: int           # the whole batch's longest real sequence: every row is cut to it
    count: int           # what the whole batch's loss is divided by: its examples, or its next-token targets

    @property
    def tokens(self) -> int:   # real tokens of this rank's rows
        return sum(m.tokens for m in self.micro)


def _batch_plan(data: ClientData, epochs: int, batch_size: int, gen: torch.Generator,
                group: Optional[Communicator], sharded: bool, grad_accum: int = 1) -> list[_Batch]:
    """Every step of a client's local training: batches of a fresh ``gen`` permutation per epoch, with
    their widths, counts and this rank's token counts computed on the masks and read in one
    ``tolist`` (the steps then need no read of their own). ``group``: a client group of more than one
    rank, which takes consecutive row blocks of every batch; ``grad_accum``: this rank's block in that
    many consecutive micro-batches (a sharded model's rank runs every one, a stand-in where it has
    no rows, since its forward and backward are collectives)."""
    causal = data.labels is None
    lengths = data.attention_mask.sum(1).long()
    if causal:   # next-token targets per row, counted up to each position
        valid = next_token_labels(data.input_ids, data.attention_mask)[:, 1:] != IGNORE
        upto = torch.cat([torch.zeros_like(lengths[:, None]), valid.long().cumsum(1)], 1)
    batches, mine, stats = [], [], []
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=gen)
        for start in range(0, len(data), batch_size):
            batch = order[start: start + batch_size]
            rows = batch.tensor_split(group.world_size)[group.rank] if group is not None else batch
            micro = rows.tensor_split(grad_accum)
            width = lengths[batch].max()   # the whole batch's, whichever rows this rank computes
            # a batch cut to ``width`` keeps the targets of positions 1 .. width - 1
            count = upto[batch, (width - 1).clamp_min(0).reshape(1)].sum() if causal else width.new_tensor(len(batch))
            batches.append(batch)
            mine.append(micro)
            stats.append(torch.stack([width, count, *(lengths[m].sum() for m in micro)]))
    values = torch.cat(stats).tolist() if stats else []
    plan, at = [], 0
    for batch, micro in zip(batches, mine):
        width, count = values[at], values[at + 1]
        tokens = values[at + 2: at + 2 + len(micro)]
        at += 2 + len(micro)
        steps = []
        for rows, n in zip(micro, tokens):
            stand_in = not len(rows) and sharded   # a sharded model's forward and backward are collectives
            steps.append(_Micro(batch[:1] if stand_in else rows, 0.0 if stand_in else 1.0,
                                bool(len(rows)) or sharded, n))
        plan.append(_Batch(tuple(steps), width, count))
    return plan


def _train_step(local: _Local, data: ClientData, batch: _Batch) -> Optional[torch.Tensor]:
    """One optimizer step: this rank's rows of ``batch`` forward and backward, the group's gradient
    sum, FedProx's term, AdamW. Returns this rank's loss sum over its rows (detached, on the device;
    None when it computed nothing). Reads nothing back to the host: no ``.item()``, ``int()``,
    ``float()`` or ``.tolist()`` of a tensor (the plan holds the counts as Python values)."""
    total = None
    for micro in batch.micro:
        if not micro.compute:
            continue
        part = _loss_sum(local.model, data, micro.rows, batch.width, local.device, local.causal, local.recorder,
                         weight=micro.weight)
        (part / max(1, batch.count)).float().backward()   # gradients add up over the micro-batches
        total = part.detach() if total is None else total + part.detach()
    if local.group is not None and not local.sharded:
        _sum_gradients(local.params, local.group)   # a sharded model's backward sums them (reduce-scatter)
    if local.anchor is not None:
        # d/dtheta of mu/2 |theta - theta_global|^2, added once (after the group's sum)
        for p, p0 in zip(local.params, local.anchor):
            p.grad.add_(p.detach() - p0, alpha=local.prox_mu)
    local.opt.step()
    local.opt.zero_grad(set_to_none=True)
    return total


def _param_groups(named: list[tuple[str, nn.Parameter]], lr: float, head_lr_scale: float) -> list[dict]:
    """The trainable ``(name, parameter)``s in model order; with a head scale other than 1, the head
    (peft's ``modules_to_save`` copy) in a group of its own at ``lr * head_lr_scale``. A transformer
    layer trained in full (FedOT's adapter; also a ``modules_to_save`` copy, of an item of the layer
    list: ``<layers>.<i>.modules_to_save.``) is no head: it keeps the round's rate."""
    if head_lr_scale == 1.0:
        return [{"params": [p for _, p in named]}]

    def is_head(n: str) -> bool:
        return ".modules_to_save." in n and _WHOLE_LAYER.search(n) is None

    head = [p for n, p in named if is_head(n)]
    rest = [p for n, p in named if not is_head(n)]
    return [g for g in ({"params": rest}, {"params": head, "lr": lr * head_lr_scale}) if g["params"]]


_WHOLE_LAYER = re.compile(r"\.\d+\.modules_to_save\.")


def _loss_sum(model: nn.Module, data: ClientData, rows: torch.Tensor, width: int, device: torch.device,
              causal: bool, recorder, weight: float = 1.0) -> torch.Tensor:
    """``weight`` x the loss summed over ``rows`` (examples, or their next-token targets), cut to
    ``width``; the recorder sees the rows only at weight 1. The rows go to the device without waiting
    for it (``non_blocking``: a blocking copy to a GPU waits for the work queued before it)."""
    mask = data.attention_mask[rows, :width].to(device, non_blocking=True)
    ids = data.input_ids[rows, :width].to(device, non_blocking=True)
    if recorder is not None:
        recorder.mask = mask if weight else torch.zeros_like(mask)
    extra = {} if data.token_type_ids is None else \
        {"token_type_ids": data.token_type_ids[rows, :width].to(device, non_blocking=True)}
    logits = model(input_ids=ids, attention_mask=mask, **extra).logits
    if causal:
        return weight * next_token_loss_sum(logits, next_token_labels(ids, mask))
    return weight * F.cross_entropy(logits.float(), data.labels[rows].to(device, non_blocking=True), reduction="sum")


def _sum_gradients(params: list[nn.Parameter], group: Communicator) -> None:
    """One all-reduce of every trainable parameter's gradient inside the client group (a rank that
    had no rows of this batch sends zeros)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).to(group.device)
    group.all_reduce_(flat, name="client/gradients", wait=False)
    offset = 0
    for p in params:
        k = p.numel()
        p.grad = flat[offset: offset + k].view_as(p).to(p.device, p.dtype)
        offset += k


def eval_batches(input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int, device: torch.device,
                 token_type_ids: Optional[torch.Tensor] = None) -> Iterator[dict[str, torch.Tensor]]:
    """Model inputs of consecutive ``batch_size`` rows, each batch cut to its longest real sequence
    (right padding) and moved to ``device`` without waiting for it. The widths of all batches are read
    in one go, before the first."""
    for start, width in zip(range(0, len(input_ids), batch_size), batch_widths(attention_mask, batch_size)):
        rows = slice(start, start + batch_size)
        batch = {"input_ids": input_ids[rows, :width].to(device, non_blocking=True),
                 "attention_mask": attention_mask[rows, :width].to(device, non_blocking=True)}
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids[rows, :width].to(device, non_blocking=True)
        yield batch


def batch_widths(attention_mask: torch.Tensor, batch_size: int) -> list[int]:
    """The longest real sequence (at least 1) of each run of ``batch_size`` consecutive rows, in one read."""
    n = len(attention_mask)
    if n == 0:
        return []
    lengths = attention_mask.sum(1).long()
    padded = torch.cat([lengths, lengths.new_zeros(-n % batch_size)])   # zero-length rows change no maximum
    return padded.view(-1, batch_size).amax(1).clamp_min(1).tolist()


def length_order(attention_mask: torch.Tensor) -> torch.Tensor:
    """Row indices by falling real length, ties in row order: consecutive batches of this order hold
    rows of similar length, so cutting each batch to its longest row leaves little padding. A pure
    function of the rows, so every rank orders its shard the same way at any world size."""
    return torch.sort(attention_mask.sum(1), descending=True, stable=True).indices


def stand_in_forwards(model: nn.Module, done: int, batches: int, device: torch.device, types: bool = False) -> None:
    """Forward passes of a one-token row, their outputs dropped, until ``batches`` have run: a model
    sharded over the ranks computes each forward with all of them (its layers' weights are gathered
    for it), so a rank with fewer rows to evaluate than the others still joins every pass."""
    for _ in range(max(0, batches - done)):
        ones = torch.ones(1, 1, dtype=torch.long, device=device)
        model(input_ids=ones, attention_mask=ones, **({"token_type_ids": torch.zeros_like(ones)} if types else {}))


@torch.no_grad()
def next_token_eval(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int,
                    device: Optional[torch.device] = None, by_length: bool = True, batches: int = 0) -> torch.Tensor:
    """float64 [loss sum, correct, targets] of next-token prediction over the rows (model in eval
    mode), in batches of rows of similar length (``by_length``) or in row order; on the CPU. The
    sums stay on the device until the last batch, then come back in one read. ``batches``: run at
    least this many forward passes (:func:`stand_in_forwards`)."""
    model.eval()
    device = device or next(model.parameters()).device
    out = torch.zeros(3, dtype=torch.float64, device=device)
    if by_length:
        order = length_order(attention_mask)
        input_ids, attention_mask = input_ids[order], attention_mask[order]
    done = 0
    for batch in eval_batches(input_ids, attention_mask, batch_size, device):
        logits = model(**batch).logits
        out += next_token_stats(logits, next_token_labels(batch["input_ids"], batch["attention_mask"])).to(device)
        done += 1
    stand_in_forwards(model, done, batches, device)
    return out.cpu()


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
            by_length: bool = True, batches: int = 0) -> torch.Tensor:
    """Argmax class of every row, in the rows' order (the model in eval mode). ``by_length`` runs the
    rows in batches of similar length (less padding to compute), then puts the predictions back.
    ``batches``: run at least this many forward passes (:func:`stand_in_forwards`)."""
    model.eval()
    device = device or next(model.parameters()).device
    if len(input_ids) == 0:
        stand_in_forwards(model, 0, batches, device, token_type_ids is not None)
        return torch.zeros(0, dtype=torch.long)
    order = length_order(attention_mask) if by_length else torch.arange(len(input_ids))
    types = token_type_ids[order] if token_type_ids is not None else None
    # the predictions stay on the device until the last batch, then come back in one read
    preds = [model(**batch).logits.argmax(-1)
             for batch in eval_batches(input_ids[order], attention_mask[order], batch_size, device, types)]
    stand_in_forwards(model, len(preds), batches, device, types is not None)
    preds = torch.cat(preds).cpu()
    out = torch.empty_like(preds)
    out[order] = preds
    return out


def confusion_counts(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """Per-class true positives, false positives, false negatives (float64, to be summed over ranks;
    on the predictions' device, computed without a read)."""
    classes = torch.arange(num_classes, device=preds.device)
    p, y = preds[:, None] == classes, labels.to(preds.device)[:, None] == classes   # [rows, classes]
    return {"tp": (p & y).sum(0).double(), "fp": (p & ~y).sum(0).double(), "fn": (~p & y).sum(0).double()}


def accuracy_and_macro_f1(counts: dict[str, torch.Tensor]) -> tuple[float, float]:
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    total = float((tp + fn).sum())
    accuracy = float(tp.sum()) / total if total else 0.0
    f1 = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp_min(1e-12), torch.zeros_like(tp))
    return accuracy, float(f1.mean())

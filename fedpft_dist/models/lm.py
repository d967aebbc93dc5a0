"""Next-token targets and loss sums of a causal LM: the definitions client training, evaluation
and the gradient-fidelity monitor share.

Nothing here reads a value back to the host: the sums stay tensors on the logits' device, so a
training step or an evaluation batch queues its work without waiting for the accelerator; callers
read them once (per client, per evaluation shard).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # target id that cross-entropy skips: padding, and a token whose predecessor is padding


def next_token_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``input_ids`` with IGNORE where position t is no target: padding, and a real token whose
    predecessor is padding (a left-padded row's first token has no context to be predicted from)."""
    keep = attention_mask.bool().clone()
    keep[:, 1:] &= attention_mask[:, :-1].bool()
    return input_ids.masked_fill(~keep, IGNORE)


def _shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 logits of positions 0..T-2, their targets at 1..T-1)."""
    return logits[:, :-1].float(), labels[:, 1:]


def _loss_sum(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    per_token = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=IGNORE,
                                reduction="none")
    # Summed in float64: a row's contribution then hardly depends on which rows share its batch, so
    # the sum over ranks matches one rank's to ~1e-15.
    return per_token.sum(dtype=torch.float64)


def next_token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy (float64, on the logits' device): the logits at position t
    predict ``labels[:, t + 1]``; IGNORE targets count nowhere. What training needs: no accuracy
    (no argmax over the vocabulary), no read-back."""
    return _loss_sum(*_shifted(logits, labels))


def next_token_stats(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 [loss sum, correct argmax predictions, targets] on the logits' device, without a
    read-back: sums, so that batches and ranks add up (perplexity = exp(loss sum / targets))."""
    pred, target = _shifted(logits, labels)
    valid = target != IGNORE
    correct = ((pred.argmax(-1) == target) & valid).sum()
    return torch.stack([_loss_sum(pred, target), correct.double(), valid.sum().double()])

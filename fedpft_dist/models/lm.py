"""Next-token targets and loss sums of a causal LM: the definitions client training, evaluation
and the gradient-fidelity monitor share."""
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


def next_token_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(sum of next-token cross-entropy, correct argmax predictions, targets): the logits at position
    t predict ``labels[:, t + 1]``; IGNORE targets count nowhere. Sums, so that batches and ranks
    add up: perplexity = exp(loss sum / targets)."""
    pred = logits[:, :-1].float()
    target = labels[:, 1:]
    valid = target != IGNORE
    per_token = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=IGNORE,
                                reduction="none")
    # Summed in float64: a row's contribution then hardly depends on which rows share its batch, so
    # the sum over ranks matches one rank's to ~1e-15.
    loss = per_token.sum(dtype=torch.float64)
    correct = int(((pred.argmax(-1) == target) & valid).sum())
    return loss, correct, int(valid.sum())

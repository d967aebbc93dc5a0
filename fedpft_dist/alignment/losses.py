"""Losses and error measures shared by the proxy report and both distillations (pure functions)."""
from __future__ import annotations

from typing import Optional

import torch


def relative_sq_error(teacher: torch.Tensor, student: torch.Tensor, mask: Optional[torch.Tensor] = None
                      ) -> torch.Tensor:
    """``mean((T - S)^2) / mean(T^2)`` over the tokens where ``mask`` is 1 (all tokens if None).

    ``teacher``/``student``: [batch, seq, hidden]; ``mask``: [batch, seq]. Computed in fp32. This is
    the hidden-state term of the distillation loss (layer-level and neuron-level alike; see
    :mod:`fedpft_dist.alignment.distill`), and the error the reports show.
    """
    t, s = teacher.float(), student.float()
    if mask is None:
        return (t - s).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)
    m = mask.to(t.dtype).unsqueeze(-1)
    return ((t - s).pow(2) * m).sum() / (t.pow(2) * m).sum().clamp_min(1e-12)


def relative_sq_error_per_sample(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``relative_sq_error`` of each sequence of the batch: [batch]. Averaging these over a batch
    gives the same value however the batch is split over ranks (a ratio of sums would not)."""
    t, s = teacher.float(), student.float()
    m = mask.to(t.dtype).unsqueeze(-1)
    num = ((t - s).pow(2) * m).sum(dim=(1, 2))
    den = (t.pow(2) * m).sum(dim=(1, 2)).clamp_min(1e-12)
    return num / den


def next_token_loss_per_sample(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean next-token cross-entropy (nats) over its real targets: [batch]. Position t
    predicts token t + 1 where both are real (``mask`` 1). Computed in fp32; averaging these over a
    batch gives the same value however the batch is split over ranks. The LM term of FedOT's emulator
    distillation."""
    import torch.nn.functional as F

    logits, targets = logits[:, :-1].float(), input_ids[:, 1:]
    valid = (mask[:, :-1] * mask[:, 1:]).to(logits.dtype)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    nll = nll.view(targets.shape) * valid
    return nll.sum(1) / valid.sum(1).clamp_min(1.0)

"""Update transfer: how much of what training on the FM would gain a client's update on the client
model (proxy or emulator) gains on the FM.

From the global adapter A0, k local steps of the clients' own optimizer (AdamW at the round's
settings, the same seed and batch order) on a probe client (the first k x batch-size examples of the
probe set, held out from every client), once on the client model and once on the FM itself
(training the same adapter tensors):

    transfer = (L_FM(A0) - L_FM(A0 + client-model update)) / (L_FM(A0) - L_FM(A0 + FM update))

where L_FM is the FM's mean loss on the probe client's examples (per example, or per next-token
target). It is 1 for the FM against itself and falls as the client model's updates stop moving the FM
the way its own would; the gradient cosine says the same about one gradient, this about where k
steps end. None when k steps on the FM do not lower its loss (nothing to transfer).

Every rank computes it whole, the same way (no collective; a client model sharded over a client
group trains with its group), so it does not depend on the number of ranks. The random state and
the FM's adapter are as they were afterwards.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..alignment.fidelity import (adapter_key, classification_loss, next_token_loss, probe_batch,
                                  probe_rows)
from ..data.tasks import ClientData
from ..models.adapters import get_adapter, set_adapter
from ..models.lm import IGNORE, next_token_labels
from ..runtime import Communicator
from .client import train_client


@dataclass
class TransferSetting:
    steps: int                 # k local steps
    batch_size: int
    lr: float
    weight_decay: float
    causal: bool
    seed: int


def mean_loss(model: nn.Module, adapter: dict[str, torch.Tensor], data: ClientData, causal: bool,
              batch_size: int) -> float:
    """The model's mean loss over ``data`` with ``adapter`` in it (eval mode, batches cut to their
    longest row): per example, or per next-token target."""
    set_adapter(model, adapter)
    was_training = model.training
    model.eval()
    loss_fn = next_token_loss if causal else classification_loss
    device = next(p for p in model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(data)))
            batch, labels = probe_batch(data, rows, max(1, int(data.attention_mask[rows].sum(1).max())), device)
            total += float(loss_fn(model, batch, labels))
            count += (int((next_token_labels(batch["input_ids"], batch["attention_mask"])[:, 1:] != IGNORE).sum())
                      if causal else len(rows))
    model.train(was_training)
    return total / max(count, 1)


def _steps_data(data: ClientData, steps: int, batch_size: int) -> tuple[ClientData, ClientData]:
    """The probe client: the first ``steps`` x ``batch_size`` probe rows (all of them when there are
    fewer), and those rows in order, repeated as often as needed, as one epoch of k steps."""
    n = min(len(data), steps * batch_size)
    return probe_rows(data, torch.arange(n)), probe_rows(data, torch.arange(steps * batch_size) % n)


def update_transfer(client_model: nn.Module, fm_model: nn.Module, client_adapter: dict[str, torch.Tensor],
                    to_fm: Callable[[dict], dict], data: ClientData, setting: TransferSetting,
                    group: Optional[Communicator] = None, fm_group: Optional[Communicator] = None) -> dict:
    """``transfer`` and the two loss decreases it divides (``transfer_client_decrease``,
    ``transfer_fm_decrease``), with the first k x batch-size rows of ``data`` as the probe client; ``group``: the client group ``client_model`` is sharded
    over (every rank of it calls this); ``fm_group``: the ranks ``fm_model`` is sharded over (all of
    them call this; its local steps split each batch over them as a client group does)."""
    s = setting
    data, steps = _steps_data(data, s.steps, s.batch_size)
    start = to_fm(client_adapter)
    saved = get_adapter(fm_model)
    fm_all = dict(saved)
    fm_all.update(start)
    with torch.random.fork_rng(devices=[]):
        before = mean_loss(fm_model, fm_all, data, s.causal, s.batch_size)
        moved = train_client(client_model, client_adapter, steps, 1, s.batch_size, s.lr, s.weight_decay, s.seed,
                             group=group).adapter
        after_client = mean_loss(fm_model, {**fm_all, **to_fm(moved)}, data, s.causal, s.batch_size)
        # the FM trains the tensors the client's adapter has, nothing else
        frozen = [p for n, p in fm_model.named_parameters() if p.requires_grad and not _in(n, start)]
        for p in frozen:
            p.requires_grad_(False)
        try:
            own = train_client(fm_model, fm_all, steps, 1, s.batch_size, s.lr, s.weight_decay, s.seed,
                               group=fm_group).adapter
        finally:
            for p in frozen:
                p.requires_grad_(True)
        after_fm = mean_loss(fm_model, {**fm_all, **own}, data, s.causal, s.batch_size)
    set_adapter(fm_model, saved)
    fm_gain, client_gain = before - after_fm, before - after_client
    ok = fm_gain > 0 and math.isfinite(fm_gain) and math.isfinite(client_gain)
    return {"transfer": client_gain / fm_gain if ok else None, "transfer_client_decrease": client_gain,
            "transfer_fm_decrease": fm_gain, "transfer_steps": s.steps}


def _in(param_name: str, adapter: dict) -> bool:
    return adapter_key(param_name) in adapter

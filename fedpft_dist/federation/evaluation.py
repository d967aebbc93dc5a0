"""Plug-in evaluation: the FM with the global adapter on the test set, sharded over ranks."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..data.tasks import Task
from ..runtime import Runtime
from ..runtime.shard import is_sharded
from .client import accuracy_and_macro_f1, confusion_counts, next_token_eval, perplexity_and_accuracy, predict


def evaluate(rt: Runtime, model: nn.Module, task: Task, batch_size: int) -> dict:
    """``model`` on the test set, sharded over ranks (rank r takes rows r, r+W, ...), with one
    all-reduce of sums: accuracy, macro-F1 and the predictions per class from per-class counts
    (classification), or mean
    next-token loss, perplexity and next-token accuracy from (loss sum, correct, targets) (causal LM).
    Sums first, divisions after: the result does not depend on the number of ranks.

    A model sharded over the ranks (its forward a collective) runs as many forward passes on every
    rank: those with fewer rows add one-token stand-ins."""
    idx = torch.arange(rt.rank, len(task.test_ids), rt.world_size)
    batches = 0
    if any(is_sharded(p) for p in model.parameters()):
        batches = math.ceil(math.ceil(len(task.test_ids) / rt.world_size) / batch_size)   # rank 0's, the most
    if task.causal_lm:
        sums = next_token_eval(model, task.test_ids[idx], task.test_mask[idx], batch_size, rt.device, batches=batches)
        sums = rt.comm.all_reduce_sum({"sums": sums}, name="evaluate/next-token")["sums"]
        loss, ppl, acc = perplexity_and_accuracy(sums)
        return {"test_loss": loss, "perplexity": ppl, "next_token_accuracy": acc, "test_tokens": int(sums[2]),
                "test_examples": len(task.test_ids)}
    types = task.test_types[idx] if task.test_types is not None else None
    preds = predict(model, task.test_ids[idx], task.test_mask[idx], batch_size, rt.device, types, batches=batches)
    counts = confusion_counts(preds, task.test_labels[idx], task.num_classes)
    counts = rt.comm.all_reduce_sum(counts, name="evaluate/counts")
    acc, f1 = accuracy_and_macro_f1(counts)
    # how many test rows the model assigns to each class: [n, 0, 0] is a model that predicts one class
    predicted = [int(x) for x in (counts["tp"] + counts["fp"]).tolist()]
    return {"accuracy": acc, "macro_f1": f1, "test_examples": int((counts["tp"] + counts["fn"]).sum()),
            "predicted_per_class": predicted, "predicted_classes": sum(1 for x in predicted if x > 0)}

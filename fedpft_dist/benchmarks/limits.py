"""What each phase of a round would cost with nothing but the arithmetic: the limits ``fedpft bench``
compares the engine's phases with, measured in the same job on the same models and data.

* local training: a bare PyTorch loop (forward, backward, AdamW step, fresh optimizer per client)
  over the batches of the clients this rank trained in the last round (which never aligns, so no
  activation statistics are collected in it either), cut to their longest row as the clients' are;
  tokens per second, against that round's.
* evaluation: the FM with the global adapter on this rank's test shard, sorted by length, in
  batches of ``fed.eval_batch_size``, under ``torch.inference_mode``; seconds.
* alignment: one plain data-parallel knowledge-distillation step (teacher forward, student forward
  and backward on this rank's micro-batches, one all-reduce of the gradients, clipping, AdamW) on
  the alignment's teacher, student and trainable neurons, without DeepSpeed; seconds per step.

Inference and the distillation step are timed ``reps`` times after a warm-up (the median counts);
the training loop once, after a short warm-up (it replays a whole round).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn as nn

from ..alignment.distill import DistillPair, apply_neuron_split, freeze_all_but, param_groups, plan_neuron_split
from ..alignment.job import batch_indices
from ..config import Config
from ..data.tasks import ClientData
from ..federation.client import eval_batches, length_order
from ..models.adapters import merge_lora_into, set_adapter
from ..models.families import ffn_modules, layout_for, transformer_layers
from ..models.proxy import load_proxy
from ..runtime import Runtime


def sync_device(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock times cover it (CUDA launches are asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], None], device: torch.device, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        sync_device(device)
        t0 = time.perf_counter()
        fn()
        sync_device(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bare_training(cfg: Config, rt: Runtime, model: nn.Module, adapter: dict,
                  clients: list[tuple[ClientData, int]]) -> dict:
    """Tokens per second of a bare LoRA training loop over the ``(data, seed)`` of each client: one
    epoch each, fresh AdamW, batches of ``fed.batch_size`` in the order ``train_client`` draws from
    the seed, each cut to its longest row. Given the clients a rank trained in one round, it is the
    limit of that round's local training; one warm-up pass over the first client's first batches."""
    f = cfg.fed
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    runs = []
    for data, seed in clients:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
        types = data.token_type_ids[order] if data.token_type_ids is not None else None
        labels = data.labels[order].split(f.batch_size)
        batches = list(eval_batches(data.input_ids[order], data.attention_mask[order], f.batch_size, rt.device, types))
        runs.append([{**b, "labels": y.to(rt.device)} for b, y in zip(batches, labels)])
    tokens = sum(int(b["attention_mask"].sum()) for batches in runs for b in batches)

    def loop(batches: list[dict]) -> None:
        set_adapter(model, adapter)
        opt = torch.optim.AdamW(params, lr=f.lr, weight_decay=f.weight_decay)
        for batch in batches:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    loop(runs[0][:4] if runs else [])   # warm-up
    sync_device(rt.device)
    t0 = time.perf_counter()
    for batches in runs:
        loop(batches)
    sync_device(rt.device)
    seconds = time.perf_counter() - t0
    set_adapter(model, adapter)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds else 0.0}


def bare_inference(rt: Runtime, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, types, batch_size: int,
                   reps: int) -> float:
    """Seconds of a forward pass over the rows sorted by length (the predictions are not kept)."""
    model.eval()
    order = length_order(mask)
    batches = list(eval_batches(ids[order], mask[order], batch_size, rt.device,
                                types[order] if types is not None else None))

    def passes() -> None:
        with torch.inference_mode():
            for batch in batches:
                model(**batch).logits.argmax(-1).cpu()

    return _median_time(passes, rt.device, reps)


def bare_distill_step(cfg: Config, rt: Runtime, teacher: nn.Module, proxy_dir, prefix: str, adapter: dict,
                      layers: list[int], chunks: torch.Tensor, steps: int) -> float:
    """Seconds per plain data-parallel KD step of an alignment's shape: the proxy with ``adapter``
    merged, the least active ``1 - fed.align_keep`` of each layer's neurons trainable (uniform
    activity: which neurons train does not change the cost), ``distill.batch_size`` chunks per step
    over all ranks in ``distill.micro_batch``-chunk passes."""
    f, d = cfg.fed, cfg.distill
    student, _ = load_proxy(proxy_dir, task="base", dtype=cfg.model.dtype)
    merge_lora_into(student, adapter, f.lora_alpha / f.lora_r, strip=[prefix])
    gen = torch.Generator().manual_seed(cfg.run.seed)
    layout = layout_for(student.config.model_type)
    names = []
    for l in layers:
        neurons = ffn_modules(transformer_layers(student)[l], layout)[0][0].out_features
        names += apply_neuron_split(student, plan_neuron_split(torch.ones(neurons), f.align_keep, gen, l))
    flags = [(p, p.requires_grad) for p in teacher.parameters()]
    pair = DistillPair(teacher, student.to(rt.device), layers, f.align_alpha)
    teacher.eval()
    student.eval()
    named = freeze_all_but(student, names)
    params = list(named.values())
    opt = torch.optim.AdamW(param_groups(named, d.weight_decay), lr=f.align_lr or d.lr)
    micro_steps = d.batch_size // (rt.world_size * d.micro_batch)
    counter = iter(range(10**9))

    def step() -> None:
        idx = batch_indices(next(counter), rt.rank, rt.world_size, d.batch_size, len(chunks), cfg.run.seed)
        for micro in idx.split(d.micro_batch):
            ids = chunks[micro].to(rt.device)
            (pair(ids, torch.ones_like(ids))[0] / micro_steps).backward()
        if rt.world_size > 1:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            rt.comm.all_reduce_(flat, name="bench/bare-distill-grads")
            flat /= rt.world_size
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset: offset + p.numel()].view_as(p))
                offset += p.numel()
        torch.nn.utils.clip_grad_norm_(params, d.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        return _median_time(step, rt.device, steps)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)

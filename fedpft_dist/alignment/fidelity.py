"""Gradient fidelity: how well the client model's LoRA gradients stand in for the FM's.

FedPFT's premise is that the gradient a client computes on the proxy points where the FM's gradient
would. On a fixed probe set, with the same adapter plugged into both, this module computes the
gradient of the summed loss with respect to every adapter tensor of the client model (proxy or
emulator) and of the FM, and compares them:

    grad_cosine      = <g_client, g_FM> / (|g_client| |g_FM|)    over the attention/FFN LoRA tensors
    grad_rel_error   = |g_client - g_FM| / |g_FM|
    grad_norm_ratio  = |g_client| / |g_FM|
    *_common         the same over the layers every method trains (an emulator's adapter layers),
                     so that methods whose adapters cover different layers compare like for like
    *_per_layer, *_head   per FM layer, and for the task head
    grad_cosine_low, grad_cosine_high   a percentile bootstrap 95 % interval of the cosine over the
                     probe examples (and the same for the common cosine)
    grad_example_cosine (_low, _high)   the mean over probe examples of each example's cosine, with
                     its bootstrap interval: it stays meaningful where the examples' gradients cancel
                     in the sum (an adapter near a minimum of the probe loss)

The gradients are taken per example (in eval mode, so they are deterministic). The probe is cut
into batches once and batch b is computed by rank b mod W, so each example keeps its batch (and
padded width) at any world size; the per-example gradients go to every
rank (all-reduces of zero-padded rows, a block of tensors at a time), which sums them in example
order and folds them into Gram matrices <g_i, g_j> for the bootstrap: every figure is the same on
any number of ranks, bit for bit. Memory: every rank's per-example rows (examples x adapter size,
float32, client and FM), and one block of everybody's at a time (at most 256 MiB per all-reduce).
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.tasks import ClientData, Task
from ..models.adapters import set_adapter
from ..models.lm import next_token_labels, next_token_loss_sum
from ..runtime import ClientGroups, Communicator, Runtime
from ..runtime.shard import full_value, is_sharded

LORA_MARK = (".lora_A.", ".lora_B.")


def probe_indices(task: Task, n: int, seed: int) -> torch.Tensor:
    """A fixed seeded subset of the test set (rows), the same on every rank."""
    total = len(task.test_ids)
    g = torch.Generator().manual_seed(seed * 7_368_787 + 17)
    return torch.sort(torch.randperm(total, generator=g)[:min(n, total)]).values


def probe_data(task: Task, rows: torch.Tensor) -> ClientData:
    types = task.test_types[rows] if task.test_types is not None else None
    labels = task.test_labels[rows] if task.test_labels is not None else None
    return ClientData(task.test_ids[rows], task.test_mask[rows], labels, types)


def adapter_key(param_name: str) -> str:
    """A peft parameter name as the adapter's state dict names it (no adapter name, no
    modules_to_save wrapper)."""
    return param_name.replace(".modules_to_save.default.", ".").replace(".default.", ".")


def classification_loss(model: nn.Module, batch: dict, labels: Optional[torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(**batch).logits.float(), labels, reduction="sum")


def next_token_loss(model: nn.Module, batch: dict, labels: Optional[torch.Tensor]) -> torch.Tensor:
    total = next_token_loss_sum(model(**batch).logits, next_token_labels(batch["input_ids"], batch["attention_mask"]))
    return total.float()


def compare(client: dict[str, torch.Tensor], fm: dict[str, torch.Tensor], layer_token: str,
            common_layers: Sequence[int] = ()) -> dict:
    """Cosine, relative error and norm ratio of the client's gradients against the FM's, over the tensors
    both have: LoRA tensors (all, per FM layer, and over ``common_layers``) and, separately, the head."""
    keys = sorted(set(client) & set(fm))
    lora = [k for k in keys if any(m in k for m in LORA_MARK)]
    head = [k for k in keys if k not in lora]
    by_layer = lora_by_layer(lora, layer_token)
    common = [k for l in sorted(set(common_layers)) for k in by_layer.get(l, [])]
    out = {"grad_cosine": None, "grad_rel_error": None, "grad_norm_ratio": None, **_pair_stats(client, fm, lora)}
    if common_layers:
        out.update({f"{k}_common": v for k, v in _pair_stats(client, fm, common).items()})
    out.update({f"{k}_head": v for k, v in _pair_stats(client, fm, head).items() if k != "grad_norm_ratio"})
    layers = range(max(by_layer) + 1) if by_layer else range(0)
    per = [_pair_stats(client, fm, by_layer[l]) if l in by_layer else None for l in layers]
    out["grad_cosine_per_layer"] = [p["grad_cosine"] if p else None for p in per]
    out["grad_rel_error_per_layer"] = [p["grad_rel_error"] if p else None for p in per]
    return out


def lora_by_layer(keys: Sequence[str], layer_token: str) -> dict[int, list[str]]:
    """The LoRA tensor names by the FM layer they sit in (``<layer_token>.<i>.`` in the name)."""
    pattern = re.compile(rf"(?:^|\.){re.escape(layer_token)}\.(\d+)\.")
    out: dict[int, list[str]] = {}
    for k in keys:
        m = pattern.search(k)
        if m and any(mark in k for mark in LORA_MARK):
            out.setdefault(int(m.group(1)), []).append(k)
    return out


def common_layers(num_layers: int, bottom: int, top: int) -> list[int]:
    """The FM layers every method trains LoRA on: an Offsite-Tuning emulator's adapter layers (its
    ``bottom`` and ``top`` layers, the FM's own), which a proxy and the FM also carry. Cosines over
    them compare methods like for like; the full cosine also covers layers only some methods train."""
    return sorted({*range(min(bottom, num_layers)), *range(max(num_layers - top, 0), num_layers)})


def _pair_stats(client: dict, fm: dict, keys: list[str]) -> dict:
    if not keys:
        return {}
    a = torch.cat([client[k].reshape(-1) for k in keys])
    b = torch.cat([fm[k].reshape(-1) for k in keys])
    na, nb = float(a.norm()), float(b.norm())
    # None where undefined (a zero gradient): metrics rows stay valid JSON
    cos = float(a @ b) / (na * nb) if na > 0 and nb > 0 else None
    rel = float((a - b).norm()) / nb if nb > 0 else None
    return {"grad_cosine": cos, "grad_rel_error": rel, "grad_norm_ratio": na / nb if nb > 0 else None}


def dealt_rows(total: int, batch_size: int, index: int, count: int) -> torch.Tensor:
    """The probe rows worker ``index`` of ``count`` computes: the probe is cut into batches of
    ``batch_size`` consecutive examples once, and batch b goes to worker b mod ``count``. Each example
    is thus computed in the same batch, with the same companions and padded width, whatever the
    number of workers (a decoder's results depend on the padded width at the level of rounding)."""
    starts = range(index * batch_size, total, count * batch_size)
    return torch.cat([torch.arange(s, min(s + batch_size, total)) for s in starts]) if starts \
        else torch.zeros(0, dtype=torch.long)


def probe_rows(data: ClientData, rows: torch.Tensor) -> ClientData:
    """The examples ``rows`` of ``data``."""
    return ClientData(*(t[rows] if t is not None else None for t in
                        (data.input_ids, data.attention_mask, data.labels, data.token_type_ids)))


# ----------------------------------------------------------------------------------------------------
# Per-example gradients and the bootstrap interval
# ----------------------------------------------------------------------------------------------------

def example_gradients(model: nn.Module, adapter: dict[str, torch.Tensor], data: ClientData,
                      loss_fn: Callable[[nn.Module, dict, Optional[torch.Tensor]], torch.Tensor],
                      group: Optional[Communicator] = None, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Each example's d(loss)/d(adapter tensor), float32 on the CPU: ``key -> [examples, numel]``
    (eval mode; the model's gradients cleared before and after, its mode restored).

    When every trainable tensor is the weight or bias of an ``nn.Linear`` (LoRA's A and B, the usual
    task heads) they come from batches of ``batch_size``: each such layer keeps its input and, on the
    way back, the gradient of its output, whose per-example products are the per-example gradients
    (padding adds nothing: padded positions get zero gradient). Otherwise one forward and backward per
    example. ``group``: the model is sharded over this client group, whose ranks all call this with
    the same ``data`` and all run every example; the group's first rank returns the gradients, the
    others zeros."""
    set_adapter(model, adapter)
    was_training = model.training
    model.eval()
    params = {adapter_key(n): p for n, p in model.named_parameters() if p.requires_grad}
    keep = group is None or group.rank == 0
    out = {k: torch.zeros(len(data), p.numel()) for k, p in params.items()}
    owners = _linear_owners(model, params)
    for p in params.values():
        p.grad = None
    step = batch_size if owners is not None else 1
    for start in range(0, len(data), step):
        rows = torch.arange(start, min(start + step, len(data)))
        width = max(1, int(data.attention_mask[rows].sum(1).max()))
        batch, labels = probe_batch(data, rows, width, next(iter(params.values())).device)
        if owners is None:
            ((1.0 if keep else 0.0) * loss_fn(model, batch, labels)).backward()
            if keep:
                for k, p in params.items():
                    if p.grad is not None:
                        out[k][start] = full_value(p.grad.detach()).reshape(-1).float().cpu()
        else:
            with _per_example_hooks(owners, out if keep else None, start):
                ((1.0 if keep else 0.0) * loss_fn(model, batch, labels)).backward()
        for p in params.values():
            p.grad = None
    model.train(was_training)
    return out


def probe_batch(data: ClientData, rows: torch.Tensor, width: int, device: torch.device
                ) -> tuple[dict, Optional[torch.Tensor]]:
    """The model inputs and labels of ``rows``, cut to ``width``, on ``device``."""
    batch = {"input_ids": data.input_ids[rows, :width].to(device),
             "attention_mask": data.attention_mask[rows, :width].to(device)}
    if data.token_type_ids is not None:
        batch["token_type_ids"] = data.token_type_ids[rows, :width].to(device)
    return batch, (data.labels[rows].to(device) if data.labels is not None else None)


def _linear_owners(model: nn.Module, params: dict[str, nn.Parameter]) -> Optional[dict[nn.Linear, dict[str, str]]]:
    """For each ``nn.Linear`` holding trainable tensors, which of its weight and bias they are (by
    adapter key); None when a trainable tensor sits anywhere else."""
    by_id = {id(p): k for k, p in params.items()}
    owners: dict[nn.Linear, dict[str, str]] = {}
    found = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            for role in ("weight", "bias"):
                p = getattr(module, role, None)
                if p is not None and id(p) in by_id:
                    owners.setdefault(module, {})[role] = by_id[id(p)]
                    found += 1
    return owners if found == len(params) else None


@contextmanager
def _per_example_hooks(owners: dict[nn.Linear, dict[str, str]], out: Optional[dict[str, torch.Tensor]], start: int):
    """While active, a forward through the model stores each example's gradient of every owned
    Linear tensor into ``out[key][start + i]`` once the backward reaches that layer (None: computed
    for the collectives' sake and dropped)."""
    def on_forward(module: nn.Linear, inputs: tuple, output: torch.Tensor) -> None:
        if not output.requires_grad:
            return
        x = inputs[0].detach()

        def on_grad(g: torch.Tensor) -> None:
            if out is None:
                return
            b = g.shape[0]
            gf = g.detach().reshape(b, -1, g.shape[-1]).float()
            xf = x.reshape(b, -1, x.shape[-1]).float()
            roles = owners[module]
            if "weight" in roles:
                out[roles["weight"]][start: start + b] += torch.einsum("bto,bti->boi", gf, xf).reshape(b, -1).cpu()
            if "bias" in roles:
                out[roles["bias"]][start: start + b] += gf.sum(1).cpu()

        output.register_hook(on_grad)

    handles = [m.register_forward_hook(on_forward) for m in owners]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# Per all-reduce of per-example gradient rows: at most this many values (256 MiB of float32).
GATHER_VALUES = 1 << 26


@dataclass
class ProbeGradients:
    """Client and FM gradients over the whole probe set, the same on every rank: the sums over
    examples (float64, summed in example order, so they do not depend on how ranks shared the
    examples) and, per key set, the Gram matrices of the per-example gradients (``aa``: client x
    client, ``bb``: FM x FM, ``ab``: client x FM), from which the bootstrap resamples examples."""
    client: dict[str, torch.Tensor]
    fm: dict[str, torch.Tensor]
    gram: dict[str, dict[str, torch.Tensor]]


def gather_probe_gradients(comm: Communicator, client_rows: dict[str, torch.Tensor],
                           fm_rows: dict[str, torch.Tensor], mine: torch.Tensor, total: int,
                           shapes: dict[str, torch.Size], key_sets: dict[str, list[str]]) -> ProbeGradients:
    """Every rank's per-example rows (``mine``: the probe rows this rank computed) to every rank,
    a block of keys per all-reduce (the others' rows are zeros, so the sums are the rows
    themselves), folded into the sums and Gram matrices as they arrive."""
    keys = sorted(set(client_rows) & set(fm_rows))
    sums_a, sums_b = {}, {}
    gram = {name: {g: torch.zeros(total, total, dtype=torch.float64) for g in ("aa", "bb", "ab")}
            for name in key_sets}
    members = {name: set(ks) for name, ks in key_sets.items()}
    block: list[str] = []
    size = 0
    for i, k in enumerate(keys):
        block.append(k)
        size += total * client_rows[k].shape[1]
        if size < GATHER_VALUES // 2 and i + 1 < len(keys):
            continue
        send = {}
        for key in block:
            for side, rows in (("a", client_rows), ("b", fm_rows)):
                full = torch.zeros(total, rows[key].shape[1])
                full[mine] = rows[key]
                send[f"{side}/{key}"] = full
        got = comm.all_reduce_sum(send, name="fidelity/example_gradients")
        for key in block:
            a, b = got[f"a/{key}"].double(), got[f"b/{key}"].double()
            sums_a[key], sums_b[key] = a.sum(0).view(shapes[key]), b.sum(0).view(shapes[key])
            for name, member in members.items():
                if key in member:
                    gram[name]["aa"] += a @ a.T
                    gram[name]["bb"] += b @ b.T
                    gram[name]["ab"] += a @ b.T
        block, size = [], 0
    return ProbeGradients(sums_a, sums_b, gram)


def bootstrap_cosine(gram: dict[str, torch.Tensor], resamples: int, seed: int,
                     level: float = 0.95) -> tuple[Optional[float], Optional[float]]:
    """Percentile bootstrap interval of the cosine between the summed client and FM gradients, the
    probe examples resampled with replacement: with resample counts w, the cosine of the resampled
    sums is w'G_ab w / sqrt(w'G_aa w * w'G_bb w)."""
    w = _resample_counts(gram["ab"].shape[0], resamples, seed)
    if w is None:
        return None, None
    quad = {k: ((w @ m) * w).sum(1) for k, m in gram.items()}
    ok = (quad["aa"] > 0) & (quad["bb"] > 0)
    return _percentiles(quad["ab"][ok] / (quad["aa"][ok] * quad["bb"][ok]).sqrt(), level)


def example_cosine(gram: dict[str, torch.Tensor], resamples: int, seed: int,
                   level: float = 0.95) -> tuple[Optional[float], Optional[float], Optional[float]]:
    """The mean over probe examples of each example's cosine between its client and FM gradients,
    with its percentile bootstrap interval (the same resamples as :func:`bootstrap_cosine`).
    Examples with a zero gradient on either side are left out. Unlike the cosine of the sums, it
    does not fall when the examples' gradients cancel (an adapter near a minimum of the probe loss)."""
    na, nb = gram["aa"].diagonal(), gram["bb"].diagonal()
    ok = (na > 0) & (nb > 0)
    if not bool(ok.any()):
        return None, None, None
    cos = gram["ab"].diagonal()[ok] / (na[ok] * nb[ok]).sqrt()
    w = _resample_counts(len(cos), resamples, seed)
    if w is None:
        return float(cos.mean()), None, None
    low, high = _percentiles((w @ cos) / len(cos), level)
    return float(cos.mean()), low, high


def _resample_counts(n: int, resamples: int, seed: int) -> Optional[torch.Tensor]:
    """[resamples, n]: how often each of n examples is drawn in each resample (seeded)."""
    if n < 2 or resamples < 1:
        return None
    g = torch.Generator().manual_seed(seed * 7_919 + 29)
    picks = torch.randint(n, (resamples, n), generator=g)
    ones = torch.ones(resamples, n, dtype=torch.float64)
    return torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(1, picks, ones)


def _percentiles(values: torch.Tensor, level: float) -> tuple[Optional[float], Optional[float]]:
    if values.numel() == 0:
        return None, None
    tail = (1 - level) / 2
    low, high = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high


# Resamples of the bootstrap interval (2,000: a common choice for percentile intervals; the ends of
# the interval then vary from seed to seed by a small fraction of its width).
RESAMPLES = 2000


@dataclass
class FidelitySetting:
    """How gradient fidelity is measured: the layers every method trains, the seed of the bootstrap,
    the batch size (the clients': a backward needs the activation memory training needs)."""
    causal: bool
    layer_token: str
    common_layers: Sequence[int] = ()
    seed: int = 0
    resamples: int = RESAMPLES
    batch_size: int = 8


def gradient_fidelity(rt: Runtime, client_model: nn.Module, fm_model: nn.Module, client_adapter: dict,
                      to_fm: Callable[[dict], dict], probe: ClientData, setting: FidelitySetting,
                      sharded_over: Optional[ClientGroups] = None) -> dict:
    """The fidelity of ``client_model``'s adapter gradients against ``fm_model``'s, with
    ``client_adapter`` in the client model and ``to_fm(client_adapter)`` in the FM, over ``probe``
    (every rank calls it with the same probe and computes its share of the examples; the numbers do
    not depend on the number of ranks). ``sharded_over``: the client groups the client model is
    sharded over (its share of the probe is then the group's)."""
    return fidelity_with_fm_gradients(rt, client_model, fm_model, client_adapter, to_fm, probe, setting,
                                      sharded_over=sharded_over)[0]


def fidelity_with_fm_gradients(rt: Runtime, client_model: nn.Module, fm_model: nn.Module, client_adapter: dict,
                               to_fm: Callable[[dict], dict], probe: ClientData, setting: FidelitySetting,
                               fm_rows: Optional[dict] = None, sharded_over: Optional[ClientGroups] = None
                               ) -> tuple[dict, dict]:
    """:func:`gradient_fidelity`, and this rank's per-example FM gradients, so that a caller comparing
    several client models with the same FM and adapter computes the FM side once: given ``fm_rows``
    (what an earlier call returned), the FM is not run again.

    Metrics: ``grad_cosine``, ``grad_rel_error``, ``grad_norm_ratio`` (|g_client| / |g_FM|) over
    every LoRA tensor both have, with a bootstrap 95 % interval of the cosine over probe examples
    (``grad_cosine_low``, ``grad_cosine_high``), the mean per-example cosine with its interval
    (``grad_example_cosine*``); the same over the common layers (``*_common``), per FM layer
    (``*_per_layer``) and for the head (``*_head``)."""
    loss_fn = next_token_loss if setting.causal else classification_loss
    fm_mine = dealt_rows(len(probe), setting.batch_size, rt.rank, rt.world_size)
    mine = fm_mine
    if sharded_over is None:
        client_rows = example_gradients(client_model, client_adapter, probe_rows(probe, mine), loss_fn,
                                        batch_size=setting.batch_size)
    else:
        group_rows = dealt_rows(len(probe), setting.batch_size, sharded_over.index, sharded_over.count)
        client_rows = example_gradients(client_model, client_adapter, probe_rows(probe, group_rows), loss_fn,
                                        sharded_over.comm, setting.batch_size)
        # the group's first rank holds its rows; the others send zeros for them
        mine = group_rows
    shapes = {k: v.shape for k, v in client_adapter.items()}
    client_rows = to_fm(client_rows)
    shapes = to_fm(shapes)
    if any(is_sharded(p) for p in fm_model.parameters()):
        # an FM sharded over the ranks runs every probe example with all of them (each forward and
        # backward a collective); rank 0 holds the gradients, the others zeros
        fm_mine = torch.arange(len(probe))
        if fm_rows is None:
            fm_rows = example_gradients(fm_model, to_fm(client_adapter), probe, loss_fn, rt.comm, setting.batch_size)
    elif fm_rows is None:
        fm_rows = example_gradients(fm_model, to_fm(client_adapter), probe_rows(probe, fm_mine), loss_fn,
                                    batch_size=setting.batch_size)
    keys = sorted(set(client_rows) & set(fm_rows))
    lora = [k for k in keys if any(m in k for m in LORA_MARK)]
    by_layer = lora_by_layer(lora, setting.layer_token)
    key_sets = {"all": lora, "common": [k for l in setting.common_layers for k in by_layer.get(l, [])]}
    got = _gather_both(rt.comm, client_rows, mine, fm_rows, fm_mine, len(probe), shapes, key_sets)
    out = compare(got.client, got.fm, setting.layer_token, setting.common_layers)
    for name, suffix in (("all", ""), ("common", "_common")):
        if name == "common" and not setting.common_layers:
            continue
        gram, seed, n = got.gram[name], setting.seed, setting.resamples
        low, high = bootstrap_cosine(gram, n, seed) if key_sets[name] else (None, None)
        out[f"grad_cosine{suffix}_low"], out[f"grad_cosine{suffix}_high"] = low, high
        mean, low, high = example_cosine(gram, n, seed) if key_sets[name] else (None, None, None)
        out[f"grad_example_cosine{suffix}"] = mean
        out[f"grad_example_cosine{suffix}_low"], out[f"grad_example_cosine{suffix}_high"] = low, high
    out["grad_probe_examples"] = len(probe)
    return out, fm_rows


def _gather_both(comm: Communicator, client_rows: dict, client_mine: torch.Tensor, fm_rows: dict,
                 fm_mine: torch.Tensor, total: int, shapes: dict, key_sets: dict) -> ProbeGradients:
    """gather_probe_gradients when the client's rows and the FM's were shared out differently (a
    sharded client model computes the rows of its group)."""
    if torch.equal(client_mine, fm_mine):
        return gather_probe_gradients(comm, client_rows, fm_rows, client_mine, total, shapes, key_sets)
    placed = {}
    for k, rows in fm_rows.items():
        full = torch.zeros(total, rows.shape[1])
        full[fm_mine] = rows
        placed[k] = full
    fm_full = comm.all_reduce_sum(placed, name="fidelity/fm_example_gradients")
    client_full = {}
    for k, rows in client_rows.items():
        full = torch.zeros(total, rows.shape[1])
        full[client_mine] = rows
        client_full[k] = full
    # every rank now holds the FM's rows; the client's still need summing over ranks: rank 0 adds the FM's
    everything = torch.arange(total)
    zero = {k: torch.zeros_like(v) for k, v in fm_full.items()}
    return gather_probe_gradients(comm, client_full, fm_full if comm.rank == 0 else zero, everything, total,
                                  shapes, key_sets)

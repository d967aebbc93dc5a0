"""The federated engine (Stage 3 and DESIGN §3): every rank hosts virtual clients; one all-reduce of a
flat buffer per round aggregates their adapters; the FM with the global adapter is evaluated on a
test set sharded over ranks; every ``align_every`` rounds the proxy is re-aligned with the FM by
neuron-level distillation over all ranks. Every rank runs this same loop and calls the same
collectives in the same order; shared decisions are pure functions of (seed, round).

Two tasks (``model.task``, auto = causal-lm for decoder families): sequence classification (labels,
accuracy and macro-F1) and causal-LM fine-tuning (next-token loss; perplexity and next-token accuracy).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..alignment import zero
from ..alignment.distill import ffn_parameter_names, plan_neuron_split
from ..alignment.job import DistillSettings, run_distillation
from ..checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ..config import Config, write_resolved_config
from ..errors import ConfigError, UserError
from ..fsutil import atomic_write_json
from ..models.emulator import adapter_to_fm
from ..models.families import layers_prefix, transformer_layers
from ..models.loading import default_task, load_model, load_tokenizer, resolve_model_dir
from ..models.proxy import ActivationRecorder, count_params, load_proxy, read_proxy_meta
from ..runtime import Runtime, init_from_config
from .adapters import (adapter_bytes, full_width_layers, get_adapter, is_finite, merge_lora_into, set_adapter,
                       with_lora)
from .client import (ClientData, accuracy_and_macro_f1, confusion_counts, next_token_eval, perplexity_and_accuracy,
                     predict, train_client)
from .sampling import assign_to_ranks, client_seed, clients_per_round, round_lr, sample_clients

log = logging.getLogger(__name__)

PROXY_METHODS = ("fedpft", "fedpft_no_layer_distill", "fedpft_no_neuron_distill")
ROUND_PREFIX = "round-"
CAUSAL_LM = "causal-lm"
CLASSIFICATION = "sequence-classification"


def resolve_task(cfg: Config, fm_dir: Path) -> str:
    """What the clients fine-tune: model.task, with auto = causal-lm for decoder families and
    sequence-classification for the others."""
    if cfg.model.task == "base":
        raise ConfigError("model.task", "federated training needs a task: causal-lm, sequence-classification or auto")
    if cfg.model.task == "auto":
        return CAUSAL_LM if default_task(fm_dir) == CAUSAL_LM else CLASSIFICATION
    return cfg.model.task


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------

@dataclass
class Task:
    """Tokenised train and test sets and the clients' shares of the train set. A causal-LM task has
    no labels (``train_labels``/``test_labels`` None, no ``label_names``): the tokens are the targets."""
    train_ids: torch.Tensor
    train_mask: torch.Tensor
    train_labels: Optional[torch.Tensor]
    test_ids: torch.Tensor
    test_mask: torch.Tensor
    test_labels: Optional[torch.Tensor]
    label_names: list[str]
    parts: list[list[int]]
    train_types: Optional[torch.Tensor] = None  # segment ids of sentence pairs
    test_types: Optional[torch.Tensor] = None
    kind: str = CLASSIFICATION

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def causal_lm(self) -> bool:
        return self.kind == CAUSAL_LM

    def client(self, c: int) -> ClientData:
        idx = torch.as_tensor(self.parts[c], dtype=torch.long)
        types = self.train_types[idx] if self.train_types is not None else None
        labels = self.train_labels[idx] if self.train_labels is not None else None
        return ClientData(self.train_ids[idx], self.train_mask[idx], labels, types)


def _subset(indices: list[int], limit: int, seed: int) -> list[int]:
    if not limit or len(indices) <= limit:
        return indices
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(indices), generator=g)[:limit]
    return sorted(indices[i] for i in pick.tolist())


def _expand(path: str, key: str) -> str:
    """``$VAR`` / ``~`` in a data path (cluster configs name their data roots by variables)."""
    out = os.path.expanduser(os.path.expandvars(path))
    if "$" in out:
        raise UserError(f"{key}: {path} names an environment variable that is not set")
    return out


def prepare_task(cfg: Config, tokenizer, kind: Optional[str] = None) -> Task:
    """The clients' data for ``kind`` (default: the task ``cfg`` resolves to)."""
    kind = kind or resolve_task(cfg, resolve_model_dir(cfg.model.path))
    if kind == CAUSAL_LM:
        return prepare_lm_task(cfg, tokenizer)
    return prepare_classification_task(cfg, tokenizer)


def prepare_classification_task(cfg: Config, tokenizer) -> Task:
    """Labelled data, a seeded stratified train/test split, tokenisation (cached), client partition."""
    from ..data.labelled import load_labelled, tokenize_cached, train_test_split
    from ..data.partition import partition
    from ..data.public import BUILTIN
    from ..models.loading import cache_dir

    d, f = cfg.data, cfg.fed
    if d.dataset == BUILTIN:
        raise ConfigError("data.dataset", f"'{BUILTIN}' is unlabelled text, for causal-LM fine-tuning "
                                          f"(model.task=causal-lm with a decoder model)")
    data = load_labelled(_expand(d.dataset, "data.dataset"), d.text_column, d.label_column, d.text_pair_column)
    if d.test_file:
        test_data = load_labelled(_expand(d.test_file, "data.test_file"), d.text_column, d.label_column,
                                  d.text_pair_column)
        if test_data.label_names != data.label_names:
            raise UserError(f"data.test_file: labels {test_data.label_names} differ from data.dataset's "
                            f"{data.label_names}")
        train_idx, test_idx = list(range(len(data.labels))), list(range(len(test_data.labels)))
    else:
        test_data = data
        train_idx, test_idx = train_test_split(len(data.labels), d.test_fraction, cfg.run.seed, data.labels)
    train_idx = _subset(train_idx, d.max_train, cfg.run.seed + 1)
    test_idx = _subset(test_idx, d.max_test, cfg.run.seed + 2)
    if f.num_clients > len(train_idx):
        raise ConfigError("fed.num_clients", f"{f.num_clients} clients but only {len(train_idx)} training examples")
    cache = d.cache_dir or str(cache_dir() / "tokens")

    def tokens(source, idx):
        pairs = [source.text_pairs[i] for i in idx] if source.text_pairs is not None else None
        return tokenize_cached(tokenizer, [source.texts[i] for i in idx], d.max_length, cache, pairs)

    train, test = tokens(data, train_idx), tokens(test_data, test_idx)
    train_labels = torch.tensor([data.labels[i] for i in train_idx], dtype=torch.long)
    test_labels = torch.tensor([test_data.labels[i] for i in test_idx], dtype=torch.long)
    parts = partition(train_labels.tolist(), f.num_clients, f.partition, cfg.run.seed, alpha=f.alpha,
                      k=f.labels_per_client, size_sigma=f.size_sigma)
    return Task(train["input_ids"], train["attention_mask"], train_labels, test["input_ids"],
                test["attention_mask"], test_labels, list(data.label_names), parts,
                train.get("token_type_ids"), test.get("token_type_ids"))


def prepare_lm_task(cfg: Config, tokenizer) -> Task:
    """Text for next-token training: documents split into train and test by a seeded permutation
    (before they become examples, so no document feeds both), examples (packed chunks of prose or one
    row per text; :mod:`fedpft_dist.data.lm`), seeded subsets, and an IID split over clients. When the
    clients' corpus is the public text's, only its held-out documents are used."""
    from ..data.labelled import train_test_split
    from ..data.lm import LMText, check_examples, lm_examples, load_lm_text
    from ..data.partition import partition
    from ..models.loading import cache_dir

    d, f, p = cfg.data, cfg.fed, cfg.public_text
    if d.text_pair_column:
        raise ConfigError("data.text_pair_column", "sentence pairs are for sequence classification; next-token "
                                                   "training reads single texts")
    if f.partition != "iid":
        raise ConfigError("fed.partition", f"{f.partition!r} splits by label and next-token training has no "
                                           f"labels: use iid (optionally with fed.size_sigma)")
    cache = d.cache_dir or str(cache_dir() / "tokens")

    def text(key: str, source: str) -> LMText:
        try:
            return load_lm_text(_expand(source, key), d.text_column, p.source, p.held_out_fraction, cfg.run.seed)
        except ConfigError:
            raise
        except UserError as exc:  # the loaders speak of "public text"; say which key it came from
            raise UserError(f"{key}: {exc}") from None

    data = text("data.dataset", d.dataset)
    if d.test_file:
        train_text, test_text, test_key = data, text("data.test_file", d.test_file), "data.test_file"
    else:
        train_idx, test_idx = train_test_split(len(data.docs), d.test_fraction, cfg.run.seed)
        train_text = LMText([data.docs[i] for i in train_idx], data.packed, data.source, data.public_held_out)
        test_text = LMText([data.docs[i] for i in test_idx], data.packed, data.source, data.public_held_out)
        test_key = "data.test_fraction"
    train = lm_examples(tokenizer, train_text, d.max_length, cache)
    test = lm_examples(tokenizer, test_text, d.max_length, cache)
    check_examples(train, "data.dataset", d.dataset, d.max_length)
    check_examples(test, test_key, d.test_file or d.dataset, d.max_length)
    train_idx = torch.as_tensor(_subset(list(range(len(train["input_ids"]))), d.max_train, cfg.run.seed + 1))
    test_idx = torch.as_tensor(_subset(list(range(len(test["input_ids"]))), d.max_test, cfg.run.seed + 2))
    if f.num_clients > len(train_idx):
        raise ConfigError("fed.num_clients", f"{f.num_clients} clients but only {len(train_idx)} training examples")
    # IID needs only the number of examples; the "labels" it is given carry no meaning.
    parts = partition([0] * len(train_idx), f.num_clients, "iid", cfg.run.seed, size_sigma=f.size_sigma)
    return Task(train["input_ids"][train_idx], train["attention_mask"][train_idx], None,
                test["input_ids"][test_idx], test["attention_mask"][test_idx], None, [], parts, kind=CAUSAL_LM)


# ----------------------------------------------------------------------------------------------------
# Models per method
# ----------------------------------------------------------------------------------------------------

@dataclass
class Models:
    client: nn.Module               # peft model the clients train (proxy or FM)
    evaluate: nn.Module             # peft model on the FM, for plug-in evaluation
    proxy_dir: Optional[Path]       # proxy methods: the proxy the clients start from
    compressed_layers: list[int]
    client_params: int              # transformer + head parameters a client holds
    fm_params: int
    client_nonembedding_params: int = 0
    to_fm: Callable[[dict], dict] = lambda adapter: adapter  # client adapter -> FM module names


def _proxy_for(cfg: Config, rt: Runtime) -> Path:
    """The proxy a method's clients use: built (and distilled) once, reused on resume."""
    from ..commands.distill import distill_proxy, ensure_proxy

    if cfg.fed.method == "fedpft_no_layer_distill":
        return ensure_proxy(cfg, rt)
    emulator = cfg.fed.method == "fedot"
    if emulator:
        distilled = Path(cfg.run.dir) / "emulator_distilled"
    else:
        distilled = Path(cfg.distill.out or Path(cfg.run.dir) / "proxy_distilled")
    if (distilled / "config.json").exists():
        return distilled
    return distill_proxy(cfg, rt, emulator=emulator)


def non_embedding_params(model: nn.Module) -> int:
    """Parameters outside embedding tables: the ones every token's compute touches."""
    emb = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in emb)


def _checkpointing(model: nn.Module, on: bool) -> None:
    """Per-layer gradient checkpointing in training mode (evaluation never stores activations).
    Non-reentrant: the frozen embeddings' outputs need not require grad, and dropout masks repeat."""
    if on:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def build_models(cfg: Config, rt: Runtime, num_labels: int, fm_dir: Path, task: str = CLASSIFICATION) -> Models:
    """The clients' peft model and the FM's (for plug-in evaluation) for ``fed.method`` and ``task``.
    Every rank loads the whole FM: evaluation runs on it, unpartitioned."""
    f = cfg.fed
    lora = (f.lora_r, f.lora_alpha, f.lora_dropout)
    torch.manual_seed(cfg.run.seed)  # the head's initialisation is part of the shared starting point
    fm = load_model(fm_dir, task, cfg.model.dtype, num_labels=num_labels).to(rt.device)
    fm_params = count_params(fm)
    ffn = f.lora_targets == "attention+ffn"
    if f.method == "fedpetuning":
        nonemb = non_embedding_params(fm)
        _checkpointing(fm, f.gradient_checkpointing)
        every_layer = list(range(len(transformer_layers(fm)))) if ffn else []
        model = with_lora(fm, *lora, task=task, ffn_layers=every_layer)
        return Models(model, model, None, [], fm_params, fm_params, nonemb)
    if f.method not in (*PROXY_METHODS, "fedot"):
        raise ConfigError("fed.method", f"{f.method!r} is not available")
    proxy_dir = _proxy_for(cfg, rt)
    meta = read_proxy_meta(proxy_dir)
    torch.manual_seed(cfg.run.seed)
    proxy, _ = load_proxy(proxy_dir, task=task, dtype=cfg.model.dtype, num_labels=num_labels)
    proxy = proxy.to(rt.device)
    _checkpointing(proxy, f.gradient_checkpointing)
    client_params, nonemb = count_params(proxy), non_embedding_params(proxy)
    layer_map = meta.get("layer_map")
    client_ffn: list[int] = []
    if ffn:
        # A proxy's compressed layers are narrower than the FM's (and alignment rewrites them), so
        # FFN LoRA goes on the layers the client holds whole: LoRA on W_gate/W_up/W_down there has
        # the FM's shapes and plugs in as it is.
        aligned = meta["compressed_layers"] if f.method in PROXY_METHODS else []
        client_ffn = full_width_layers(proxy, fm, layer_map, exclude=aligned)
        if not client_ffn:
            raise ConfigError("fed.lora_targets", "no layer of the client model keeps the FM's whole FFN "
                                                  "(proxy.retained_layers is empty), so no FFN LoRA would fit the FM")
    fm_ffn = [layer_map[j] for j in client_ffn] if layer_map is not None else client_ffn
    client = with_lora(proxy, *lora, task=task, ffn_layers=client_ffn)
    evaluate = with_lora(fm, *lora, task=task, ffn_layers=fm_ffn)
    models = Models(client, evaluate, proxy_dir, list(meta["compressed_layers"]), client_params, fm_params,
                    nonemb)
    if "layer_map" in meta:  # FedOT's emulator numbers its layers differently from the FM
        token = layers_prefix(proxy)
        models.to_fm = lambda adapter: adapter_to_fm(adapter, meta["layer_map"], token)
    return models


# ----------------------------------------------------------------------------------------------------
# Phases
# ----------------------------------------------------------------------------------------------------

def evaluate(rt: Runtime, model: nn.Module, task: Task, batch_size: int) -> dict:
    """``model`` on the test set, sharded over ranks (rank r takes rows r, r+W, ...), with one
    all-reduce of sums: accuracy and macro-F1 from per-class counts (classification), or mean
    next-token loss, perplexity and next-token accuracy from (loss sum, correct, targets) (causal LM).
    Sums first, divisions after: the result does not depend on the number of ranks."""
    idx = torch.arange(rt.rank, len(task.test_ids), rt.world_size)
    if task.causal_lm:
        sums = next_token_eval(model, task.test_ids[idx], task.test_mask[idx], batch_size, rt.device)
        sums = rt.comm.all_reduce_sum({"sums": sums}, name="evaluate/next-token")["sums"]
        loss, ppl, acc = perplexity_and_accuracy(sums)
        return {"test_loss": loss, "perplexity": ppl, "next_token_accuracy": acc, "test_tokens": int(sums[2]),
                "test_examples": len(task.test_ids)}
    types = task.test_types[idx] if task.test_types is not None else None
    preds = predict(model, task.test_ids[idx], task.test_mask[idx], batch_size, rt.device, types)
    counts = confusion_counts(preds, task.test_labels[idx], task.num_classes)
    counts = rt.comm.all_reduce_sum(counts, name="evaluate/counts")
    acc, f1 = accuracy_and_macro_f1(counts)
    return {"accuracy": acc, "macro_f1": f1, "test_examples": int((counts["tp"] + counts["fn"]).sum())}


def align(cfg: Config, rt: Runtime, models: Models, fm_dir: Path, global_adapter: dict, stats: dict,
          public: tuple[torch.Tensor, torch.Tensor], round_idx: int) -> dict:
    """Neuron-level distillation on all ranks: rank neurons by activity on client data, freeze the
    most active ``align_keep`` share, distil the rest against the FM (the global adapter merged into
    both), and load the new FFN weights into this rank's proxy."""
    f = cfg.fed
    hf_client = models.client.get_base_model()
    prefix = hf_client.base_model_prefix
    scaling = f.lora_alpha / f.lora_r
    gen = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + round_idx)
    splits = []
    for l in models.compressed_layers:
        s = stats[l]
        activity = s.mean_abs() if f.align_score == "mean_abs" else 1.0 - s.apoz()
        splits.append(plan_neuron_split(activity, f.align_keep, gen, l))

    def load_teacher() -> nn.Module:
        teacher = load_model(fm_dir, "base", cfg.model.dtype)
        merge_lora_into(teacher, global_adapter, scaling, gather=lambda ps: zero.gathered(ps, modifier_rank=0),
                        strip=[prefix])
        return teacher

    student, _ = load_proxy(models.proxy_dir, task="base", dtype=cfg.model.dtype)
    names = set(ffn_parameter_names(student, models.compressed_layers))
    current = {k: v for k, v in hf_client.base_model.state_dict().items() if k in names}
    student.load_state_dict(current, strict=False)
    merge_lora_into(student, global_adapter, scaling, strip=[prefix])
    d = cfg.distill
    settings = DistillSettings(zero_stage=d.zero_stage, batch_size=d.batch_size, micro_batch=d.micro_batch, steps=f.align_steps,
                               epoch_fraction=f.align_fraction, lr=d.lr, warmup_ratio=d.warmup_ratio,
                               weight_decay=d.weight_decay, grad_clip=d.grad_clip, alpha=d.alpha,
                               seed=cfg.run.seed * 7919 + round_idx, eval_batch=cfg.proxy.batch_size,
                               progress=False, tag=f"align/round-{round_idx + 1}")
    result = run_distillation(rt, load_teacher, student, models.compressed_layers, public[0], public[1],
                              settings, splits)
    hf_client.base_model.load_state_dict(result.ffn_state, strict=False)
    return {"align_steps": result.steps, "align_loss_first": result.losses[0], "align_loss_last": result.losses[-1],
            "align_error_before": sum(result.errors_before) / len(result.errors_before),
            "align_error_after": sum(result.errors_after) / len(result.errors_after),
            "align_ffn_bytes": sum(v.numel() * 4 for v in result.ffn_state.values())}


# ----------------------------------------------------------------------------------------------------
# The round loop
# ----------------------------------------------------------------------------------------------------

@dataclass
class Probe:
    """What a benchmark needs from a run: with ``sync`` a barrier before aggregation, so the
    all-reduce is timed without the wait for the slowest rank (the wait is timed on its own); this
    rank's timings of every round; and, at the end, the live objects (``state``) for measurements
    of its own on the same models and data."""
    sync: bool = True
    rounds: list[dict] = field(default_factory=list)
    state: dict = field(default_factory=dict)


def run_federated(cfg: Config) -> dict:
    rt = init_from_config(cfg)
    try:
        return _run(cfg, rt)
    finally:
        rt.shutdown()


def _run(cfg: Config, rt: Runtime, probe: Optional[Probe] = None) -> dict:
    f = cfg.fed
    run_dir = Path(cfg.run.dir)
    t_start = time.perf_counter()
    if rt.is_main:
        write_resolved_config(cfg)
    fm_dir = resolve_model_dir(cfg.model.path)
    kind = resolve_task(cfg, fm_dir)
    tokenizer = load_tokenizer(fm_dir)
    task = prepare_task(cfg, tokenizer, kind)
    models = build_models(cfg, rt, task.num_classes, fm_dir, kind)
    # The headline metric: accuracy (higher is better) or perplexity (lower is better).
    primary = "perplexity" if task.causal_lm else "accuracy"
    better = min if task.causal_lm else max
    hf_client = models.client.get_base_model()
    aligning = f.method in ("fedpft", "fedpft_no_layer_distill") and f.align_every > 0
    public = None
    if aligning:
        from ..commands.proxy import public_chunks

        public = (public_chunks(cfg, tokenizer, "train", cfg.distill.max_chunks),
                  public_chunks(cfg, tokenizer, "held_out", cfg.distill.eval_chunks))

    # The starting adapter: rank 0's, so every rank begins from the same tensors.
    global_adapter = rt.comm.broadcast_state(get_adapter(models.client) if rt.is_main else None,
                                             name="broadcast/initial-adapter")
    global_adapter = {k: v.cpu() for k, v in global_adapter.items()}
    up_bytes = adapter_bytes(global_adapter)
    k_round = clients_per_round(f.num_clients, f.client_fraction)
    mean_tokens = float(task.train_mask.sum()) / max(1, len(task.train_ids))
    cost = [float(task.train_mask[torch.as_tensor(p, dtype=torch.long)].sum()) * f.local_epochs for p in task.parts]

    start, best, history, initial = 0, None, [], {}
    align_rounds, ffn_bytes, excluded_total = 0, 0, 0
    ckpt_root = run_dir / "checkpoints" / "rounds"
    if f.resume:
        ckpt = latest_checkpoint(ckpt_root, ROUND_PREFIX)
        if ckpt is not None:
            tensors, meta = load_checkpoint(ckpt)
            if meta["method"] != f.method or meta["seed"] != cfg.run.seed:
                raise UserError(f"fed.resume: checkpoint {ckpt} is of method {meta['method']}, seed {meta['seed']}")
            global_adapter = tensors["adapter"]
            if "proxy_ffn" in tensors:
                hf_client.base_model.load_state_dict(tensors["proxy_ffn"], strict=False)
            start, best, initial = meta["round"], meta.get(f"best_{primary}"), meta.get("initial_eval", {})
            align_rounds, ffn_bytes, excluded_total = (meta["alignment_rounds"], meta["ffn_bytes_per_alignment"],
                                                       meta["excluded_clients"])
            log.info("resumed from %s: continuing at round %d", ckpt, start + 1)
    metrics_path = run_dir / "metrics.jsonl"
    if rt.is_main:
        kept = []
        if start and metrics_path.exists():
            kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["round"] <= start]
        metrics_path.write_text("".join(line + "\n" for line in kept))
        history = [json.loads(line) for line in kept]

    phase = {"local_training": 0.0, "aggregation": 0.0, "alignment": 0.0, "evaluation": 0.0}
    bar = None
    if rt.is_main:
        from tqdm import tqdm

        bar = tqdm(total=f.rounds, initial=start, desc=f"{f.method} rounds", unit="round", dynamic_ncols=True)
    last_eval: dict = {}
    if f.eval_initial and start == 0:
        # The starting adapter changes nothing (LoRA B = 0; a classifier's head is fresh): the FM as it is.
        t0 = time.perf_counter()
        set_adapter(models.evaluate, models.to_fm(global_adapter))
        initial = {f"initial_{k}": v for k, v in evaluate(rt, models.evaluate, task, f.eval_batch_size).items()}
        phase["evaluation"] += time.perf_counter() - t0
    for t in range(start, f.rounds):
        t_round = time.perf_counter()
        seconds: dict[str, float] = {}
        # -- sample the round's clients and share them out (same on every rank) -------------------
        sampled = sample_clients(f.num_clients, k_round, cfg.run.seed, t)
        mine = assign_to_ranks(sampled, [cost[c] for c in sampled], rt.world_size)[rt.rank]
        lr = round_lr(f.lr, f.lr_schedule, t, f.rounds)
        align_now = aligning and (t + 1) % f.align_every == 0

        # -- local training ------------------------------------------------------------------------
        t0 = time.perf_counter()
        recorder = ActivationRecorder(hf_client, models.compressed_layers, cfg.proxy.eps) if align_now else None
        # Sums in float64: the result then does not depend on how clients are split over ranks
        # (fp32 partial sums in a different order would differ in the last bits).
        sums = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_adapter.items()}
        weight = excluded = loss_sum = loss_count = tokens = 0.0
        inner = None
        if bar is not None and len(mine) > 1:
            from tqdm import tqdm

            inner = tqdm(total=len(mine), desc=f"round {t + 1} clients (rank 0)", leave=False, dynamic_ncols=True)
        for c in mine:
            upd = train_client(models.client, global_adapter, task.client(c), f.local_epochs, f.batch_size, lr,
                               f.weight_decay, client_seed(cfg.run.seed, t, c), recorder)
            if inner is not None:
                inner.update(1)
            if not is_finite(upd.adapter):
                excluded += 1
                continue
            w = float(upd.num_samples) if f.aggregation == "weighted" else 1.0
            for k, v in upd.adapter.items():
                sums[k] += w * v.double().cpu()
            weight += w
            loss_sum += upd.loss_sum
            loss_count += upd.loss_count
            tokens += upd.tokens
        if inner is not None:
            inner.close()
        if recorder is not None:
            recorder.close()
        seconds["local_training"] = time.perf_counter() - t0
        phase["local_training"] += seconds["local_training"]

        # -- aggregate: one all-reduce of sum(w_c * theta_c) and sum(w_c) -------------------------
        t0 = time.perf_counter()
        if probe is not None and probe.sync:
            rt.comm.barrier(name="aggregate/wait-for-ranks")
            seconds["wait"] = time.perf_counter() - t0
        all_finite = rt.comm.agree(excluded == 0, "min", name="aggregate/finite")
        payload = {f"adapter/{k}": v for k, v in sums.items()}
        payload["meta/stats"] = torch.tensor([weight, excluded, loss_sum, loss_count], dtype=torch.float64)
        # Every rank's local training time and tokens, in its own slot (the others send zeros):
        # rank 0 learns the load balance of the round from the same collective.
        per_rank = torch.zeros(2, rt.world_size, dtype=torch.float64)
        per_rank[:, rt.rank] = torch.tensor([seconds["local_training"], tokens])
        payload["meta/per_rank"] = per_rank
        t1 = time.perf_counter()
        red = rt.comm.all_reduce_sum(payload, name="aggregate/adapter")
        seconds["allreduce"] = time.perf_counter() - t1
        # train_loss: mean over examples (classification) or next-token targets (causal LM)
        total_w, n_excluded, total_loss, total_count = red["meta/stats"].tolist()
        rank_seconds, rank_tokens = red["meta/per_rank"].tolist()
        if total_w > 0:
            # theta = sum_c w_c theta_c / sum_c w_c (w_c = client samples, or 1 for uniform)
            global_adapter = {k: (red[f"adapter/{k}"] / total_w).to(v.dtype) for k, v in global_adapter.items()}
        excluded_total += int(n_excluded)
        seconds["aggregation"] = time.perf_counter() - t0
        phase["aggregation"] += seconds["aggregation"]
        row = {"round": t + 1, "lr": lr, "clients": len(sampled), "excluded_clients": int(n_excluded),
               "all_updates_finite": all_finite, "train_loss": total_loss / max(1.0, total_count),
               "local_seconds_per_rank": [round(x, 4) for x in rank_seconds],
               "tokens_per_rank": [int(x) for x in rank_tokens],
               "aggregation_bytes": sum(v.numel() * v.element_size() for v in payload.values())}

        # -- neuron-level alignment -----------------------------------------------------------------
        if align_now:
            t0 = time.perf_counter()
            flat = {f"layer{l}": recorder.stats[l].to_flat() for l in models.compressed_layers}
            flat = rt.comm.all_reduce_sum(flat, name="aggregate/activations")
            from fedpft_kernels import ActivationStats

            stats = {l: ActivationStats.from_flat(flat[f"layer{l}"]) for l in models.compressed_layers}
            row.update(align(cfg, rt, models, fm_dir, global_adapter, stats, public, t))
            align_rounds += 1
            ffn_bytes = row["align_ffn_bytes"]
            seconds["alignment"] = time.perf_counter() - t0
            phase["alignment"] += seconds["alignment"]

        # -- plug into the FM and evaluate ----------------------------------------------------------
        if (t + 1) % f.eval_every == 0 or t + 1 == f.rounds:
            t0 = time.perf_counter()
            set_adapter(models.evaluate, models.to_fm(global_adapter))
            last_eval = evaluate(rt, models.evaluate, task, f.eval_batch_size)
            row.update(last_eval)
            best = last_eval[primary] if best is None else better(best, last_eval[primary])
            seconds["evaluation"] = time.perf_counter() - t0
            phase["evaluation"] += seconds["evaluation"]
        seconds["round"] = time.perf_counter() - t_round
        row["seconds"] = {k: round(v, 4) for k, v in seconds.items()}
        if probe is not None:
            probe.rounds.append({"round": t + 1, "clients": len(mine), "tokens": tokens,
                                 "aggregation_bytes": row["aggregation_bytes"], **seconds})

        # -- metrics and checkpoint -----------------------------------------------------------------
        if rt.is_main:
            history.append(row)
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            bar.set_postfix({k: f"{row[k]:.4f}" for k in ("train_loss", primary) if k in row})
            bar.update(1)
        stopping = f.stop_after > 0 and t + 1 - start >= f.stop_after and t + 1 < f.rounds
        if stopping or (f.checkpoint_every and (t + 1) % f.checkpoint_every == 0 and t + 1 < f.rounds):
            if rt.is_main:
                tensors = {"adapter": global_adapter}
                if models.proxy_dir is not None:
                    names = set(ffn_parameter_names(hf_client.base_model, models.compressed_layers))
                    tensors["proxy_ffn"] = {k: v for k, v in hf_client.base_model.state_dict().items() if k in names}
                save_checkpoint(ckpt_root, f"{ROUND_PREFIX}{t + 1:06d}", tensors,
                                {"round": t + 1, "method": f.method, "seed": cfg.run.seed,
                                 "world_size": rt.world_size, f"best_{primary}": best, "initial_eval": initial,
                                 "alignment_rounds": align_rounds, "ffn_bytes_per_alignment": ffn_bytes,
                                 "excluded_clients": excluded_total})
            rt.comm.barrier(name="checkpoint/round")
        if stopping:
            if bar is not None:
                bar.close()
            log.info("stopping after round %d as fed.stop_after asks; resume with fed.resume=true", t + 1)
            return {"method": f.method, "rounds_done": t + 1, "rounds": f.rounds, "stopped_early": True,
                    "world_size": rt.world_size}
    if bar is not None:
        bar.close()

    # -- outputs --------------------------------------------------------------------------------------
    phase = rt.comm.all_reduce_metrics(phase, op="max", name="summary/phase-seconds")
    summary = {
        "method": f.method, "task": task.kind, "rounds": f.rounds, "world_size": rt.world_size,
        "num_clients": f.num_clients, "clients_per_round": k_round, "dataset": cfg.data.dataset,
        "partition": f.partition, "lora_targets": f.lora_targets,
        # Classification keys stay None for a causal LM: next-token accuracy is not a class accuracy.
        "final_accuracy": last_eval.get("accuracy"), "best_accuracy": None if task.causal_lm else best,
        "final_macro_f1": last_eval.get("macro_f1"),
        "excluded_clients": excluded_total, "phase_seconds": phase,
        "bytes_up_per_client": up_bytes,
        "bytes_down_per_client": up_bytes + (ffn_bytes * align_rounds / f.rounds if align_rounds else 0),
        "ffn_bytes_per_alignment": ffn_bytes, "alignment_rounds": align_rounds,
        "client_params": models.client_params, "fm_params": models.fm_params,
        # ~6 FLOPs per non-embedding parameter per token for a training step (forward + backward)
        "client_train_flops_per_example": 6 * models.client_nonembedding_params * mean_tokens,
        "wall_seconds": time.perf_counter() - t_start,
        **initial,
    }
    if task.causal_lm:
        summary.update({"final_perplexity": last_eval.get("perplexity"), "best_perplexity": best,
                        "final_next_token_accuracy": last_eval.get("next_token_accuracy"),
                        "final_test_loss": last_eval.get("test_loss")})
    if probe is not None:
        probe.state = {"models": models, "task": task, "adapter": global_adapter}
    if rt.is_main:
        set_adapter(models.evaluate, models.to_fm(global_adapter))
        models.evaluate.save_pretrained(str(run_dir / "adapter"))
        atomic_write_json(run_dir / "summary.json", summary)
    rt.comm.barrier(name="summary/written")
    return summary

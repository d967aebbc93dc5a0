"""One tree of dataclasses for every setting, read from strict YAML plus ``dotted.key=value`` overrides.

Rules:
- a file may start from another: ``extends: base.yaml`` (relative to the file's directory) reads that
  file first, then the file's keys override its keys one by one; bases may extend further;
- an unknown key is an error that names the dotted key and suggests the nearest valid one;
- a value of the wrong type or out of range is an error that names the key and the value;
- the resolved config is written next to the results (``run.dir/config.yaml``).

Each section is a dataclass; a field's range lives in its metadata (``ge``, ``gt``, ``le``, ``lt``) and
cross-field rules in the section's ``check`` method. The metadata also says which reused artifacts a
key shapes (``shapes``, names in :data:`ARTIFACTS`) and whether it shapes a federated run's checkpoints
(``run``, default: the section's): :mod:`fedpft_dist.fingerprint` builds its fingerprints from these.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError, UserError
from .fsutil import atomic_write_text


# The artifacts a run reuses when their fingerprints match: a proxy (any saliency), what a proxy ranked
# by activations (proxy.saliency mean_abs or apoz) also depends on, FedOT's emulator, and a layer-level
# distillation of either.
ARTIFACTS = ("proxy", "proxy_activation", "emulator", "distill")
BOUNDS = ("ge", "gt", "le", "lt")


def _opt(default: Any, *, help: str, ge: float | None = None, gt: float | None = None,
         le: float | None = None, lt: float | None = None, shapes: tuple[str, ...] = (),
         run: bool | None = None) -> Any:
    """A config field with its documentation, numeric bounds, the artifacts whose fingerprint holds it
    and whether a federated run's fingerprint does (None: as its section says)."""
    unknown = set(shapes) - set(ARTIFACTS)
    if unknown:
        raise ValueError(f"unknown artifacts {sorted(unknown)}; known: {', '.join(ARTIFACTS)}")
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "shapes": tuple(shapes), "run": run}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _section(cls: type, *, run: bool) -> Any:
    """A section of :class:`Config`; ``run``: whether its keys shape a federated run's checkpoints
    unless a key says otherwise."""
    return field(default_factory=cls, metadata={"run": run})


# ----------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------

@dataclass
class RunConfig:
    """Where the run writes its outputs, its seed, logging and metrics trackers."""

    dir: str = _opt("runs/default", help="output directory of this run (config, logs, results)")
    seed: int = _opt(0, help="global seed: the same seed and world size give the same numbers", ge=0,
                     shapes=("proxy_activation", "distill"), run=True)
    log_level: Literal["debug", "info", "warning", "error"] = _opt("info", help="log level on rank 0")
    rebuild: bool = _opt(False, help="start afresh in a run dir an earlier run used: remake a proxy, emulator or "
                                     "distilled proxy that was made with other settings, and move an earlier run's "
                                     "checkpoints aside (to <dir>.stale-<UTC time>); default: stop with an error "
                                     "naming the setting that differs")
    report_to: list[Literal["jsonl", "tensorboard", "wandb"]] = _opt(
        ["jsonl"], help="where rank 0 writes each round's metrics row, with the round as the step: jsonl "
                        "(<dir>/metrics.jsonl, always written, listed or not), tensorboard (event files in "
                        "<dir>/tensorboard; needs the tensorboard package), wandb (a Weights & Biases run in "
                        "<dir>/wandb; needs the wandb package)")
    wandb_mode: Literal["offline", "online", "disabled"] = _opt(
        "offline", help="wandb in report_to: offline (files only, no network; upload later with `wandb sync "
                        "<dir>/wandb/offline-run-*`), online (needs a W&B login), or disabled")
    wandb_project: str = _opt("fedpft", help="wandb in report_to: the W&B project of the run (named after the "
                                             "run dir)")
    exact_memory: bool = _opt(False, help="on the CPU (glibc), return every freed allocation of 128 KiB or more "
                                          "to the system at once (a fixed mmap threshold instead of glibc's "
                                          "rising one), so that the resident set summary.json reports per phase "
                                          "(peak_memory_mb) follows the live tensors, as fedpft memory-plan "
                                          "counts them, and measure it over the resident set that is not the "
                                          "models' tensors once they are built (memory_baseline_mb); slower "
                                          "(local training about 15 %). No effect on a GPU",
                              run=False)

    def check(self, prefix: str) -> None:
        # An empty dir would put config.yaml, checkpoints and results in the current directory.
        if not self.dir.strip():
            raise ConfigError(f"{prefix}dir", f"must be a directory path, got {self.dir!r}")
        for i, name in enumerate(self.report_to):
            if name in self.report_to[:i]:
                raise ConfigError(f"{prefix}report_to", f"names {name!r} twice, got {self.report_to!r}")
        if not self.wandb_project.strip():
            raise ConfigError(f"{prefix}wandb_project", f"must be a project name, got {self.wandb_project!r}")


@dataclass
class DistConfig:
    """The distributed job: collective backend, timeouts, threads, client groups."""

    backend: Literal["auto", "nccl", "gloo"] = _opt(
        "auto", help="collective backend; auto = nccl when CUDA is available, else gloo")
    timeout_s: float = _opt(
        600.0, help="a collective that does not finish in this time ends the job with an error", gt=0)
    threads_per_rank: int = _opt(
        0, help="torch threads per rank; 0 = cores of this node (or of the task's CPU binding) "
                "divided by the local ranks", ge=0)
    log_all_ranks: bool = _opt(False, help="log INFO from every rank, not only rank 0")
    ranks_per_client: int = _opt(
        1, help="ranks that train one client together (a client group): each batch is split over them and "
                "their gradients are summed every step; must divide the world size. The global batch per "
                "step stays fed.batch_size", ge=1)


@dataclass
class DoctorConfig:
    """`fedpft doctor`'s all-reduce check."""

    local_ranks: int = _opt(
        2, help="ranks `fedpft doctor` spawns on this node for the all-reduce check when it is not "
                "itself started by a launcher (with CUDA, at most one per GPU; 1 rank runs no collective)", ge=1)
    allreduce_mb: float = _opt(16.0, help="size of the bandwidth all-reduce in MiB", gt=0, le=4096)
    iters: int = _opt(10, help="timed all-reduce iterations (after 2 warm-up ones)", ge=1)


@dataclass
class BenchConfig:
    """`fedpft bench`'s measurements."""

    warmup_rounds: int = _opt(
        1, help="`fedpft bench`: rounds left out of the medians (start-up: caches, allocator, first "
                "collectives)", ge=0)
    allreduce_iters: int = _opt(
        20, help="timed bare all-reduces of the aggregation's bytes (after 3 warm-up ones)", ge=1)
    stats_steps: int = _opt(
        6, help="local steps timed with and without activation-statistics collection, each", ge=1)
    limit_reps: int = _opt(
        3, help="timed repetitions of each phase's limit (bare training loop, bare inference, bare "
                "distillation step), after one warm-up", ge=1)
    out: str = _opt("", help="where bench.json goes (default: run.dir/bench.json)")


@dataclass
class ModelConfig:
    """The foundation model (FM)."""

    path: str = _opt("minilm", help="the foundation model: a local Hugging Face directory, a built-in "
                                    "offline model: 'minilm' (all-MiniLM-L6-v2) or 'smollm2' (SmolLM2-135M), or "
                                    "'random:DIR[@SEED]': DIR's config.json with seeded random weights and DIR's "
                                    "tokenizer (checks and benchmarks that need no trained weights)", run=False)
    task: Literal["auto", "base", "causal-lm", "sequence-classification"] = _opt(
        "auto", help="head to load; auto = causal-lm for decoder families, otherwise the bare encoder "
                     "(fedpft proxy) or sequence-classification (fedpft train); fedpft train fine-tunes "
                     "a causal LM on next-token loss and a classifier on labels")
    dtype: Literal["float32", "bfloat16", "float16"] = _opt("float32", help="weights dtype",
                                                            shapes=("proxy", "emulator"))
    num_labels: int = _opt(2, help="classes of a sequence-classification head", ge=2)
    fm_sharding: Literal["none", "fsdp"] = _opt(
        "none", help="how fedpft train holds the FM it evaluates with the global adapter (and the fidelity monitor "
                     "differentiates): none = whole on every rank; fsdp = built on the meta device and sharded per "
                     "layer with FSDP2 over all ranks, each rank reading its shard from the files (proxy and "
                     "emulator methods; alignment's teacher is then ZeRO-3's)", run=False)
    dropout: float = _opt(
        -1.0, help="dropout of the models federated training uses (hidden, attention and head dropout, every "
                   "config key of the model that names a dropout); -1 = the model's own. With dropout > 0 a "
                   "batch split over ranks (dist.ranks_per_client > 1) draws other masks, so results agree "
                   "with 1 rank per client in distribution, not to the last bit; 0 makes them equal", ge=-1, lt=1)

    def check(self, prefix: str) -> None:
        if self.dropout != -1 and self.dropout < 0:
            raise ConfigError(f"{prefix}dropout", f"must be -1 (the model's own) or in [0, 1), got {self.dropout:g}")


@dataclass
class PublicTextConfig:
    """The unlabelled public text of distillation, alignment and activation saliency."""

    source: str = _opt("austen", help="unlabelled public text: 'austen' (built in: Jane Austen's six novels), "
                                      "a local .txt file, directory of .txt, .json/.jsonl/.csv/.parquet, a "
                                      "datasets.save_to_disk directory or hf:NAME[:CONFIG][@SPLIT] (offline)",
                                      shapes=("proxy_activation", "distill"))
    text_column: str = _opt("text", help="column holding the text in json/csv/parquet sources",
                            shapes=("proxy_activation", "distill"))
    max_length: int = _opt(128, help="tokens per chunk", ge=8, le=8192, shapes=("proxy_activation", "distill"))
    held_out_fraction: float = _opt(0.05, help="share of documents kept out for evaluation", gt=0, lt=1,
                                    shapes=("proxy_activation", "distill"))


@dataclass
class ProxyConfig:
    """The proxy (sub-FM) of Stage 1: which FFN neurons each layer keeps."""

    keep_ratio: float = _opt(0.25, help="share of FFN neurons a compressed layer keeps (paper: 768/3072)",
                             gt=0, le=1, shapes=("proxy",))
    keep_ratios: list[float] = _opt([], help="per-layer keep ratios (one per layer; empty = keep_ratio "
                                             "everywhere); retained layers ignore theirs", shapes=("proxy",))
    retained_layers: list[int] = _opt([0, -1], help="layers that keep their whole FFN; negative counts "
                                                    "from the end", shapes=("proxy",))
    saliency: Literal["weight", "mean_abs", "apoz"] = _opt(
        "weight", help="neuron ranking: weight norms (paper), mean |activation| or 1 - APoZ on "
                       "calibration text", shapes=("proxy",))
    compensate: bool = _opt(False, help="refit each compressed FFN's output projection (and bias) by ridge "
                                        "regression on the FM's activations over calibration text, so that the "
                                        "kept neurons reproduce the whole FFN's output; seconds, no training",
                            shapes=("proxy",))
    compensate_ridge: float = _opt(1e-3, help="ridge of proxy.compensate, relative to the kept neurons' mean "
                                              "squared activation", gt=0, shapes=("proxy",))
    calibration_chunks: int = _opt(32, help="public-text chunks for activation saliency and proxy.compensate",
                                   ge=1, shapes=("proxy_activation",))
    eps: float = _opt(1e-3, help="|a| <= eps counts as zero for APoZ", ge=0, shapes=("proxy_activation",))
    batch_size: int = _opt(8, help="batch size of calibration and evaluation passes", ge=1, run=False)
    eval_chunks: int = _opt(16, help="held-out chunks for the hidden-state error report", ge=1, run=False)
    out: str = _opt("", help="where to save the proxy; empty = <run.dir>/proxy", run=False)
    sample_prompt: str = _opt("It is a truth universally acknowledged",
                              help="causal LMs: greedy continuation of this prompt by FM and proxy, in the report",
                              run=False)
    sample_tokens: int = _opt(24, help="tokens generated for the sample", ge=0, run=False)
    max_shard_gb: float = _opt(2.0, help="largest safetensors file of the saved proxy (GB); the file being filled "
                                         "is held in memory, so this also bounds the construction's host memory",
                               gt=0, run=False)

    def check(self, prefix: str) -> None:
        for i, r in enumerate(self.keep_ratios):
            if not 0 < r <= 1:
                raise ConfigError(f"{prefix}keep_ratios[{i}]", f"must be in (0, 1], got {r!r}")


@dataclass
class DistillConfig:
    """Stage 2: layer-level distillation of the proxy against the FM (DeepSpeed ZeRO)."""

    proxy: str = _opt("", help="proxy directory to distil; empty = where fedpft proxy puts it (proxy.out, else "
                               "<run.dir>/proxy), built first if missing", run=False)
    out: str = _opt("", help="where to save the distilled proxy; empty = <run.dir>/proxy_distilled", run=False)
    emulator_out: str = _opt("", help="fedot: where to save the distilled emulator, or reuse it from when one made "
                                      "with this config's settings is there; empty = <run.dir>/emulator_distilled",
                             run=False)
    zero_stage: int = _opt(3, help="DeepSpeed ZeRO stage (0-3); at 3 the FM is partitioned over ranks", ge=0, le=3,
                           run=False)
    steps: int = _opt(0, help="optimizer steps; 0 = use epoch_fraction", ge=0, shapes=("distill",))
    epoch_fraction: float = _opt(1.0, help="share of one pass over the public text when steps is 0", gt=0,
                                 shapes=("distill",))
    batch_size: int = _opt(8, help="chunks per optimizer step over all ranks (fixed, so the result does not "
                                   "depend on the number of ranks); a multiple of micro_batch x world size", ge=1,
                                   shapes=("distill",))
    micro_batch: int = _opt(4, help="chunks per forward pass; gradient accumulation makes up the batch", ge=1,
                            run=False)
    lr: float = _opt(6e-4, help="peak learning rate (paper: 6e-4)", gt=0, shapes=("distill",))
    warmup_ratio: float = _opt(0.048, help="share of steps with linear warm-up, then linear decay to 0",
                               ge=0, lt=1, shapes=("distill",))
    weight_decay: float = _opt(0.01, help="AdamW weight decay on matrices", ge=0, shapes=("distill",))
    grad_clip: float = _opt(1.0, help="gradient-norm clip", gt=0, shapes=("distill",))
    alpha: float = _opt(0.01, help="weight of the W_out W_in term of the loss (paper: 0.01)", ge=0, shapes=("distill",))
    adapter_noise: float = _opt(
        0.0, help="adapter-perturbed distillation: at every step teacher and student carry the same random "
                  "low-rank perturbation (rank adapter_noise_rank) of the weights LoRA tunes (attention "
                  "projections of every layer, FFN projections of the layers kept whole), so the proxy is "
                  "fitted where adapters will take it. Its scale: entries of std adapter_noise/sqrt(d_in), "
                  "as a weight matrix of gain adapter_noise; 0 = off", ge=0, shapes=("distill",))
    adapter_noise_rank: int = _opt(8, help="rank of distill.adapter_noise's perturbations", ge=1, shapes=("distill",))
    jvp_weight: float = _opt(
        0.0, help="weight of the derivative term: per compressed FFN, the relative squared error between the "
                  "student's and the teacher's Jacobian-vector products with random tangents at the teacher's "
                  "FFN inputs (the data-dependent form of the W_out W_in term); 0 = off", ge=0,
        shapes=("distill",))
    max_chunks: int = _opt(4096, help="public-text chunks tokenised for training", ge=1, shapes=("distill",))
    eval_chunks: int = _opt(32, help="held-out chunks for the before/after error", ge=1, run=False)
    checkpoint_every: int = _opt(0, help="checkpoint every N steps (0 = never)", ge=0, run=False)
    log_every: int = _opt(10, help="read the per-step loss terms back from the devices every N steps (and at "
                                   "checkpoints and the end): the steps in between wait for nothing; "
                                   "distill_log.jsonl still gets one line per step. A stop signal is acted on "
                                   "at these steps too", ge=1, run=False)
    resume: bool = _opt(False, help="continue from the newest complete checkpoint in <run.dir>/checkpoints/distill",
                        run=False)


@dataclass
class DataConfig:
    """The clients' labelled data (or text, for a causal LM) and its test set."""

    dataset: str = _opt("tweets", help="the clients' text: 'tweets' (3-class sentiment), 'bbcnews' (5 classes), "
                                       "a local .csv/.json/.jsonl/.parquet file, a datasets.save_to_disk directory "
                                       "(DIR[@SPLIT]) or hf:NAME[:CONFIG][@SPLIT] from the local datasets cache "
                                       "(offline; default split train); causal LMs also take 'austen' "
                                       "(prose, packed into max_length-token chunks) and .txt files or "
                                       "directories, and ignore labels")
    text_column: str = _opt("text", help="text column of a local file")
    label_column: str = _opt("label", help="label column of a local file")
    text_pair_column: str = _opt("", help="second-sentence column of a sentence-pair task (QNLI, MNLI, QQP)")
    test_file: str = _opt("", help="a separate labelled test set, any form data.dataset takes (e.g. a GLUE "
                                   "validation split; a dataset's default split: validation, else test); "
                                   "empty = a stratified split of data.dataset")
    max_dropped_fraction: float = _opt(0.01, help="rows dropped while loading (no text, no label) are counted and "
                                                  "warned about once per file; more than this share of a file's "
                                                  "rows is an error", ge=0, le=1)
    max_length: int = _opt(64, help="tokens per example (truncated / padded)", ge=8, le=8192)
    test_fraction: float = _opt(0.2, help="share of examples held out as the test set (stratified)", gt=0, lt=1)
    max_train: int = _opt(0, help="use at most this many training examples (0 = all), a seeded subset", ge=0)
    max_test: int = _opt(0, help="use at most this many test examples (0 = all), a seeded subset", ge=0)
    cache_dir: str = _opt("", help="tokenisation cache; empty = $FEDPFT_CACHE/tokens", run=False)


def parse_adapter_layers(spec: str, key: str = "fed.fedot_adapter_layers") -> tuple[int, int]:
    """``fed.fedot_adapter_layers`` ('B+T') as (bottom, top) layer counts."""
    parts = str(spec).replace(" ", "").split("+")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ConfigError(key, f"must be 'B+T' (bottom and top adapter layers, e.g. 2+2), got {spec!r}")
    bottom, top = int(parts[0]), int(parts[1])
    if bottom + top == 0:
        raise ConfigError(key, f"must name at least one adapter layer, got {spec!r}")
    return bottom, top


@dataclass
class FedConfig:
    """Federated fine-tuning: method, clients, rounds, optimisers, partition, LoRA, alignment, evaluation."""

    method: Literal["fedpft", "fedpetuning", "fedot", "fedpft_no_layer_distill", "fedpft_no_neuron_distill"] = _opt(
        "fedpft", help="fedpft (proxy + both distillations), fedpetuning (LoRA on the full FM at clients), "
                       "fedot (offsite-tuning emulator), or fedpft without one of its distillations")
    num_clients: int = _opt(100, help="virtual clients N", ge=1)
    client_fraction: float = _opt(0.1, help="clients sampled per round: K = max(1, floor(N * fraction))",
                                  gt=0, le=1)
    rounds: int = _opt(10, help="federated rounds", ge=1)
    local_epochs: int = _opt(1, help="local epochs per sampled client", ge=1)
    batch_size: int = _opt(4, help="local batch size", ge=1)
    lr: float = _opt(8e-4, help="client learning rate at round 0", gt=0)
    lr_schedule: Literal["constant", "exponential", "inverse", "linear"] = _opt(
        "linear", help="over rounds: constant, 0.95^t, 1/(t+1), or linear to zero")
    head_lr_scale: float = _opt(
        1.0, help="the task head's learning rate as a multiple of the round's client learning rate (the head "
                  "is trained in full from a fresh initialisation; LoRA keeps the round's rate)", gt=0)
    weight_decay: float = _opt(0.0, help="client AdamW weight decay", ge=0)
    aggregation: Literal["weighted", "uniform"] = _opt("weighted", help="average weighted by client samples, or uniform")
    server_optimizer: Literal["fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi"] = _opt(
        "fedavg", help="how the weighted mean of the client adapters moves the global adapter (Reddi et al. 2021): "
                       "fedavg (it becomes the global adapter), fedavgm (server momentum), or the adaptive "
                       "fedadagrad, fedadam, fedyogi")
    server_lr: float = _opt(0.0, help="server learning rate; 0 = the optimizer's default: 1 for fedavg, "
                                      "1 - server_momentum for fedavgm, 1e-3 for the adaptive ones", ge=0)
    server_momentum: float = _opt(0.9, help="fedavgm: momentum of the server update", ge=0, lt=1)
    server_beta1: float = _opt(0.9, help="fedadagrad, fedadam, fedyogi: decay of the first moment", ge=0, lt=1)
    server_beta2: float = _opt(0.99, help="fedadam, fedyogi: decay of the second moment", ge=0, lt=1)
    server_tau: float = _opt(1e-3, help="adaptive server optimizers: added to sqrt(v) (their adaptivity; the "
                                        "second moment starts at tau^2)", gt=0)
    prox_mu: float = _opt(0.0, help="FedProx: weight mu of the proximal term mu/2 * |theta - theta_global|^2 on the "
                                    "trainable adapter parameters in local training (0 = FedAvg's local training)",
                          ge=0)
    client_sharding: Literal["none", "fsdp"] = _opt(
        "none", help="fsdp: shard the client model (proxy or emulator) over the ranks of each client group "
                     "(dist.ranks_per_client > 1) with PyTorch FSDP2, so a rank holds 1/G of its weights, "
                     "adapter and optimizer state; none: every rank holds the whole client model", run=False)
    partition: Literal["iid", "dirichlet", "labels"] = _opt("iid", help="how the train set is split over clients")
    alpha: float = _opt(1.0, help="Dirichlet concentration (smaller = more label skew)", gt=0)
    labels_per_client: int = _opt(2, help="labels per client for partition=labels", ge=1)
    size_sigma: float = _opt(0.0, help="log-normal client-size imbalance (0 = none)", ge=0)
    lora_r: int = _opt(8, help="LoRA rank", ge=1)
    lora_alpha: float = _opt(48.0, help="LoRA alpha", gt=0)
    lora_dropout: float = _opt(0.1, help="LoRA dropout", ge=0, lt=1)
    grad_accum: int = _opt(1, help="split each local step's batch (this rank's rows of it) into this many micro-batches "
                                   "whose gradients add up before the one optimizer step: the same step, with the "
                                   "activations of batch_size / grad_accum rows at a time (at most batch_size)",
                           ge=1, run=False)
    gradient_checkpointing: bool = _opt(False, help="client training recomputes each layer's activations in the "
                                                    "backward pass: activation memory of one layer instead of all, "
                                                    "for about a third more compute")
    lora_targets: Literal["attention", "attention+ffn"] = _opt(
        "attention", help="LoRA on the attention projections, or also on FFN projections (which layers: "
                          "fed.lora_ffn_layers)")
    lora_ffn_layers: Literal["retained", "all"] = _opt(
        "retained", help="with lora_targets=attention+ffn, the layers whose FFN carries LoRA. retained: "
                         "proxy.retained_layers in every method, the only FFNs a proxy holds whole, so "
                         "fedpft and fedpetuning tune the same adapter; all: every layer whose FFN the "
                         "client holds whole (every FM layer for fedpetuning; a proxy still only its "
                         "retained layers). fedot: its emulator's whole-width adapter layers either way")
    lora_attention_layers: Literal["all", "retained"] = _opt(
        "all", help="the layers whose attention carries LoRA. all: every layer (fedot: its adapter layers, "
                    "as Offsite-Tuning); retained: only the layers the client holds whole (a proxy's "
                    "retained layers, the emulator's adapter layers, proxy.retained_layers of the FM for "
                    "fedpetuning): with lora_ffn_layers=retained every method then tunes the same layers, "
                    "the control that separates which layers are tuned from how much the client's model errs")
    align_every: int = _opt(10, help="neuron-level distillation every this many rounds (fedpft; 0 = never)", ge=0)
    align_keep: float = _opt(0.5, help="share of the most active neurons frozen during alignment", ge=0, le=1)
    align_fraction: float = _opt(0.02, help="alignment budget: share of one pass over the public text", gt=0)
    align_steps: int = _opt(0, help="alignment budget in steps (overrides align_fraction when > 0)", ge=0)
    align_score: Literal["mean_abs", "apoz"] = _opt(
        "mean_abs", help="neuron activity on client data: mean |a| or 1 - APoZ (random tie-break); the "
                         "paper's code ranks by APoZ, which with GELU (exact zeros are rare) is mostly the tie-break")
    align_alpha: float = _opt(0.0, help="weight of the W_out W_in term in alignment rounds (the paper's code: 0; "
                                        "layer-level distillation uses distill.alpha)", ge=0)
    align_lr: float = _opt(0.0, help="peak learning rate of alignment rounds; 0 = distill.lr", ge=0)
    fidelity_every: int = _opt(
        -1, help="gradient fidelity (cosine and relative error between the client model's and the FM's LoRA "
                 "gradients on a fixed probe set) every this many rounds; -1 = in every evaluation round, 0 = never",
        ge=-1, run=False)
    fidelity_examples: int = _opt(128, help="probe examples of the gradient-fidelity monitor (a seeded subset of "
                                            "the test set; 128: the per-example cosine's 95 % interval is "
                                            "+-0.026 or less on the quick start)", ge=1, run=False)
    fidelity_batch_size: int = _opt(
        0, help="probe rows per forward and backward of the gradient-fidelity monitor (its activation memory, on the "
                "client model and on the FM); 0 = fed.batch_size. The per-example gradients do not depend on it",
        ge=0, run=False)
    fidelity_transfer_steps: int = _opt(
        4, help="update transfer in fidelity rounds: the FM's loss decrease on the probe examples after this many "
                "local steps on the client model, over the decrease after as many steps on the FM itself (1: the "
                "client model moves the FM as the FM would); 0 = not measured", ge=0, run=False)
    save_round_adapters: bool = _opt(False, help="write every round's global adapter (FM module names) to "
                                                 "<run.dir>/round_adapters/: a trajectory `fedpft fidelity "
                                                 "--trajectory` scores client models along", run=False)
    eval_every: int = _opt(1, help="evaluate the FM with the global adapter every this many rounds", ge=1, run=False)
    eval_initial: bool = _opt(False, help="also evaluate the FM before round 1 (the starting adapter "
                                          "changes nothing): summary keys initial_*", run=False)
    eval_batch_size: int = _opt(32, help="evaluation batch size", ge=1, run=False)
    checkpoint_every: int = _opt(0, help="checkpoint every this many rounds (0 = never)", ge=0, run=False)
    resume: bool = _opt(False, help="continue from the newest complete round checkpoint in "
                                    "<run.dir>/checkpoints/rounds", run=False)
    max_excluded_rounds: int = _opt(
        3, help="stop the run (exit code 3) after this many consecutive rounds in which every client's update was "
                "non-finite (training has diverged: lower fed.lr); 0 = never", ge=0, run=False)
    stop_after: int = _opt(0, help="end this invocation after this many rounds, with a checkpoint (for jobs with a "
                                   "wall-clock limit: resubmit with fed.resume=true); 0 = run to the end", ge=0,
                                   run=False)
    fedot_adapter_layers: str = _opt(
        "2+2", help="fedot: the adapter, 'B+T': the emulator keeps the FM's bottom B and top T layers whole and the "
                    "clients tune them (Offsite-Tuning: 2+2)", shapes=("emulator",))
    fedot_middle_layers: int = _opt(
        0, help="fedot: middle layers the emulator keeps, evenly spaced (each stands for an equal block of the FM's "
                "middle layers); 0 = auto: the number whose emulator is closest in parameters to the FedPFT proxy "
                "of this config (proxy.keep_ratio(s), proxy.retained_layers)", ge=0, shapes=("emulator",))
    fedot_tuning: Literal["full", "lora"] = _opt(
        "full", help="fedot: full = every parameter of the adapter layers trains and is averaged and plugged into "
                     "the FM (Offsite-Tuning), no LoRA; lora = LoRA (fed.lora_*) on the adapter layers")

    def check(self, prefix: str) -> None:
        parse_adapter_layers(self.fedot_adapter_layers, f"{prefix}fedot_adapter_layers")
        if self.grad_accum > self.batch_size:
            raise ConfigError(f"{prefix}grad_accum", f"must be at most fed.batch_size ({self.batch_size}), got "
                                                     f"{self.grad_accum}")


@dataclass
class Config:
    # Where outputs go, how ranks talk and what the diagnostics measure never change an adapter's
    # trajectory (run.seed says so itself); every other section does, but for the keys marked run=False.
    run: RunConfig = _section(RunConfig, run=False)
    dist: DistConfig = _section(DistConfig, run=False)
    doctor: DoctorConfig = _section(DoctorConfig, run=False)
    bench: BenchConfig = _section(BenchConfig, run=False)
    model: ModelConfig = _section(ModelConfig, run=True)
    public_text: PublicTextConfig = _section(PublicTextConfig, run=True)
    proxy: ProxyConfig = _section(ProxyConfig, run=True)
    distill: DistillConfig = _section(DistillConfig, run=True)
    data: DataConfig = _section(DataConfig, run=True)
    fed: FedConfig = _section(FedConfig, run=True)


@dataclass(frozen=True)
class ConfigKey:
    """One setting as users see it: its dotted key, type, default, range and help, and what it shapes."""
    key: str
    type: Any
    default: Any
    help: str
    bounds: dict[str, float]     # the set ones of ge, gt, le, lt
    shapes: tuple[str, ...]      # artifacts whose fingerprint holds the key (ARTIFACTS)
    run: bool                    # a federated run's fingerprint holds the key

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0]


def config_keys() -> list[ConfigKey]:
    """Every setting, in the order of the sections and of their fields."""
    out = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        hints, defaults = typing.get_type_hints(cls), cls()
        for f in dataclasses.fields(cls):
            m = f.metadata
            out.append(ConfigKey(key=f"{section.name}.{f.name}", type=hints[f.name],
                                 default=getattr(defaults, f.name), help=m["help"],
                                 bounds={b: m[b] for b in BOUNDS if m.get(b) is not None},
                                 shapes=m["shapes"], run=section.metadata["run"] if m["run"] is None else m["run"]))
    return out


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------

class _Raw:
    """A value typed on the command line; parsed once the target field's type is known."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return repr(self.text)


def _leaf_paths(cls: type, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out.extend(_leaf_paths(tp, path + "."))
        else:
            out.append(path)
    return out


def short_names(keys: typing.Sequence[str]) -> dict[str, str]:
    """The last part of each dotted key where no other config key ends in it (``seed``), else the whole
    key (``fed.alpha``, as ``distill.alpha`` exists too): how sweeps and reports name a setting."""
    leaves = [p.rsplit(".", 1)[-1] for p in _leaf_paths(Config)]
    return {k: (k.rsplit(".", 1)[-1] if leaves.count(k.rsplit(".", 1)[-1]) == 1 else k) for k in keys}


def _suggest(key: str, prefix: str, cls: type) -> str:
    """' (did you mean 'x.y'?)' for the nearest valid key, or ''."""
    local = [f.name for f in dataclasses.fields(cls)]
    near = difflib.get_close_matches(key, local, n=1, cutoff=0.6)
    if near:
        return f" (did you mean '{prefix}{near[0]}'?)"
    # The key may exist in another section: suggest it by its last component.
    everywhere = _leaf_paths(Config)
    by_last = [p for p in everywhere if p.rsplit(".", 1)[-1] == key]
    if by_last:
        return f" (did you mean '{by_last[0]}'?)"
    near = difflib.get_close_matches(f"{prefix}{key}", everywhere, n=1, cutoff=0.6)
    return f" (did you mean '{near[0]}'?)" if near else ""


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(value, _Raw):
        wants_text = tp is str or (origin is Literal and all(isinstance(a, str) for a in typing.get_args(tp)))
        value = value.text if wants_text else _parse_scalar(value.text, key)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(key, f"must be {_describe(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(key, f"must be {_describe(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"must be {_describe(tp)}, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        number = None
        try:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                number = float(value)
            elif isinstance(value, str):  # YAML 1.1 reads '1e-3' as a string
                number = float(value)
        except OverflowError:  # an integer too large for a float
            raise ConfigError(key, f"must be a finite number, got {value!r}") from None
        except ValueError:
            pass
        if number is not None:
            # inf passes one-sided bounds and nan slips through unbounded fields; no setting means either.
            if not math.isfinite(number):
                raise ConfigError(key, f"must be a finite number, got {number}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{key}.")
    else:  # pragma: no cover - a field type this loader does not know is a programming error
        raise TypeError(f"unsupported config type {tp} for {key}")
    raise ConfigError(key, f"must be {_describe(tp)}, got {value!r}")


def _parse_scalar(text: str, key: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"cannot parse value {text!r}: {exc.__class__.__name__}") from None


def _check_bounds(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        key = f"{prefix}{f.name}"
        m = f.metadata
        if m.get("ge") is not None and not value >= m["ge"]:
            raise ConfigError(key, f"must be >= {m['ge']}, got {value!r}")
        if m.get("gt") is not None and not value > m["gt"]:
            raise ConfigError(key, f"must be > {m['gt']}, got {value!r}")
        if m.get("le") is not None and not value <= m["le"]:
            raise ConfigError(key, f"must be <= {m['le']}, got {value!r}")
        if m.get("lt") is not None and not value < m["lt"]:
            raise ConfigError(key, f"must be < {m['lt']}, got {value!r}")


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    section = prefix.rstrip(".") or "config"
    if data is None:
        data = {}
    if isinstance(data, _Raw) or not isinstance(data, dict):
        raise ConfigError(section, f"must be a mapping of keys, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"{prefix}{key}", "keys must be strings")
        if key not in names:
            raise ConfigError(f"{prefix}{key}", "unknown config key" + _suggest(key, prefix, cls))
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    obj = cls(**kwargs)
    _check_bounds(obj, prefix)
    check = getattr(obj, "check", None)
    if check is not None:
        check(prefix)
    return obj


def _apply_override(tree: dict, item: str) -> None:
    if "=" not in item:
        raise UserError(f"override {item!r} must look like dotted.key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise UserError(f"override {item!r} has an empty key part")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), "is a value, not a section")
        node = child
    node[parts[-1]] = _Raw(text)


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _key_identity(constructor: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    """What a mapping key becomes once constructed (``1`` and ``0x1`` collide, as in the dict)."""
    try:
        return constructor.construct_object(node, deep=True)
    except yaml.YAMLError:  # construction of the document reports it
        return (node.tag, node.value)


def _check_unique_keys(constructor: yaml.SafeLoader, node: yaml.Node, p: Path, path: str = "",
                       seen: set[int] | None = None) -> None:
    """A UserError for the first key (in document order) that a mapping under ``node`` holds twice.

    A plain YAML load keeps the last of two equal keys without a word, so a setting written twice
    would silently lose one of its values.
    """
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias of a node already walked (or a recursive one)
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(constructor, item, p, f"{path}[{i}]", seen)
    elif isinstance(node, yaml.MappingNode):
        first: dict[Any, tuple[int, bool]] = {}
        for key_node, value_node in node.value:
            child = path
            # Repeated merge keys ('<<') all merge; keys that are not scalars fail in construction.
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                child = f"{path}.{key_node.value}" if path else str(key_node.value)
                identity = _key_identity(constructor, key_node)
                line = key_node.start_mark.line + 1
                if identity in first:
                    earlier, is_section = first[identity]
                    kind = "section" if is_section else "key"
                    raise UserError(f"{p}: {kind} '{child}' appears twice (lines {earlier} and {line})")
                first[identity] = (line, isinstance(value_node, yaml.MappingNode))
            _check_unique_keys(constructor, value_node, p, child, seen)


def read_yaml(path: str | os.PathLike, what: str = "config file") -> Any:
    """The parsed YAML of ``path``; a missing file, a syntax error or a key given twice in one mapping
    is a one-line UserError."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} not found: {p}")
    loader, keys = yaml.SafeLoader(p.read_text(encoding="utf-8")), yaml.SafeLoader("")
    try:
        # Compose the node tree first: duplicate keys are only visible (with their lines) before the
        # mappings are built. Keys are constructed apart, so that the document's construction starts clean.
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique_keys(keys, node, p)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise UserError(f"{p}: not valid YAML{at}") from None
    finally:
        loader.dispose()
        keys.dispose()


# The top-level key of a config file that names the file it starts from.
EXTENDS = "extends"


def _merge(base: dict, top: dict) -> dict:
    """``base`` with ``top``'s keys over it; mappings in both merge key by key, anything else
    (a list included) is replaced."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_tree(p: Path, chain: tuple[tuple[Path, str], ...] = ()) -> dict:
    """The settings of config file ``p``: those of the file its ``extends`` names (a path relative to
    ``p``'s directory), read first and the same way, then ``p``'s own over them."""
    loaded = read_yaml(p)
    if loaded is None:  # an empty file (or only comments) is more likely a mistake than a wish for defaults
        raise UserError(f"{p}: the config file is empty; to run with the defaults leave out --config, "
                        f"or write {{}} in it")
    if not isinstance(loaded, dict):
        raise UserError(f"{p}: the top level must be a mapping of sections")
    if EXTENDS not in loaded:
        return loaded
    chain = (*chain, (p.resolve(), str(p)))
    base = loaded.pop(EXTENDS)
    if not isinstance(base, str) or not base.strip():
        raise UserError(f"{p}: {EXTENDS}: must be the path of a config file (relative to this file's "
                        f"directory), got {base!r}")
    q = p.parent / base
    resolved = [r for r, _ in chain]
    if q.resolve() in resolved:
        cycle = " -> ".join([shown for _, shown in chain[resolved.index(q.resolve()):]] + [str(q)])
        raise UserError(f"{p}: {EXTENDS}: {base} makes a cycle of config files: {cycle}")
    if not q.is_file():
        raise UserError(f"{p}: {EXTENDS}: the base config {q} does not exist")
    return _merge(_read_tree(q, chain), loaded)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read ``path`` (optional; with the files it extends) and apply ``dotted.key=value`` overrides;
    validate everything."""
    tree = _read_tree(Path(path)) if path is not None else {}
    for item in overrides:
        _apply_override(tree, item)
    return _build(Config, tree)


def config_from_dict(tree: dict) -> Config:
    """Validate a plain nested dict (as :func:`config_to_dict` returns) into a :class:`Config`."""
    return _build(Config, tree)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def write_resolved_config(cfg: Config, run_dir: str | os.PathLike | None = None) -> Path:
    """Write the resolved config to ``run.dir/config.yaml`` (atomically)."""
    target = Path(run_dir if run_dir is not None else cfg.run.dir) / "config.yaml"
    return atomic_write_text(target, dump_config(cfg))


__all__ = ["Config", "RunConfig", "DistConfig", "DoctorConfig", "BenchConfig", "ModelConfig", "PublicTextConfig",
           "ProxyConfig", "DistillConfig", "DataConfig", "FedConfig", "ARTIFACTS", "ConfigKey", "config_keys",
           "short_names", "load_config", "dump_config",
           "write_resolved_config", "config_to_dict", "config_from_dict"]

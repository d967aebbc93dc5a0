"""``fedpft memory-plan``: what each rank holds in a FedPFT run on a decoder FM (LLaMA, Qwen2, Mistral)
or an encoder FM with a classification head (BERT, RoBERTa, DistilBERT), computed, not measured.

Parameter counts come from the code itself: the FM's and the proxy's Hugging Face classes are built
on the meta device (no memory, no weights) from a ``config.json``, the proxy with the widths that
:func:`~fedpft_dist.models.proxy.plan_proxy` gives, and LoRA counts from the shapes of the modules the
engine targets. Byte counts follow what the code keeps alive and what autograd saves for each
operation (listed next to each term); activation sizes are estimates of that kind, not profiles.

Client groups (``dist.ranks_per_client`` G) split each batch into G row blocks, so a rank's
activations are those of ceil(batch / G) rows; with ``fed.client_sharding: fsdp`` (FSDP2 over the
group) a rank holds 1/G of every proxy parameter and of the LoRA's AdamW state, plus the full
weights of the layers being all-gathered.

    fedpft memory-plan --config configs/large/llama-7b.yaml \
        --model-config configs/large/llama-2-7b-config.json --world-size 8
    fedpft memory-plan --config configs/large/llama-70b.yaml \
        --model-config configs/large/llama-2-70b-config.json --world-size 64
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

GB = 1e9
HOST_GRADIENTS = "per-example adapter gradients of both sides, fp32, this rank's probe rows (host RAM)"
HOST_GATHER = ("the gather of every rank's rows, one block at a time, sent and summed (host RAM, after the "
               "backward passes)")
ONE_PROCESS = ("one CPU process: the backward beside this rank's rows, or the gather beside the models "
               "(what a CPU run measures)")
SHARDINGS = ("none", "fsdp")


@dataclass(frozen=True)
class EncoderShape:
    """What a BERT-style encoder layer's activations depend on beyond its widths: the heads and the
    sequence length (attention probabilities are kept per token and key when attention dropout is
    on), and the dropout probabilities of training (0 where the model runs in eval mode)."""
    heads: int
    seq: int
    hidden_dropout: float
    attention_dropout: float


def encoder_shape(cfg, model_config) -> Optional[EncoderShape]:
    """The encoder's shape in client training (``model.dropout`` overrides the config's
    probabilities when >= 0); None for a decoder."""
    from ..models.families import layout_for

    if layout_for(model_config.model_type).family != "encoder":
        return None
    override = cfg.model.dropout if cfg.model.dropout >= 0 else None
    hidden = getattr(model_config, "hidden_dropout_prob", getattr(model_config, "dropout", 0.0))
    attention = getattr(model_config, "attention_probs_dropout_prob", getattr(model_config, "attention_dropout", 0.0))
    return EncoderShape(model_config.num_attention_heads, cfg.data.max_length,
                        hidden if override is None else override, attention if override is None else override)


def no_dropout(enc: Optional[EncoderShape]) -> Optional[EncoderShape]:
    """The shape of a model run in eval mode (distillation, the fidelity monitor, evaluation)."""
    return None if enc is None else replace(enc, hidden_dropout=0.0, attention_dropout=0.0)


def ffn_size(model_config) -> int:
    """The FFN width of a layer (DistilBERT's config calls it ``hidden_dim``)."""
    return getattr(model_config, "intermediate_size", None) or model_config.hidden_dim


def kv_width(model_config) -> int:
    """The width of a layer's keys (and values): fewer heads than queries with grouped-query attention."""
    heads = model_config.num_attention_heads
    return (getattr(model_config, "num_key_value_heads", None) or heads) * (model_config.hidden_size // heads)


def decoder_counts(config, keep_ratio: float, retained_layers, lora_r: int, lora_ffn: bool) -> dict:
    """Parameter counts of the FM, its proxy and the adapter (built on the meta device): a decoder's
    language model, or an encoder's sequence classifier (``config.num_labels`` classes; the head is
    a few thousand parameters)."""
    import transformers

    from ..models.adapters import full_width_layers
    from ..models.families import ffn_modules, layout_for, transformer_layers
    from ..models.proxy import count_params, plan_proxy
    from ..models.proxy_arch import proxy_class_for, proxy_config_from

    with torch.device("meta"):
        encoder = layout_for(config.model_type).family == "encoder"
        auto = transformers.AutoModelForSequenceClassification if encoder else transformers.AutoModelForCausalLM
        fm = auto.from_config(config)
        plan = plan_proxy(fm, retained_layers, keep_ratio)
        sizes = [plan.keep.get(l, w) for l, w in enumerate(plan.widths)]
        proxy = proxy_class_for(fm)(proxy_config_from(fm.config, sizes))
    layout = layout_for(config.model_type)
    ffn_layers = full_width_layers(proxy, fm, exclude=plan.compressed) if lora_ffn else []

    def lora(layers, paths) -> int:
        mods = [m for l in layers for m in (_get(transformer_layers(proxy)[l], p) for p in paths)]
        return sum(lora_r * (m.in_features + m.out_features) for m in mods)

    n = len(transformer_layers(fm))
    # FSDP2 units: each transformer layer is one all-gather; the rest (embeddings, final norm, output
    # layer) is the root's
    layer_params = [sum(p.numel() for p in layer.parameters()) for layer in transformer_layers(proxy)]
    layer_lora = [lora([l], layout.attention) + (lora([l], (*layout.rows, *layout.cols)) if l in ffn_layers else 0)
                  for l in range(n)]
    biggest = max(range(n), key=lambda l: (layer_params[l], layer_lora[l]))
    ffn_trainable = sum(p.numel() for l in plan.compressed
                        for m in sum(ffn_modules(transformer_layers(proxy)[l], layout), []) for p in m.parameters())
    return {"fm": count_params(fm), "proxy": count_params(proxy), "layers": n, "compressed_layers": plan.compressed,
            "kept": sorted(set(plan.keep.values())), "ffn_trainable": ffn_trainable,
            "embedding": fm.get_input_embeddings().weight.numel(),
            "lora_attention": lora(range(n), layout.attention), "lora_ffn": lora(ffn_layers, (*layout.rows, *layout.cols)),
            "lora_ffn_layers": ffn_layers, "largest_layer": layer_params[biggest],
            "largest_layer_lora": layer_lora[biggest], "root": count_params(proxy) - sum(layer_params),
            "ffn_rows": len(layout.rows), "gated": layout.gated}


# bytes per element of the dtypes a model is run in (model.dtype) or stored in
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# DeepSpeed's default reduce_bucket_size (elements), which the distillation jobs keep
REDUCE_BUCKET = 5 * 10**8
# Hugging Face's shard size for the checkpoints it writes: a plan made from a config.json alone
# assumes the FM's files are at most this large
ASSUMED_FILE_BYTES = 5e9


def checkpoint_file(model_dir: Optional[Path]) -> Optional[dict]:
    """The largest safetensors file of the checkpoint in ``model_dir``: its bytes and its parameters
    (read from the file's header); None where the directory holds none."""
    from safetensors import safe_open

    files = list(Path(model_dir).glob("*.safetensors")) if model_dir and Path(model_dir).is_dir() else []
    if not files:
        return None
    largest = max(files, key=lambda p: p.stat().st_size)
    with safe_open(str(largest), framework="pt") as fh:
        params = sum(math.prod(fh.get_slice(key).get_shape()) for key in fh.keys())
    return {"file": largest.name, "bytes": largest.stat().st_size, "params": params}


def load_transient(file: Optional[dict], params: int, disk_bytes: int, b: int) -> tuple[float, str]:
    """Host bytes that loading a checkpoint partitioned (ZeRO-3's loading context) holds beside the
    partitions: transformers reads one file at a time, its pages mapped while the file's tensors are
    partitioned, plus a copy of them in the model's dtype where the file stores another; ``file`` as
    :func:`checkpoint_file` gives it, else files of at most ASSUMED_FILE_BYTES of a ``params``-sized
    model stored at ``disk_bytes`` per parameter."""
    if file is None:
        n = min(params, ASSUMED_FILE_BYTES / disk_bytes)
        size, what = n * disk_bytes, f"a checkpoint file of at most {ASSUMED_FILE_BYTES / GB:g} GB (assumed)"
    else:
        n, size, what = file["params"], file["bytes"], f"its largest checkpoint file, {file['bytes'] / GB:.2f} GB"
    cast = n * b if round(size / max(n, 1)) != b else 0
    return size + cast, what + (", cast" if cast else "")


def _get(module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def layer_activation_bytes(h: int, kv: int, i: int, lora_attention: bool, lora_ffn: bool, dropout: bool,
                           ffn_trainable: bool = False, b: int = 2, enc: Optional[EncoderShape] = None) -> int:
    """Bytes autograd keeps per token for one LLaMA-style layer whose activations take ``b`` bytes per
    element (what each op saves): two RMSNorms keep their fp32 input (2 x 4h); SDPA keeps q, k, v and
    its output (b(2h + 2kv)); SwiGLU keeps gate, SiLU(gate) and up (3bi). A LoRA module keeps the
    input of its A matrix in fp32, as peft computes LoRA in the adapter's dtype (a bf16 input is
    cast to an fp32 copy; the frozen base layer itself keeps nothing): with dropout each module keeps
    its own dropped-out input (4 B) and mask (1 B) per element, without it q, k and v share one copy
    of the norm output and o keeps the attention output. Trainable FFN weights (distillation) need
    the inputs of W_gate/W_up (the norm output, bh) and of W_down (bi). ``enc``: a BERT-style layer
    instead (:func:`encoder_layer_bytes`)."""
    if enc is not None:
        return encoder_layer_bytes(h, i, enc, lora_attention, lora_ffn, dropout, ffn_trainable, b)
    total = 8 * h + b * (2 * h + 2 * kv) + 3 * b * i
    if lora_attention:
        total += 4 * 5 * h if dropout else 2 * 4 * h
    if lora_ffn:
        total += 5 * (2 * h + i) if dropout else 4 * h + 4 * i
    if ffn_trainable:
        total += b * (h + i)
    return total


def encoder_layer_bytes(h: int, i: int, enc: EncoderShape, lora_attention: bool, lora_ffn: bool, dropout: bool,
                        ffn_trainable: bool, b: int) -> int:
    """Bytes autograd keeps per token for one BERT-style (post-LayerNorm, GELU) layer: SDPA keeps q,
    k and v (3bh) and, with attention dropout (PyTorch's reference path), the probabilities, their
    dropout mask and the dropped probabilities per head and key ((2b + 1) heads x seq), else its
    output (bh); two LayerNorms keep their input with its mean and inverse deviation (2(bh + 8));
    GELU keeps its input (bi); hidden dropout keeps two masks (2h). LoRA and trainable FFN weights
    as in :func:`layer_activation_bytes`, with one Linear into the FFN (W_in: input bh, W_out: bi)."""
    total = 3 * b * h + 2 * (b * h + 8) + b * i
    total += (2 * b + 1) * enc.heads * enc.seq if enc.attention_dropout > 0 else b * h
    total += 2 * h if enc.hidden_dropout > 0 else 0
    if lora_attention:
        total += 4 * 5 * h if dropout else 2 * 4 * h
    if lora_ffn:
        total += 5 * (h + i) if dropout else 4 * h + 4 * i
    if ffn_trainable:
        total += b * (h + i)
    return total


def head_bytes(vocab: int, b: int, training: bool = True, enc: Optional[EncoderShape] = None, h: int = 0) -> int:
    """Bytes per token of the output layer's logits (``models.lm``'s next-token loss): the logits (b
    per element), the contiguous fp32 copy of the shifted logits that the loss reshapes (a copy even
    when they are fp32 already) and the log-softmax the loss keeps (4 + 4); training adds the
    gradients of the log-softmax input and of the logits (4 + 4). An encoder's classifier reads one
    token per row (a few bytes per row): what its training keeps per token is the embeddings'
    LayerNorm input and statistics and their dropout mask (b h + 8 + h)."""
    if enc is not None:
        return (b * h + 8 + (h if enc.hidden_dropout > 0 else 0)) if training else 0
    return b * vocab + 8 * vocab + (8 * vocab if training else 0)


def client_setting(cfg, ranks_per_client: Optional[int] = None, client_sharding: Optional[str] = None) -> tuple[int, str]:
    """The client-group size and sharding: the arguments when given, else the config's
    ``dist.ranks_per_client`` and ``fed.client_sharding`` (1 and none for a config without them)."""
    g = ranks_per_client if ranks_per_client is not None else getattr(cfg.dist, "ranks_per_client", 1)
    mode = client_sharding if client_sharding is not None else getattr(cfg.fed, "client_sharding", "none")
    return int(g), str(mode)


def client_layers_bytes(c: dict, h: int, kv: int, k: int, inter: int, dropout: bool, b: int,
                        enc: Optional[EncoderShape] = None) -> int:
    """Activation bytes per token of all the client model's layers in training (LoRA on every
    layer's attention, on the FFNs of ``c["lora_ffn_layers"]``; compressed layers ``k`` wide)."""
    n, comp, ffn = c["layers"], len(c["compressed_layers"]), len(c["lora_ffn_layers"])
    return (comp * layer_activation_bytes(h, kv, k, True, False, dropout, b=b, enc=enc)
            + ffn * layer_activation_bytes(h, kv, inter, True, True, dropout, b=b, enc=enc)
            + (n - comp - ffn) * layer_activation_bytes(h, kv, inter, True, False, dropout, b=b, enc=enc))


def resident_fm(cfg, c: dict, b: int, world_size: int) -> dict:
    """The FM that ``fedpft train`` keeps for plug-in evaluation: whole on every rank, or with
    ``model.fm_sharding: fsdp`` a 1/W share of it."""
    if getattr(cfg.model, "fm_sharding", "none") == "fsdp":
        return {f"FM for plug-in evaluation, 1/{world_size} shard (model.fm_sharding fsdp)": b * c["fm"] / world_size}
    return {"FM for plug-in evaluation (resident in fedpft train)": b * c["fm"]}


def fm_gathered(cfg, c: dict, b: int) -> dict:
    """What a forward or backward through the sharded FM gathers whole: two layers (the one computed
    and the prefetched one) and the root (embeddings, final norm, output layer); nothing unsharded."""
    if getattr(cfg.model, "fm_sharding", "none") != "fsdp":
        return {}
    return {"FM: all-gathered full weights of 2 layers": 2 * b * c["largest_layer"],
            "FM: all-gathered root (embeddings, final norm, output layer)": b * c["root"]}


def client_training_terms(cfg, model_config, c: dict, g: int, sharded: bool, b: int,
                          world_size: int = 1) -> tuple[dict, dict, int, int]:
    """Per-rank bytes of client training in groups of ``g`` ranks (sharded with FSDP2 or whole on
    each), from the counts ``c`` of :func:`decoder_counts` and ``b`` bytes per weight: the terms, the
    totals, and the rows and tokens one rank computes per step."""
    f = cfg.fed
    h, inter, vocab = model_config.hidden_size, ffn_size(model_config), model_config.vocab_size
    kv = kv_width(model_config)
    k = c["kept"][0] if c["kept"] else inter
    n, comp = c["layers"], len(c["compressed_layers"])
    drop = f.lora_dropout > 0
    lora = c["lora_attention"] + c["lora_ffn"]
    share = g if sharded else 1
    # a batch of fed.batch_size rows is cut into g row blocks (tensor_split): the first rank's is the
    # largest; fed.grad_accum cuts a rank's block into that many micro-batches, computed one at a time
    accum = getattr(f, "grad_accum", 1)
    rows = math.ceil(math.ceil(f.batch_size / g) / accum)
    tokens = rows * cfg.data.max_length
    enc = encoder_shape(cfg, model_config)
    per_layer = client_layers_bytes(c, h, kv, k, inter, drop, b, enc)
    biggest = layer_activation_bytes(h, kv, inter, True, bool(c["lora_ffn_layers"]), drop, b=b, enc=enc)
    head = head_bytes(vocab, b, enc=enc, h=h)
    of_g = f", 1/{g} shard (FSDP2)" if sharded else ""
    of_rows = f" ({rows} of {f.batch_size} rows at a time)" if g > 1 or accum > 1 else ""
    weights = {"proxy weights" + of_g: b * c["proxy"] / share,
               "LoRA fp32 weights + grads + AdamW m, v (16 B/param)" + of_g: 16 * lora / share}
    if sharded:
        # FSDP2 gathers one layer for its forward or backward and prefetches the next; the root
        # (embeddings, final norm, output layer) is gathered while the embeddings and the head
        # compute (runtime.shard reshards it after forward too), counted whole as the peak
        layer = b * c["largest_layer"] + 4 * c["largest_layer_lora"]
        weights["all-gathered full weights of 2 layers (the one computed + the prefetched one)"] = 2 * layer
        weights["all-gathered root: embeddings, final norm, output layer (while they compute)"] = b * c["root"]
    elif g > 1:
        weights["flat fp32 copy of the LoRA gradients for the group's all-reduce"] = 4 * lora
    act = {"activations without checkpointing" + of_rows: tokens * (per_layer + head),
           "activations with per-layer checkpointing" + of_rows: tokens * (n * 2 * h + biggest + head)}
    fm = resident_fm(cfg, c, b, world_size)
    client = {**weights, **act, **fm}
    model_bytes = sum(weights.values())
    fm_bytes = sum(fm.values())
    act_plain, act_ckpt = act.values()
    client_totals = {
        "client model, without checkpointing": model_bytes + act_plain,
        "client model, with checkpointing": model_bytes + act_ckpt,
        "fedpft train (client model + resident FM), without checkpointing": model_bytes + act_plain + fm_bytes,
        "fedpft train (client model + resident FM), with checkpointing": model_bytes + act_ckpt + fm_bytes,
    }
    return client, client_totals, rows, tokens


def zero3_job_terms(c: dict, b: int, world_size: int, dtok: int, student_act: float, model_config,
                    trainable: float, alpha: float, jvp_weight: float = 0.0) -> tuple[dict, dict]:
    """A ZeRO-3 distillation job's terms (``trainable`` FFN parameters, loss weight ``alpha``, ``dtok``
    tokens per micro-batch, derivative term's weight ``jvp_weight``) and the steady step's total.
    Both jobs load their student partitioned, as the teacher is: one module is gathered at a time,
    and an alignment's neuron split is made one Linear at a time, each partitioned at once; less than
    the steady step's gathered parameters."""
    h, n, comp = model_config.hidden_size, c["layers"], len(c["compressed_layers"])
    k = c["kept"][0] if c["kept"] else ffn_size(model_config)
    terms = {
        "teacher (FM) shard": b * c["fm"] / world_size,
        "student (proxy) shard": b * c["proxy"] / world_size,
        "trainable FFN: bf16 param + grad, fp32 master + Adam m, v (16 B/param), sharded":
            16 * trainable / world_size,
        # a module's parameters are gathered for its forward (or backward) and released after it
        # (stage3_max_reuse_distance 0, no prefetch): the largest module, the embeddings
        "gathered parameters: one module at a time, the largest (embeddings or an FFN matrix)":
            b * max(c["embedding"], h * ffn_size(model_config)),
        # the backward's gradients wait in ZeRO-3's reduction bucket (DeepSpeed's reduce_bucket_size,
        # 5e8 elements) before they are reduce-scattered: the gradients and the bucket's copy
        "gradients of the trainable FFN awaiting reduction, and the bucket's copy (at most 5e8 elements)":
            2 * b * min(trainable, REDUCE_BUCKET),
        "student activations (per micro-batch)": dtok * student_act,
        "hidden states of both models + fp32 loss terms": dtok * ((n + 1) * 2 * h * 2 + comp * 4 * h),
    }
    if alpha > 0:
        # every rank computes every compressed layer's W_out W_in (d x d) for gate and up, the
        # teacher's without a graph, the student's keeping W_in^T (d x k) and the fp32 difference (d x d)
        terms["weight term: teacher products"] = comp * c["ffn_rows"] * h * h * b
        terms["weight term: student graph"] = comp * c["ffn_rows"] * (b * h * k + 4 * h * h)
    if jvp_weight > 0:
        # the teacher's FFN input of every compressed layer is kept; per layer the student's FFN runs
        # at x + hv and x - hv with a graph (the inputs of W_gate/W_up and W_down, gate, SiLU(gate),
        # up: b(h + 4k) each), beside the two perturbed fp32 inputs
        terms["derivative term: teacher FFN inputs"] = dtok * comp * b * h
        terms["derivative term: student FFN graphs"] = \
            dtok * comp * 2 * (b * (h + (4 if c["gated"] else 2) * k) + 4 * h)
    return terms, {"steady": sum(terms.values())}


def evaluation_terms(cfg, model_config, c: dict, b: int, fm_held: dict, client_model: float) -> tuple[dict, int]:
    """Plug-in evaluation's terms (the FM whole on every rank, or its shard and what a forward
    gathers, beside the resident client model) and its tokens per batch."""
    h, inter, vocab = model_config.hidden_size, ffn_size(model_config), model_config.vocab_size
    kv = kv_width(model_config)
    etok = cfg.fed.eval_batch_size * cfg.data.max_length
    # without a graph only one layer's tensors live at a time: q, k, v, attention output, gate, up,
    # SiLU(gate) and their product
    # (an encoder's: q, k, v, attention output, the FFN's input to GELU and its output)
    gathered = fm_gathered(cfg, c, b)
    enc = encoder_shape(cfg, model_config)
    layer = b * (4 * h + 2 * inter) if enc is not None else b * (2 * h + 2 * kv + 4 * inter)
    out = {**({"FM weights": b * c["fm"]} if not gathered else fm_held), **gathered,
           "client model (resident in fedpft train)": client_model, "one layer's activations (no graph)": etok * layer}
    if enc is None:
        out["logits + fp32 copy + log-softmax"] = etok * head_bytes(vocab, b, training=False)
    return out, etok


def fidelity_terms(cfg, model_config, c: dict, b: int, fm_held: dict, client_model: float,
                   world_size: int) -> dict:
    """The gradient-fidelity monitor's terms: one batch of ``fed.fidelity_batch_size`` probe rows
    backward through the client model, then through the FM (LoRA on every layer's attention and the
    retained layers' FFNs), beside what training holds; each side's per-example adapter gradients of
    the probe rows this rank computes (fp32, host memory: batches are dealt to the ranks in turn);
    after the backward passes, the gather that brings every rank's rows to every rank one block at
    a time (at most GATHER_VALUES values of both sides, sent, and summed into a flat buffer). The
    probe is a subset of the test set: at most ``data.max_test`` examples when that is set."""
    from ..alignment.fidelity import GATHER_VALUES, dealt_rows

    f = cfg.fed
    h, inter, vocab = model_config.hidden_size, ffn_size(model_config), model_config.vocab_size
    kv = kv_width(model_config)
    k = c["kept"][0] if c["kept"] else inter
    examples = min(f.fidelity_examples, cfg.data.max_test) if cfg.data.max_test > 0 else f.fidelity_examples
    probe_rows = min(examples, getattr(f, "fidelity_batch_size", 0) or f.batch_size)
    ftok = probe_rows * cfg.data.max_length
    enc = no_dropout(encoder_shape(cfg, model_config))   # both models in eval mode
    head = head_bytes(vocab, b, enc=enc, h=h)
    fm_act = ftok * (c["layers"] * layer_activation_bytes(h, kv, inter, True, False, False, b=b, enc=enc)
                     + len(c["lora_ffn_layers"]) * (4 * h + 4 * inter) + head)
    client_act = ftok * (client_layers_bytes(c, h, kv, k, inter, False, b, enc) + head)
    lora = c["lora_attention"] + c["lora_ffn"]
    mine = len(dealt_rows(examples, probe_rows, 0, world_size))   # rank 0 computes the most rows
    return {"client model (as in training)": client_model, **fm_held, **fm_gathered(cfg, c, b),
            f"backward of {probe_rows} probe rows: the larger of the client's and the FM's activations":
                max(fm_act, client_act),
            HOST_GRADIENTS: 2 * mine * 4 * lora,
            HOST_GATHER: 2 * 4 * min(2 * examples * lora, GATHER_VALUES)}


def fidelity_totals(terms: dict, models: float, off: str) -> dict:
    """The monitor's totals: the device's (the backward beside the models), the host's (this rank's
    probe rows and one gather block), and one CPU process's, where both are the same memory: the
    backward beside the rows, or after it the gather beside the ``models`` (client model and FM)."""
    device = sum(v for key, v in terms.items() if key not in (HOST_GRADIENTS, HOST_GATHER))
    rows, gather = terms[HOST_GRADIENTS], terms[HOST_GATHER]
    return {"device: client model, FM and one probe batch's backward" + off: device,
            "host RAM (the CPU process, not the device): the per-example gradients and their gather": rows + gather,
            ONE_PROCESS: max(device + rows, models + rows + gather)}


def loading_terms(cfg, model_config, c: dict, b: int, world_size: int, fm_file: Optional[dict]) -> dict:
    """A ZeRO-3 job's loading moments: the teacher, then the student, each read a file at a time and
    partitioned as it loads; per moment (host bytes, the shards held meanwhile)."""
    dtype = str(getattr(model_config, "torch_dtype", None) or getattr(model_config, "dtype", "")).replace("torch.", "")
    disk = DTYPE_BYTES.get(dtype, b)
    fm_load, fm_what = load_transient(fm_file, c["fm"], disk, b)
    return {f"loading the teacher: {fm_what}, mapped": (fm_load, b * c["fm"] / world_size),
            "loading the student: a proxy file (at most proxy.max_shard_gb), mapped":
                (min(b * c["proxy"], cfg.proxy.max_shard_gb * GB), b * (c["fm"] + c["proxy"]) / world_size)}


def student_activation_bytes(cfg, model_config, c: dict, b: int) -> int:
    """Per token, what a distillation's student keeps for its backward (in eval mode): the compressed
    layers with trainable FFN weights, the others frozen."""
    h, inter = model_config.hidden_size, ffn_size(model_config)
    kv, k = kv_width(model_config), (c["kept"][0] if c["kept"] else ffn_size(model_config))
    quiet = no_dropout(encoder_shape(cfg, model_config))
    comp = len(c["compressed_layers"])
    return (comp * layer_activation_bytes(h, kv, k, False, False, False, ffn_trainable=True, b=b, enc=quiet)
            + (c["layers"] - comp) * layer_activation_bytes(h, kv, inter, False, False, False, b=b, enc=quiet))


def distilled_ffn_host(c: dict, by_layer: bool) -> dict:
    """What a rank receives of a job's distilled FFN tensors (host RAM, fp32): all of them (the
    layer-level distillation, or an alignment at ZeRO stages 0-2), or an alignment at ZeRO-3's, handed
    to the client model a layer at a time once every rank found them finite."""
    if by_layer:
        return {"host RAM: one layer's distilled FFN tensors at a time (fp32), into the client model":
                4 * c["ffn_trainable"] / max(1, len(c["compressed_layers"]))}
    return {"host RAM: distilled FFN tensors gathered to every rank (fp32)": 4 * c["ffn_trainable"]}


def add_loading(terms: dict, totals: dict, loads: dict, held: float, what: str) -> None:
    """The loading moments of :func:`loading_terms` into a job's terms (host RAM) and its totals (one
    CPU process: the host bytes beside the shards and ``held``, what the run holds besides, ``what``)."""
    terms.update({f"host RAM: {key}": host for key, (host, _) in loads.items()})
    totals.update({f"one CPU process: {key}, beside the shards{what}": host + shards + held
                   for key, (host, shards) in loads.items()})


def memory_plan(cfg, model_config, world_size: int, ranks_per_client: Optional[int] = None,
                client_sharding: Optional[str] = None, device_gb: float = 80.0,
                fm_file: Optional[dict] = None) -> dict:
    """Per-rank bytes of client training, distillation (layer level), alignment and evaluation for
    ``cfg`` (a :class:`~fedpft_dist.config.Config`) on the FM of ``model_config`` over ``world_size``
    ranks, with clients trained by groups of ``ranks_per_client`` ranks sharded by ``client_sharding``
    (defaults: the config's), and each phase's totals checked against ``device_gb``. ``fm_file``: the
    FM's largest checkpoint file (:func:`checkpoint_file`), which a ZeRO-3 job reads whole to load
    the teacher; without it, files of at most ASSUMED_FILE_BYTES."""
    f, d = cfg.fed, cfg.distill
    g, sharding = client_setting(cfg, ranks_per_client, client_sharding)
    c = decoder_counts(model_config, cfg.proxy.keep_ratio, cfg.proxy.retained_layers, f.lora_r,
                       f.lora_targets == "attention+ffn")
    b = DTYPE_BYTES[cfg.model.dtype]
    h = model_config.hidden_size
    k = c["kept"][0] if c["kept"] else ffn_size(model_config)
    lora = c["lora_attention"] + c["lora_ffn"]
    sharded = sharding == "fsdp"
    if sharded and g < 2:
        raise ValueError("client_sharding fsdp shards over a client group: ranks_per_client must be >= 2")
    share = g if sharded else 1

    # -- client training: one rank (or client group) trains its clients one after another ------------
    client, client_totals, rows, tokens = client_training_terms(cfg, model_config, c, g, sharded, b, world_size)
    fm_held = resident_fm(cfg, c, b, world_size)
    fm_bytes = sum(fm_held.values())
    of_g = f", 1/{g} shard (FSDP2)" if sharded else ""

    # -- layer-level distillation: ZeRO-3 over all ranks ---------------------------------------------
    dtok = d.micro_batch * cfg.public_text.max_length
    student_act = student_activation_bytes(cfg, model_config, c, b)

    def zero3_terms(trainable: float, alpha: float, jvp_weight: float = 0.0) -> tuple[dict, dict]:
        return zero3_job_terms(c, b, world_size, dtok, student_act, model_config, trainable, alpha, jvp_weight)

    distill, distill_totals = zero3_terms(c["ffn_trainable"], d.alpha, d.jvp_weight)
    if d.alpha == 0:
        distill["weight term (distill.alpha = 0: not computed)"] = 0
    distill.update(distilled_ffn_host(c, by_layer=False))
    loads = loading_terms(cfg, model_config, c, b, world_size, fm_file)
    add_loading(distill, distill_totals, loads, 0.0, "")

    # -- alignment: the same ZeRO-3 job for the non-frozen neurons, next to what fedpft train holds ---
    align, align_totals = zero3_terms(c["ffn_trainable"] * (1 - f.align_keep), f.align_alpha)
    if f.align_alpha == 0:
        align["weight term (fed.align_alpha = 0: not computed)"] = 0
    engine = (b * c["proxy"] + 4 * lora) / share
    align["client model kept by the engine: proxy weights + LoRA fp32 weights" + of_g] = engine
    align.update(fm_held)
    if sharded:
        # the student takes the clients' FFN weights one tensor at a time, each gathered whole from the
        # sharded client model and written through a gather of the student's partitioned tensor
        align["one FFN tensor gathered from the sharded client model, twice (at the start)"] = 2 * b * h * k
    align.update(distilled_ffn_host(c, by_layer=d.zero_stage == 3))
    align_totals = {**{f"{key} + the engine's client model": v + engine for key, v in align_totals.items()},
                    **{f"{key} + the engine's client model and FM": v + engine + fm_bytes
                       for key, v in align_totals.items()}}
    add_loading(align, align_totals, loads, engine + fm_bytes, ", the engine's client model and FM")

    client_model = sum(v for key, v in client.items() if key.startswith(("proxy weights", "LoRA", "all-gathered")))
    evaluate, etok = evaluation_terms(cfg, model_config, c, b, fm_held, client_model)
    fidelity = fidelity_terms(cfg, model_config, c, b, fm_held, client_model, world_size)
    off = "" if f.fidelity_every != 0 else " (fed.fidelity_every = 0: the monitor is off)"
    totals = {"client_training": client_totals, "distillation": distill_totals, "alignment": align_totals,
              "evaluation": {"FM, client model and activations": sum(evaluate.values())},
              "fidelity": fidelity_totals(fidelity, client_model + fm_bytes + sum(fm_gathered(cfg, c, b).values()),
                                          off)}
    # the device's memory; a host-RAM total is reported beside, not checked against it
    fits = {phase: {key: v <= device_gb * GB for key, v in t.items() if not key.startswith(("host RAM", "one CPU"))}
            for phase, t in totals.items()}
    return {"counts": c, "world_size": world_size, "ranks_per_client": g, "client_sharding": sharding,
            "client_groups": world_size // g, "dtype_bytes": b, "batch_size": f.batch_size,
            "grad_accum": getattr(f, "grad_accum", 1), "client_rows_per_rank": rows,
            "client_tokens": tokens, "distill_tokens_per_micro_batch": dtok, "eval_tokens": etok,
            "client_training": client, "distillation": distill, "alignment": align, "evaluation": evaluate,
            "fidelity": fidelity, "fm_sharding": getattr(cfg.model, "fm_sharding", "none"),
            "device_gb": device_gb, "totals": totals, "fits": fits}


PHASES = ("client_training", "distillation", "alignment", "evaluation", "fidelity")


def format_plan(plan: dict) -> str:
    """The plan as text: the counts, each phase's terms, its totals and whether they fit the device."""
    c = plan["counts"]
    lines = [f"FM {c['fm']:,} params; proxy {c['proxy']:,} ({c['proxy'] / c['fm']:.1%}); {len(c['compressed_layers'])} "
             f"of {c['layers']} layers keep {c['kept']} FFN neurons; trainable FFN {c['ffn_trainable']:,}; "
             f"LoRA attention {c['lora_attention']:,}, FFN {c['lora_ffn']:,} (layers {c['lora_ffn_layers']})"]
    g = plan["ranks_per_client"]
    if plan.get("grad_accum", 1) > 1:
        lines.append(f"fed.grad_accum {plan['grad_accum']}: a rank computes {plan['client_rows_per_rank']} of each "
                     f"batch's {plan['batch_size']} rows at a time ({plan['client_tokens']:,} tokens)")
    if g > 1:
        lines.append(f"client groups: {plan['client_groups']} groups of {g} ranks, fed.client_sharding "
                     f"{plan['client_sharding']}; a rank computes at most {plan['client_rows_per_rank']} of each "
                     f"batch's {plan['batch_size']} rows ({plan['client_tokens']:,} tokens)")
    for phase in PHASES:
        lines.append(f"\n{phase} (per rank, {plan['world_size']} ranks):")
        lines += [f"  {v / GB:9.2f} GB  {k}" for k, v in plan[phase].items()]
        lines += [f"  {v / GB:9.2f} GB  total: {k}" + (
                  f": {'fits' if plan['fits'][phase][k] else 'does not fit'} {plan['device_gb']:g} GB"
                  if k in plan["fits"][phase] else "") for k, v in plan["totals"][phase].items()]
    return "\n".join(lines)


# summary.json's measured phase -> the plan's phase and the total it is compared with (a function of
# the config: client training with or without activation checkpointing)
ALL_WITH_FM = "the largest of the totals with the FM"
MEASURED_PHASES = (
    ("local_training", "client_training", lambda cfg: "fedpft train (client model + resident FM), "
     + ("with" if cfg.fed.gradient_checkpointing else "without") + " checkpointing"),
    # the largest of its moments (steady, before the student is partitioned, the FFN gather)
    # on the CPU also its loading moments (one process: host and device are one memory)
    ("alignment", "alignment", lambda cfg: ALL_WITH_FM),
    ("evaluation", "evaluation", lambda cfg: "FM, client model and activations"),
    ("fidelity", "fidelity", None),   # the device total; on the CPU the one process's
)


def measured_against_plan(plan: dict, cfg, summary: dict) -> list[dict]:
    """Each phase a run measured (summary.json's ``peak_memory_mb``; on the CPU less
    ``memory_baseline_mb``: the resident set before the models were built, or with run.exact_memory
    the resident set less the models' tensors once they are built) beside the plan's total for
    it, in bytes, and measured / planned. On the CPU the fidelity monitor's host-RAM gradients are the
    same memory as the rest, so its plan is the device and host totals together."""
    peaks = summary.get("peak_memory_mb") or {}
    cpu = summary.get("peak_memory_kind") == "rss"
    baseline = (summary.get("memory_baseline_mb") or 0.0) if cpu else 0.0
    rows = []
    for measured_key, phase, total in MEASURED_PHASES:
        peak = peaks.get(measured_key)
        if peak is None:
            continue
        totals = plan["totals"][phase]
        if total is None:
            planned = totals[ONE_PROCESS] if cpu else \
                sum(v for k, v in totals.items() if not k.startswith(("host RAM", "one CPU")))
        elif total(cfg) is ALL_WITH_FM:
            planned = max(v for k, v in totals.items() if k.endswith("and FM") and (cpu or not k.startswith("one CPU")))
        else:
            planned = totals[total(cfg)]
        measured = (peak - baseline) * 2**20
        rows.append({"phase": phase, "planned_bytes": planned, "measured_bytes": measured,
                     "ratio": measured / planned if planned else None})
    return rows


def format_measured(rows: list[dict], summary: dict) -> str:
    kind = summary.get("peak_memory_kind", "?")
    over = ("the resident set less the models' tensors, once built" if summary.get("memory_exact")
            else "the resident set before the models were built")
    lines = [f"\nmeasured ({kind}; on the CPU over {over}) against planned:"]
    lines += [f"  {r['phase']:16s} planned {r['planned_bytes'] / GB:7.2f} GB  measured {r['measured_bytes'] / GB:7.2f} GB  "
              f"measured / planned {r['ratio']:.2f}" for r in rows]
    if kind == "rss" and not summary.get("memory_exact"):
        lines.append("  (the resident set also holds what glibc's heap kept of freed blocks; rerun with "
                     "run.exact_memory=true for peaks that follow the live tensors)")
    return "\n".join(lines)


def run_memory_plan(cfg, model_config: Optional[str], world_size: int, json_out: Optional[str],
                    ranks_per_client: Optional[int] = None, client_sharding: Optional[str] = None,
                    device_gb: float = 80.0, measured: Optional[str] = None) -> int:
    """Print the plan for ``cfg`` on the FM whose config.json is ``model_config`` (default:
    ``<model.path>/config.json``); also write it as JSON to ``json_out``."""
    from transformers import AutoConfig

    from ..errors import UserError

    if world_size < 1:
        raise UserError(f"--world-size must be >= 1, got {world_size}")
    g, sharding = client_setting(cfg, ranks_per_client, client_sharding)
    if g < 1 or world_size % g:
        raise UserError(f"--ranks-per-client: {g} must be >= 1 and divide --world-size {world_size}")
    if sharding not in SHARDINGS:
        raise UserError(f"--client-sharding must be one of {', '.join(SHARDINGS)}, got {sharding!r}")
    if sharding == "fsdp" and g < 2:
        raise UserError("--client-sharding fsdp shards the client model over a client group: "
                        "--ranks-per-client (dist.ranks_per_client) must be >= 2")
    if device_gb <= 0:
        raise UserError(f"--device-gb must be > 0, got {device_gb:g}")
    from ..models.loading import config_path

    path = Path(model_config) if model_config else config_path(cfg.model.path)
    if not path.is_file():
        raise UserError(f"--model-config: {path} not found (give the FM's config.json)")
    raw = json.loads(path.read_text())
    from ..models.families import LAYOUTS, layout_for

    kind = raw.get("model_type")
    if kind not in LAYOUTS or layout_for(kind).family not in ("decoder", "encoder"):
        covered = sorted(k for k in LAYOUTS if layout_for(k).family in ("decoder", "encoder"))
        raise UserError(f"memory-plan: {path} is a {kind!r} model; the plan covers decoder and encoder FMs "
                        f"({', '.join(covered)})")
    model_config_obj = AutoConfig.for_model(raw.pop("model_type"), **raw)
    summary = None
    if measured:
        summary_path = Path(measured) / "summary.json"
        if not summary_path.is_file():
            raise UserError(f"--measured: {summary_path} not found (give a finished run's directory)")
        summary = json.loads(summary_path.read_text())
        if "peak_memory_mb" not in summary:
            raise UserError(f"--measured: {summary_path} has no peak_memory_mb (a run of an older fedpft-dist)")
    plan = memory_plan(cfg, model_config_obj, world_size, g, sharding, device_gb, fm_file=checkpoint_file(path.parent))
    print(format_plan(plan))
    if summary is not None:
        plan["measured"] = measured_against_plan(plan, cfg, summary)
        print(format_measured(plan["measured"], summary))
    if json_out:
        Path(json_out).write_text(json.dumps(plan, indent=2) + "\n")
    return 0

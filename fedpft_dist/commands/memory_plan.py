"""``fedpft memory-plan``: what each rank holds in a FedPFT run on a decoder FM (LLaMA, Qwen2, Mistral),
computed, not measured.

Parameter counts come from the code itself: the FM's and the proxy's Hugging Face classes are built
on the meta device (no memory, no weights) from a ``config.json``, the proxy with the widths that
:func:`~fedpft_dist.models.proxy.plan_proxy` gives, and LoRA counts from the shapes of the modules the
engine targets. Byte counts follow what the code keeps alive and what autograd saves for each
operation (listed next to each term); activation sizes are estimates of that kind, not profiles.

    fedpft memory-plan --config configs/large/llama-7b.yaml \
        --model-config configs/large/llama-2-7b-config.json --world-size 8
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

GB = 1e9


def decoder_counts(config, keep_ratio: float, retained_layers, lora_r: int, lora_ffn: bool) -> dict:
    """Parameter counts of the FM, its proxy and the adapter (built on the meta device)."""
    import transformers

    from ..models.adapters import full_width_layers
    from ..models.families import ffn_modules, layout_for, transformer_layers
    from ..models.proxy import count_params, plan_proxy
    from ..models.proxy_arch import proxy_class_for, proxy_config_from

    with torch.device("meta"):
        fm = transformers.AutoModelForCausalLM.from_config(config)
        plan = plan_proxy(fm, retained_layers, keep_ratio)
        sizes = [plan.keep.get(l, w) for l, w in enumerate(plan.widths)]
        proxy = proxy_class_for(fm)(proxy_config_from(fm.config, sizes))
    layout = layout_for(config.model_type)
    ffn_layers = full_width_layers(proxy, fm, exclude=plan.compressed) if lora_ffn else []

    def lora(layers, paths) -> int:
        mods = [m for l in layers for m in (_get(transformer_layers(proxy)[l], p) for p in paths)]
        return sum(lora_r * (m.in_features + m.out_features) for m in mods)

    n = len(transformer_layers(fm))
    ffn_trainable = sum(p.numel() for l in plan.compressed
                        for m in sum(ffn_modules(transformer_layers(proxy)[l], layout), []) for p in m.parameters())
    return {"fm": count_params(fm), "proxy": count_params(proxy), "layers": n, "compressed_layers": plan.compressed,
            "kept": sorted(set(plan.keep.values())), "ffn_trainable": ffn_trainable,
            "embedding": fm.get_input_embeddings().weight.numel(),
            "lora_attention": lora(range(n), layout.attention), "lora_ffn": lora(ffn_layers, (*layout.rows, *layout.cols)),
            "lora_ffn_layers": ffn_layers}


def _get(module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def layer_activation_bytes(h: int, kv: int, i: int, lora_attention: bool, lora_ffn: bool, dropout: bool,
                           ffn_trainable: bool = False) -> int:
    """Bytes autograd keeps per token for one LLaMA-style layer in bf16 (what each op saves):
    two RMSNorms keep their fp32 input (2 x 4h); SDPA keeps q, k, v, its output (2(2h + 2kv));
    SwiGLU keeps gate, SiLU(gate), up (3 x 2i); a LoRA module keeps the input of its A matrix (2 B per
    element, plus a 1 B dropout mask when dropout > 0); trainable FFN weights (distillation) need
    the inputs of W_gate/W_up (the norm output, 2h) and of W_down (2i)."""
    total = 8 * h + 4 * h + 4 * kv + 6 * i
    if lora_attention:
        # with dropout each of q, k, v, o keeps its own dropped-out input and mask; without, q, k and
        # v share the norm output and o keeps the attention output
        total += 4 * 3 * h if dropout else 2 * 2 * h
    if lora_ffn:
        # gate and up (input h) and down (input i), the same way
        total += 2 * 3 * h + 3 * i if dropout else 2 * h + 2 * i
    if ffn_trainable:
        total += 2 * h + 2 * i
    return total


def memory_plan(cfg, model_config, world_size: int) -> dict:
    """Per-rank bytes of client training, distillation (layer level) and evaluation for ``cfg`` (a
    :class:`~fedpft_dist.config.Config`) on the FM of ``model_config`` over ``world_size`` ranks."""
    f, d = cfg.fed, cfg.distill
    c = decoder_counts(model_config, cfg.proxy.keep_ratio, cfg.proxy.retained_layers, f.lora_r,
                       f.lora_targets == "attention+ffn")
    b = {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.model.dtype]
    h, inter, vocab = model_config.hidden_size, model_config.intermediate_size, model_config.vocab_size
    kv = model_config.num_key_value_heads * (h // model_config.num_attention_heads)
    k = c["kept"][0] if c["kept"] else inter
    n, comp = c["layers"], len(c["compressed_layers"])
    drop = f.lora_dropout > 0
    lora = c["lora_attention"] + c["lora_ffn"]

    # -- client training: one rank trains its clients one after another ----------------------------
    tokens = f.batch_size * cfg.data.max_length
    per_layer = (comp * layer_activation_bytes(h, kv, k, True, False, drop)
                 + len(c["lora_ffn_layers"]) * layer_activation_bytes(h, kv, inter, True, True, drop)
                 + (n - comp - len(c["lora_ffn_layers"])) * layer_activation_bytes(h, kv, inter, True, False, drop))
    biggest = layer_activation_bytes(h, kv, inter, True, bool(c["lora_ffn_layers"]), drop)
    head = 2 * vocab + 4 * vocab + 4 * vocab   # bf16 logits, their fp32 copy for the loss, its gradient
    client = {
        "proxy weights": b * c["proxy"],
        "LoRA fp32 weights + grads + AdamW m, v (16 B/param)": 16 * lora,
        "activations without checkpointing": tokens * (per_layer + head),
        "activations with per-layer checkpointing": tokens * (n * 2 * h + biggest + head),
        "FM for plug-in evaluation (resident in fedpft train)": b * c["fm"],
    }

    # -- layer-level distillation: ZeRO-3 over all ranks ---------------------------------------------
    dtok = d.micro_batch * cfg.public_text.max_length
    student_act = (comp * layer_activation_bytes(h, kv, k, False, False, False, ffn_trainable=True)
                   + (n - comp) * layer_activation_bytes(h, kv, inter, False, False, False))
    distill = {
        "teacher (FM) shard": b * c["fm"] / world_size,
        "student (proxy) shard": b * c["proxy"] / world_size,
        "whole student before deepspeed.initialize partitions it": b * c["proxy"],
        "trainable FFN: bf16 param + grad, fp32 master + Adam m, v (16 B/param), sharded":
            16 * c["ffn_trainable"] / world_size,
        "gathered parameters (stage3_max_live_parameters = 1e9 elements, upper bound)":
            b * min(10**9, c["fm"]),
        "student activations (per micro-batch)": dtok * student_act,
        "hidden states of both models + fp32 loss terms": dtok * ((n + 1) * 2 * h * 2 + comp * 4 * h),
        # every rank computes every compressed layer's W_out W_in (d x d) for gate and up, the
        # teacher's without a graph, the student's keeping W_in^T (d x k) and the fp32 difference (d x d)
        "weight term: teacher products": comp * 2 * h * h * b,
        "weight term: student graph": comp * 2 * (b * h * k + 4 * h * h),
        "host RAM: distilled FFN tensors gathered to every rank (fp32)": 4 * c["ffn_trainable"],
    }

    # -- evaluation: every rank holds the whole FM -----------------------------------------------------
    etok = f.eval_batch_size * cfg.data.max_length
    # without a graph only one layer's tensors live at a time: q, k, v, attention output, gate, up,
    # SiLU(gate) and their product
    evaluate = {"FM weights": b * c["fm"], "one layer's activations (no graph)": etok * b * (2 * h + 2 * kv + 4 * inter),
                "logits + fp32 copy + log-softmax": etok * (2 + 4 + 4) * vocab}
    return {"counts": c, "world_size": world_size, "dtype_bytes": b, "client_tokens": tokens,
            "distill_tokens_per_micro_batch": dtok, "eval_tokens": etok,
            "client_training": client, "distillation": distill, "evaluation": evaluate}


def format_plan(plan: dict) -> str:
    c = plan["counts"]
    lines = [f"FM {c['fm']:,} params; proxy {c['proxy']:,} ({c['proxy'] / c['fm']:.1%}); {len(c['compressed_layers'])} "
             f"of {c['layers']} layers keep {c['kept']} FFN neurons; trainable FFN {c['ffn_trainable']:,}; "
             f"LoRA attention {c['lora_attention']:,}, FFN {c['lora_ffn']:,} (layers {c['lora_ffn_layers']})"]
    for phase in ("client_training", "distillation", "evaluation"):
        lines.append(f"\n{phase} (per rank, {plan['world_size']} ranks):")
        lines += [f"  {v / GB:9.2f} GB  {k}" for k, v in plan[phase].items()]
    return "\n".join(lines)


def run_memory_plan(cfg, model_config: Optional[str], world_size: int, json_out: Optional[str]) -> int:
    """Print the plan for ``cfg`` on the FM whose config.json is ``model_config`` (default:
    ``<model.path>/config.json``); also write it as JSON to ``json_out``."""
    from transformers import AutoConfig

    from ..errors import UserError

    if world_size < 1:
        raise UserError(f"--world-size must be >= 1, got {world_size}")
    path = Path(model_config) if model_config else Path(cfg.model.path) / "config.json"
    if not path.is_file():
        raise UserError(f"--model-config: {path} not found (give the FM's config.json)")
    raw = json.loads(path.read_text())
    model_config_obj = AutoConfig.for_model(raw.pop("model_type"), **raw)
    plan = memory_plan(cfg, model_config_obj, world_size)
    print(format_plan(plan))
    if json_out:
        Path(json_out).write_text(json.dumps(plan, indent=2) + "\n")
    return 0

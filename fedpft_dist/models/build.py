"""Stage 1 as functions: build the proxy (or FedOT's emulator) of a config's FM, save it, report how
close it is to the FM on held-out public text. The caller supplies the public text."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from ..config import Config
from ..environment import fix_mmap_threshold, peak_memory_bytes, reset_peak_memory, resident_bytes, return_freed_memory
from ..errors import UserError
from ..fsutil import atomic_directory
from ..fingerprint import emulator_fingerprint, proxy_fingerprint
from .emulator import build_emulator, emulator_targets, fedot_layers
from .families import ffn_modules, layout_for, transformer_layers
from .loading import DTYPES, config_overrides, default_task, load_model, load_tokenizer, resolve_model_dir
from .proxy import (PROXY_META, ActivationMoments, ActivationRecorder, MomentRecorder, compensated_projection,
                    count_params, describe_layout, hidden_state_errors, plan_proxy, save_proxy, select_neurons,
                    weight_saliency_scores)
from .sharded import meta_parameters
from .streaming import LayerStream, ShardedWriter, batches_of

log = logging.getLogger(__name__)


@torch.no_grad()
def greedy_sample(model, tokenizer, prompt: str, tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def construction_task(task: str, fm_dir: Path) -> str:
    """The form of the FM a proxy or emulator is built from: its own (causal-lm for decoders, the bare
    encoder otherwise) unless ``model.task`` asks for another backbone. A classification head is the
    clients' (sized by the dataset's labels, trained by them), so a client model never carries one
    from construction: a decoder's proxy keeps the LM head and loads as a classifier with a fresh one."""
    return default_task(fm_dir) if task in ("auto", "sequence-classification") else task


def make_proxy(cfg: Config, out: Path, public: Callable[[object, str, int], torch.Tensor]) -> dict:
    """Build the proxy that ``cfg`` describes and save it to ``out``; returns its report.
    ``public(tokenizer, split, n)`` gives ``n`` chunks of public text ('train' for calibration,
    'held_out' for the error report).

    The FM is read one transformer layer at a time (:class:`~.streaming.LayerStream`): a layer's
    saliency needs only its own weights and the hidden states that reach it, so each layer is read,
    scored on the calibration text, narrowed (and its output projection refitted), run on the
    held-out text beside the FM's, written to the proxy's files and dropped before the next. The
    host holds the root (embeddings, final norm, output layer), one layer of each model, the hidden
    states of the text and the proxy file being filled, never the whole FM or proxy; the numbers
    are those of whole forwards (the same layers on the same inputs)."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.run.seed)
    fm_dir = resolve_model_dir(cfg.model.path)
    task = construction_task(cfg.model.task, fm_dir)
    p = cfg.proxy
    log.info("reading FM %s (%s) one layer at a time", fm_dir, task)
    fm = LayerStream.open(fm_dir, task, cfg.model.dtype, read_root=False,
                          **config_overrides(fm_dir, task, cfg.model.num_labels))
    set_generation_config(fm.model, fm_dir)
    tokenizer = load_tokenizer(fm_dir)
    plan = plan_proxy(fm.model, p.retained_layers, p.keep_ratio, p.keep_ratios)
    calib = public(tokenizer, "train", p.calibration_chunks) if p.saliency != "weight" or p.compensate else None
    held = public(tokenizer, "held_out", p.eval_chunks)
    if len(held) == 0:
        raise UserError("no held-out text to measure the proxy on (public_text is too small)")
    if calib is not None:
        log.info("%s on %d calibration chunks of %d tokens", "activation saliency (%s)" % p.saliency
                 if p.saliency != "weight" else "weight saliency", len(calib), calib.shape[1])
    if p.compensate and plan.compressed:
        _warn_few_tokens(calib, max(plan.keep.values()))
    # the host memory of the construction: from here (the model's classes and the text are in place)
    if cfg.run.exact_memory:
        fix_mmap_threshold()
    return_freed_memory()
    start = resident_bytes()
    reset_peak_memory(torch.device("cpu"))
    fm.read_root()
    proxy = LayerStream(proxy_on_meta(fm.model, plan, cfg.model.dtype))
    proxy.share_root(fm)
    fm_params, proxy_params = count_params(fm.model), count_params(proxy.model)

    def describe(kept: dict[int, list[int]]) -> dict:
        return _description(cfg, fm_dir, task, fm.model, plan, kept, fm_params, proxy_params)

    def meta(kept: dict[int, list[int]]) -> dict:
        return {**describe(kept), "fingerprint": proxy_fingerprint(cfg, fm_dir)}

    built = _stream_proxy(cfg, task, fm, proxy, plan, calib, held, out, tokenizer, meta)
    errors = built["errors"]
    compressed_err = [errors[l] for l in plan.compressed]
    return {
        **describe(built["kept"]),
        "hidden_error_per_layer": errors,
        "hidden_error_mean": sum(errors) / len(errors),
        "hidden_error_last": errors[-1],
        "hidden_error_compressed_mean": sum(compressed_err) / max(1, len(compressed_err)),
        "held_out_chunks": int(len(held)),
        "chunk_tokens": int(held.shape[1]),
        **built["extra"],
        "proxy_dir": str(out),
        "fm_bytes_read": built["read"],
        # the most host memory the construction held over what the process held before it (Linux)
        "host_peak_bytes": _growth(start),
        "seconds": time.perf_counter() - t0,
        "compensate_seconds": built["compensate_seconds"],
    }


def _description(cfg: Config, fm_dir: Path, task: str, fm, plan, kept: dict[int, list[int]], fm_params: int,
                 proxy_params: int) -> dict:
    """What a proxy's report and its ``fedpft_proxy.json`` say about its construction."""
    p = cfg.proxy
    return {
        **describe_layout(fm),
        "fm_path": str(fm_dir),
        "task": task,
        "num_layers": plan.num_layers,
        "retained_layers": plan.retained,
        "compressed_layers": plan.compressed,
        "keep_ratio": p.keep_ratio,
        "keep_ratios": list(p.keep_ratios),
        "saliency": p.saliency,
        "compensated": p.compensate,
        "seed": cfg.run.seed,
        "fm_ffn_widths": plan.widths,
        "proxy_ffn_widths": [plan.keep.get(l, plan.widths[l]) for l in range(plan.num_layers)],
        "kept_indices": {str(l): idx for l, idx in kept.items()},
        "fm_params": fm_params,
        "proxy_params": proxy_params,
        "param_ratio": proxy_params / fm_params,
    }


def _growth(start: Optional[int]) -> Optional[int]:
    peak = peak_memory_bytes(torch.device("cpu"))
    return None if peak is None or start is None else max(0, peak - start)


def set_generation_config(model, model_dir: Path) -> None:
    """The generation settings of ``model_dir`` (``from_pretrained`` reads them; a model built from
    its config has the config's defaults)."""
    if (Path(model_dir) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(model_dir), local_files_only=True)


def proxy_on_meta(fm, plan, dtype: str):
    """The proxy's model of ``plan`` (``fm``'s class with the planned FFN widths), on the meta device."""
    from .proxy_arch import proxy_class_for, proxy_config_from

    sizes = [plan.keep.get(l, w) for l, w in enumerate(plan.widths)]
    config = proxy_config_from(fm.config, sizes)
    with meta_parameters():
        proxy = proxy_class_for(fm)._from_config(config, dtype=DTYPES[dtype], attn_implementation="sdpa")
    if getattr(fm, "generation_config", None) is not None and hasattr(proxy, "generation_config"):
        proxy.generation_config = fm.generation_config
    return proxy


def persistent_buffers(model) -> dict[str, torch.Tensor]:
    """The buffers ``model``'s state dict holds (``save_pretrained`` writes them with the weights)."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {n: t.detach() for n, t in model.state_dict(keep_vars=True).items() if n not in params}


def _warn_few_tokens(calib: torch.Tensor, widest: int) -> None:
    if calib.numel() < 8 * widest:
        log.warning("proxy.compensate: %d calibration tokens for up to %d kept neurons per layer: the fit may "
                    "overfit them; raise proxy.calibration_chunks (at least %d chunks)", calib.numel(), widest,
                    -(-8 * widest // calib.shape[1]))


def _narrowed(tensors: dict[str, torch.Tensor], layout, kept: list[int]) -> dict[str, torch.Tensor]:
    """One layer's parameters with its FFN cut to neurons ``kept`` (rows of W_in / W_gate, W_up and
    their biases; columns of W_out / W_down)."""
    out = dict(tensors)
    index = torch.as_tensor(kept, dtype=torch.long)
    for path in layout.rows:
        for kind in ("weight", "bias"):
            if f"{path}.{kind}" in out:
                out[f"{path}.{kind}"] = out[f"{path}.{kind}"].index_select(0, index)
    for path in layout.cols:
        out[f"{path}.weight"] = out[f"{path}.weight"].index_select(1, index)
    return out


@torch.no_grad()
def _stream_proxy(cfg: Config, task: str, fm: LayerStream, proxy: LayerStream, plan,
                  calib: Optional[torch.Tensor], held: torch.Tensor, out: Path, tokenizer,
                  meta: Callable[[dict], dict]) -> dict:
    """The layer-by-layer pass of :func:`make_proxy`, the proxy written to ``out``: the kept neurons,
    the hidden-state errors, the next-token losses and samples of a decoder, the seconds of the
    refits."""
    p = cfg.proxy
    layout = layout_for(fm.model.config.model_type)
    n = len(fm.layers)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    calib_batches = batches_of(calib, p.batch_size) if calib is not None else []
    held_batches = batches_of(held, p.batch_size)
    calib_in = fm.layer_inputs(calib_batches) if calib is not None else []
    held_in = fm.layer_inputs(held_batches)
    h_calib = h_fm = h_px = None
    num = torch.zeros(n, dtype=torch.float64)
    den = torch.zeros(n, dtype=torch.float64)
    kept: dict[int, list[int]] = {}
    compensate_s = 0.0 if p.compensate and plan.compressed else None
    last_calib = max(plan.compressed, default=-1)
    with atomic_directory(out) as tmp:
        writer = ShardedWriter(tmp, int(p.max_shard_gb * 1e9))
        for name, tensor in {**proxy.root_state(), **persistent_buffers(proxy.model)}.items():
            writer.add(name, tensor)
        for l in tqdm(range(n), desc="proxy", unit="layer", dynamic_ncols=True, disable=n < 4):
            with fm.layer(l) as layer:
                tensors = {name: t.detach() for name, t in layer.named_parameters()}
                calib_out = None
                if l in plan.keep:
                    scores, moments, calib_out = _layer_saliency(fm.model, l, calib_in, calib_batches, h_calib, cfg)
                    kept[l] = select_neurons(scores, plan.keep[l], gen)
                    tensors = _narrowed(tensors, layout, kept[l])
                    if p.compensate:
                        t1 = time.perf_counter()
                        for path, src in zip(layout.cols, ffn_modules(layer, layout)[1]):
                            w, b = compensated_projection(src.weight, src.bias, moments, kept[l], p.compensate_ridge)
                            tensors[f"{path}.weight"] = w
                            if b is not None:
                                tensors[f"{path}.bias"] = b
                        compensate_s += time.perf_counter() - t1
                if l < last_calib and calib_in:
                    h_calib = calib_out if calib_out is not None else fm.run_layer(layer, calib_in, h_calib)
                h_fm = fm.run_layer(layer, held_in, h_fm)
            with proxy.layer(l, tensors) as player:
                h_px = proxy.run_layer(player, held_in, h_px)
            for name, tensor in tensors.items():
                writer.add(f"{proxy.layers_prefix}.{l}.{name}", tensor)
            if l < n - 1:
                _add_errors(num, den, l, h_fm, h_px)
            del tensors
        # the last layer's hidden states as the model reports them (after a decoder's final norm)
        kwargs = {"use_cache": False} if layout.family == "decoder" else {}

        def last_hidden(model, ids):
            base = getattr(model, "base_model", model)
            return base(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).last_hidden_state

        _add_errors(num, den, n - 1, fm.tail(held_batches, h_fm, last_hidden), proxy.tail(held_batches, h_px, last_hidden))
        extra = {}
        if task == "causal-lm":
            # what a client training on the proxy starts from: its next-token loss beside the FM's
            extra["held_out_loss_fm"], extra["held_out_loss_proxy"] = (
                _next_token_loss(stream, held_batches, h) for stream, h in ((fm, h_fm), (proxy, h_px)))
        del h_calib, h_fm, h_px
        writer.close()
        read = fm.bytes_read
        extra.update(_write_rest(cfg, task, fm, proxy, tokenizer, tmp))
        errors = (num / den.clamp_min(1e-12)).tolist()
        (tmp / PROXY_META).write_text(json.dumps(meta(kept), indent=2) + "\n")
    return {"kept": kept, "errors": errors, "extra": extra, "compensate_seconds": compensate_s, "read": read}


def make_emulator(cfg: Config, out: Path, public: Callable[[object, str, int], torch.Tensor]) -> dict:
    """The FedOT baseline's emulator (the adapter layers and evenly spaced middle layers; see
    :mod:`fedpft_dist.models.emulator`), saved like a proxy to ``out``; returns its report."""
    t0 = time.perf_counter()
    fm_dir = resolve_model_dir(cfg.model.path)
    task = construction_task(cfg.model.task, fm_dir)
    fm = load_model(fm_dir, task, cfg.model.dtype, num_labels=cfg.model.num_labels)
    tokenizer = load_tokenizer(fm_dir)
    n = len(transformer_layers(fm))
    kept, sizing = fedot_layers(cfg, fm)
    emulator = build_emulator(fm, kept)
    targets = emulator_targets(kept, n)
    b, t = sizing["adapter_layers"]
    middle = list(range(b, len(kept) - t))
    held = public(tokenizer, "held_out", cfg.proxy.eval_chunks)
    errors = hidden_state_errors(fm, emulator, held, cfg.proxy.batch_size, targets)
    report = {**describe_layout(fm), "kind": "emulator", "fm_path": str(fm_dir), "task": task, "num_layers": n,
              "layer_map": kept, "target_layers": targets, "compressed_layers": middle,
              "retained_layers": list(range(b)) + list(range(len(kept) - t, len(kept))),
              "fm_params": count_params(fm), "proxy_params": count_params(emulator), **sizing,
              "hidden_error_per_layer": errors, "hidden_error_mean": sum(errors) / len(errors)}
    meta = {k: v for k, v in report.items() if not k.startswith("hidden_error")}
    meta["fingerprint"] = emulator_fingerprint(cfg, fm_dir)
    save_proxy(emulator, tokenizer, out, meta)
    report["proxy_dir"] = str(out)
    report["seconds"] = time.perf_counter() - t0
    return report


def _write_rest(cfg: Config, task: str, fm: LayerStream, proxy: LayerStream, tokenizer, tmp: Path) -> dict:
    """The proxy's config, generation settings and tokenizer written beside its weights; a
    decoder's greedy samples of FM and proxy (the proxy as written) when proxy.sample_tokens asks."""
    p = cfg.proxy
    proxy.model.config.architectures = [type(proxy.model).__name__]
    proxy.model.config.save_pretrained(tmp)
    if getattr(proxy.model, "can_generate", lambda: False)():
        proxy.model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if task != "causal-lm" or p.sample_tokens == 0:
        return {}
    out = {"sample_prompt": p.sample_prompt}
    with fm.offloaded() as model:
        out["sample_fm"] = greedy_sample(model, tokenizer, p.sample_prompt, p.sample_tokens)
    # the proxy as written, its root the FM's (the same tensors)
    written = LayerStream.open(tmp, task, cfg.model.dtype, root_from=fm)
    set_generation_config(written.model, tmp)
    with written.offloaded() as model:
        out["sample_proxy"] = greedy_sample(model, tokenizer, p.sample_prompt, p.sample_tokens)
    return out


def _layer_saliency(fm, l: int, inputs: list, batches: list[torch.Tensor], hidden: Optional[list[torch.Tensor]],
                    cfg: Config) -> tuple[torch.Tensor, Optional[ActivationMoments], Optional[list[torch.Tensor]]]:
    """Layer ``l``'s neuron scores (``fm``'s layer ``l`` real), with proxy.compensate the moments of
    its FFN activations over the calibration text, and the layer's outputs on that text (None where
    the weights alone decide: no run). One run of the layer over ``inputs`` (the first layer's),
    ``hidden`` being the hidden states that reach layer ``l``."""
    p = cfg.proxy
    if p.saliency == "weight" and not p.compensate:
        return weight_saliency_scores(fm, [l])[l], None, None
    layer = transformer_layers(fm)[l]
    outputs = []
    with ActivationRecorder(fm, [l] if p.saliency != "weight" else [], p.eps) as rec, \
            MomentRecorder(fm, [l] if p.compensate else []) as moments:
        for b, (h, args, kwargs) in enumerate(inputs):
            rec.mask = torch.ones_like(batches[b])
            y = layer(h if hidden is None else hidden[b], *args, **kwargs)
            outputs.append(y[0] if isinstance(y, tuple) else y)
    if p.saliency == "weight":
        scores = weight_saliency_scores(fm, [l])[l]
    elif p.saliency == "mean_abs":
        scores = rec.stats[l].mean_abs().float().cpu()
    else:
        scores = (1.0 - rec.stats[l].apoz()).float().cpu()
    return scores, (moments.moments[l] if p.compensate else None), outputs


def _add_errors(num: torch.Tensor, den: torch.Tensor, l: int, fm_hidden: list[torch.Tensor],
                proxy_hidden: list[torch.Tensor]) -> None:
    """Layer ``l``'s squared error and squared norm, batch after batch (float32 sums per batch added
    in float64, as :func:`~.proxy.hidden_error_sums` adds them)."""
    for t, s in zip(fm_hidden, proxy_hidden):
        num[l] += (t.float() - s.float()).pow(2).sum().double()
        den[l] += t.float().pow(2).sum().double()


def _next_token_loss(stream: LayerStream, batches: list[torch.Tensor], last: list[torch.Tensor]) -> float:
    """The causal LM's mean next-token loss (nats) over ``batches`` from its last layer's outputs."""
    from .lm import IGNORE, next_token_labels, next_token_loss_sum

    def loss(model, ids):
        mask = torch.ones_like(ids)
        labels = next_token_labels(ids, mask)
        value = next_token_loss_sum(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, labels)
        return torch.stack([value.double(), (labels[:, 1:] != IGNORE).sum().double()])

    sums = torch.zeros(2, dtype=torch.float64)
    for part in stream.tail(batches, last, loss):
        sums += part
    total, count = sums.tolist()
    return total / max(count, 1)

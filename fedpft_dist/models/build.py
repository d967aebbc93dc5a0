"""Stage 1 as functions: build the proxy (or FedOT's emulator) of a config's FM, save it, report how
close it is to the FM on held-out public text. The caller supplies the public text."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import Config
from ..fingerprint import emulator_fingerprint, proxy_fingerprint
from .emulator import build_emulator, emulator_targets, fedot_layers
from .families import transformer_layers
from .loading import default_task, load_model, load_tokenizer, resolve_model_dir
from .proxy import (MomentRecorder, activation_moments, activation_saliency_scores, build_proxy, compensate_proxy,
                    count_params, describe_layout, hidden_state_errors, next_token_losses, plan_proxy, save_proxy,
                    select_neurons, weight_saliency_scores)

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
    'held_out' for the error report)."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.run.seed)
    fm_dir = resolve_model_dir(cfg.model.path)
    task = construction_task(cfg.model.task, fm_dir)
    log.info("loading FM %s (%s)", fm_dir, task)
    fm = load_model(fm_dir, task, cfg.model.dtype, num_labels=cfg.model.num_labels)
    fm.eval()
    tokenizer = load_tokenizer(fm_dir)
    p = cfg.proxy
    plan = plan_proxy(fm, p.retained_layers, p.keep_ratio, p.keep_ratios)

    # -- saliency ----------------------------------------------------------------------------------
    calib = public(tokenizer, "train", p.calibration_chunks) if p.saliency != "weight" or p.compensate else None
    scores, moments = _saliency(fm, plan.compressed, calib, cfg)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    kept = {l: select_neurons(scores[l], plan.keep[l], gen) for l in plan.compressed}

    # -- construction ------------------------------------------------------------------------------
    proxy = build_proxy(fm, kept)
    fm_params, proxy_params = count_params(fm), count_params(proxy)
    compensate_s = _compensate(proxy, fm, kept, calib, moments, cfg) if p.compensate and plan.compressed else None

    # -- evaluation on held-out text ---------------------------------------------------------------
    held = public(tokenizer, "held_out", p.eval_chunks)
    errors = hidden_state_errors(fm, proxy, held, p.batch_size)
    compressed_err = [errors[l] for l in plan.compressed]
    report = {
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
        "proxy_ffn_widths": [len(kept[l]) if l in kept else plan.widths[l] for l in range(plan.num_layers)],
        "kept_indices": {str(l): idx for l, idx in kept.items()},
        "fm_params": fm_params,
        "proxy_params": proxy_params,
        "param_ratio": proxy_params / fm_params,
        "hidden_error_per_layer": errors,
        "hidden_error_mean": sum(errors) / len(errors),
        "hidden_error_last": errors[-1],
        "hidden_error_compressed_mean": sum(compressed_err) / max(1, len(compressed_err)),
        "held_out_chunks": int(len(held)),
        "chunk_tokens": int(held.shape[1]),
    }
    if task == "causal-lm":
        # what a client training on the proxy starts from: its next-token loss beside the FM's
        report["held_out_loss_fm"], report["held_out_loss_proxy"] = next_token_losses([fm, proxy], held, p.batch_size)
    if task == "causal-lm" and p.sample_tokens > 0:
        report["sample_prompt"] = p.sample_prompt
        report["sample_fm"] = greedy_sample(fm, tokenizer, p.sample_prompt, p.sample_tokens)
        report["sample_proxy"] = greedy_sample(proxy, tokenizer, p.sample_prompt, p.sample_tokens)

    meta = {k: v for k, v in report.items() if not k.startswith(("hidden_error", "sample_", "held_out", "chunk_"))}
    meta["fingerprint"] = proxy_fingerprint(cfg, fm_dir)
    save_proxy(proxy, tokenizer, out, meta)
    report["proxy_dir"] = str(out)
    report["seconds"] = time.perf_counter() - t0
    report["compensate_seconds"] = compensate_s
    return report


def _saliency(fm, layers: list[int], calib: Optional[torch.Tensor], cfg: Config
              ) -> tuple[dict[int, torch.Tensor], Optional[dict]]:
    """The neuron scores of the compressed ``layers``; with activation saliency and proxy.compensate,
    also the activations' moments, taken in the same forward passes (else None)."""
    p = cfg.proxy
    if p.saliency == "weight":
        return weight_saliency_scores(fm, layers), None
    log.info("activation saliency (%s) on %d calibration chunks of %d tokens", p.saliency, len(calib), calib.shape[1])
    with MomentRecorder(fm, layers if p.compensate else []) as rec:
        scores = activation_saliency_scores(fm, layers, calib, p.batch_size, p.saliency, p.eps)
    return scores, (rec.moments if p.compensate else None)


def _compensate(proxy, fm, kept: dict[int, list[int]], calib: torch.Tensor, moments: Optional[dict],
                cfg: Config) -> float:
    """proxy.compensate: refit the compressed FFNs' output projections on the FM's activations over
    the calibration chunks (``moments``, else taken now); returns the seconds it took."""
    t0 = time.perf_counter()
    log.info("compensation: refitting %d output projections on %d calibration chunks of %d tokens",
             len(kept), len(calib), calib.shape[1])
    widest = max(len(idx) for idx in kept.values())
    if calib.numel() < 8 * widest:
        log.warning("proxy.compensate: %d calibration tokens for up to %d kept neurons per layer: the fit may "
                    "overfit them; raise proxy.calibration_chunks (at least %d chunks)", calib.numel(), widest,
                    -(-8 * widest // calib.shape[1]))
    if moments is None:
        moments = activation_moments(fm, sorted(kept), calib, cfg.proxy.batch_size)
    compensate_proxy(proxy, fm, kept, moments, cfg.proxy.compensate_ridge)
    return time.perf_counter() - t0


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

"""``fedpft distill``: layer-level distillation of the proxy against the FM on every rank of the job."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ..alignment.job import DistillSettings, run_distillation
from ..config import Config, config_to_dict, write_resolved_config
from ..fsutil import atomic_write_json
from ..models.loading import load_model, load_tokenizer, resolve_model_dir
from ..models.proxy import load_proxy, read_proxy_meta, save_proxy
from ..runtime import Runtime, init_from_config
from .proxy import make_emulator, make_proxy, public_chunks

log = logging.getLogger(__name__)


def settings_from(cfg: Config, run_dir: Path) -> DistillSettings:
    d = cfg.distill
    return DistillSettings(
        zero_stage=d.zero_stage, batch_size=d.batch_size, micro_batch=d.micro_batch, steps=d.steps, epoch_fraction=d.epoch_fraction,
        lr=d.lr, warmup_ratio=d.warmup_ratio, weight_decay=d.weight_decay, grad_clip=d.grad_clip, alpha=d.alpha,
        seed=cfg.run.seed, eval_batch=cfg.proxy.batch_size, checkpoint_every=d.checkpoint_every,
        checkpoint_dir=str(run_dir / "checkpoints" / "distill"), resume=d.resume,
        log_path=str(run_dir / "distill_log.jsonl"), tag="distill")


def ensure_proxy(cfg: Config, rt: Runtime, emulator: bool = False) -> Path:
    """The proxy to distil (FedOT: the emulator); rank 0 builds it first when it does not exist yet."""
    if emulator:
        proxy_dir = Path(cfg.run.dir) / "emulator"
    else:
        proxy_dir = Path(cfg.distill.proxy or Path(cfg.run.dir) / "proxy")
    if rt.is_main and not (proxy_dir / "config.json").exists():
        if cfg.distill.proxy and not emulator:
            from ..errors import UserError

            raise UserError(f"distill.proxy: {proxy_dir} is not a proxy directory")
        log.info("no %s at %s yet: building it", "emulator" if emulator else "proxy", proxy_dir)
        report = make_emulator(cfg) if emulator else make_proxy(cfg)
        name = "emulator.json" if emulator else "proxy.json"
        atomic_write_json(Path(cfg.run.dir) / name, {"config": config_to_dict(cfg), **report})
    rt.comm.barrier(name="distill/proxy-ready")
    return proxy_dir


def distill_proxy(cfg: Config, rt: Runtime, emulator: bool = False) -> Path:
    """Layer-level distillation of the proxy (FedOT: of the emulator, each kept middle layer against
    the FM layer it came from) on all ranks of ``rt``; rank 0 saves the result and ``distill.json``.
    Returns the distilled directory (the same on every rank)."""
    t0 = time.perf_counter()
    run_dir = Path(cfg.run.dir)
    proxy_dir = ensure_proxy(cfg, rt, emulator)
    meta = read_proxy_meta(proxy_dir)
    fm_dir = resolve_model_dir(cfg.model.path)
    tokenizer = load_tokenizer(proxy_dir)
    train = public_chunks(cfg, tokenizer, "train", cfg.distill.max_chunks)
    held = public_chunks(cfg, tokenizer, "held_out", cfg.distill.eval_chunks)
    student, _ = load_proxy(proxy_dir, task="base", dtype=cfg.model.dtype)
    layers = meta["compressed_layers"]
    result = run_distillation(rt, lambda: load_model(fm_dir, "base", cfg.model.dtype), student, layers,
                              train, held, settings_from(cfg, run_dir), layer_map=meta.get("layer_map"))
    out = run_dir / "emulator_distilled" if emulator else Path(cfg.distill.out or run_dir / "proxy_distilled")
    summary = {
        "proxy_in": str(proxy_dir), "proxy_out": str(out), "fm_path": str(fm_dir),
        "world_size": rt.world_size, "zero_stage": cfg.distill.zero_stage, "steps": result.steps,
        "compressed_layers": layers, "trainable_params": result.trainable_params,
        "train_chunks": int(len(train)), "held_out_chunks": int(len(held)), "chunk_tokens": int(train.shape[1]),
        "loss_first": result.losses[0] if result.losses else None,
        "loss_last": result.losses[-1] if result.losses else None, "losses": result.losses,
        "hidden_error_per_layer_before": result.errors_before,
        "hidden_error_per_layer_after": result.errors_after,
        "hidden_error_before": sum(result.errors_before) / len(result.errors_before),
        "hidden_error_after": sum(result.errors_after) / len(result.errors_after),
        "step_seconds_median": result.step_seconds, "peak_memory_mb_per_rank": result.peak_memory_mb,
        "teacher_bytes_held_per_rank": result.teacher_bytes_held, "teacher_bytes_full": result.teacher_bytes_full,
    }
    if rt.is_main:
        plain, plain_meta = load_proxy(proxy_dir, dtype=cfg.model.dtype)
        _, unexpected = plain.base_model.load_state_dict(result.ffn_state, strict=False)
        if unexpected:
            raise RuntimeError(f"distilled tensors do not fit the proxy: {unexpected[:3]}")
        plain_meta["distilled"] = {k: summary[k] for k in ("steps", "zero_stage", "world_size",
                                                            "hidden_error_before", "hidden_error_after")}
        save_proxy(plain, tokenizer, out, plain_meta)
        summary["seconds"] = time.perf_counter() - t0
        atomic_write_json(run_dir / "distill.json", {"config": config_to_dict(cfg), **summary})
        print(f"distilled {len(layers)} layers for {result.steps} steps on {rt.world_size} rank(s), ZeRO-"
              f"{cfg.distill.zero_stage}: loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f}; "
              f"hidden-state error on held-out text {summary['hidden_error_before']:.4f} -> "
              f"{summary['hidden_error_after']:.4f}; saved {out}", flush=True)
    rt.comm.barrier(name="distill/saved")
    return out


def run_distill(cfg: Config) -> int:
    rt = init_from_config(cfg)
    try:
        if rt.is_main:
            write_resolved_config(cfg)
        distill_proxy(cfg, rt)
    finally:
        rt.shutdown()
    return 0

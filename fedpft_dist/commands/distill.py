"""``fedpft distill``: layer-level distillation of the proxy against the FM on every rank of the job."""
from __future__ import annotations

from ..alignment.stages import distill_proxy
from ..config import Config, write_resolved_config
from ..environment import StopSignals
from ..run_layout import RunLayout
from ..runtime import init_from_config
from .ownership import owning_run_dir


def run_distill(cfg: Config) -> int:
    # SIGTERM / SIGUSR1 end the distillation after the current step, with a checkpoint (exit 75)
    with StopSignals(), init_from_config(cfg) as rt, owning_run_dir(cfg, "distill", rt):
        if rt.is_main:
            write_resolved_config(cfg)
        done = distill_proxy(cfg, rt, RunLayout.from_config(cfg))
        if rt.is_main:
            print(format_distilled(done.report, len(done.report["compressed_layers"])), flush=True)
    return 0


def format_distilled(r: dict, layers: int) -> str:
    line = (f"distilled {layers} layers for {r['steps']} steps on {r['world_size']} rank(s), ZeRO-"
            f"{r['zero_stage']}: loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}; "
            f"hidden-state error on held-out text {r['hidden_error_before']:.4f} -> "
            f"{r['hidden_error_after']:.4f}")
    if "fidelity_after" in r:
        line += (f"; LoRA gradient cosine with the FM {r['fidelity_before']['grad_cosine']:.4f} -> "
                 f"{r['fidelity_after']['grad_cosine']:.4f}")
    if not r["finite"]:
        line += "; NOT FINITE: the proxy was saved undistilled (lower distill.lr)"
    return line + f"; saved {r['proxy_out']}"

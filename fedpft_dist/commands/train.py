"""``fedpft train``: a federated run on every rank of the job; rank 0 prints the result."""
from __future__ import annotations

from ..config import Config
from ..errors import Preempted
from ..federation.engine import Engine
from ..runtime import init_from_config
from .ownership import owning_run_dir


def run_train(cfg: Config) -> int:
    with init_from_config(cfg) as rt, owning_run_dir(cfg, "train", rt):
        summary = Engine(cfg, rt).run()
        if summary["stop_reason"] == "signal":
            raise Preempted(f"stopped after round {summary['rounds_done']} of {summary['rounds']} on a stop signal, "
                            f"with a checkpoint in {cfg.run.dir}; continue with fed.resume=true")
        if rt.is_main:
            print(format_summary(summary, cfg.run.dir), flush=True)
    return 0


def format_summary(s: dict, run_dir: str) -> str:
    if s["stopped_early"]:
        return (f"{s['method']}: stopped after round {s['rounds_done']} of {s['rounds']} (fed.stop_after); "
                f"continue with fed.resume=true")
    head = f"{s['method']}: {s['rounds']} rounds on {s['world_size']} rank(s): "
    tail = f"; {s['wall_seconds']:.0f} s; results in {run_dir}"
    if s.get("final_perplexity") is not None:
        return (head + f"perplexity {s['final_perplexity']:.2f} (best {s['best_perplexity']:.2f}), next-token "
                f"accuracy {s['final_next_token_accuracy']:.4f}" + tail)
    return (head + f"accuracy {s['final_accuracy']:.4f} (best {s['best_accuracy']:.4f}), macro-F1 "
            f"{s['final_macro_f1']:.4f}" + tail)

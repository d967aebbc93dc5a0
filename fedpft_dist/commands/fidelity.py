"""``fedpft fidelity --trajectory DIR``: the client model of a config scored along a fixed adapter
trajectory (gradient cosine with its bootstrap interval, the common-layer cosine, the gradient norm
ratio and the update transfer at every saved adapter), printed as a table and written as JSON."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import Config, write_resolved_config
from ..federation.trajectory import load_trajectory, score_trajectory
from ..fsutil import atomic_write_json
from ..run_layout import RunLayout
from ..runtime import init_from_config


def run_fidelity(cfg: Config, trajectory: str, json_out: Optional[str]) -> int:
    path = Path(json_out) if json_out else RunLayout.from_config(cfg).trajectory_fidelity
    adapters = load_trajectory(Path(trajectory))
    with init_from_config(cfg) as rt:
        if rt.is_main:
            write_resolved_config(cfg)
            print(f"scoring {cfg.fed.method} on {cfg.model.path} along {len(adapters.rounds)} adapters of {trajectory}",
                  flush=True)
        show = (lambda row: print(format_row(row), flush=True)) if rt.is_main else None
        result = score_trajectory(cfg, rt, adapters, show)
        result["trajectory"] = str(trajectory)
        if rt.is_main:
            atomic_write_json(path, result)
            print(format_summary(result, path), flush=True)
    return 0


def _f(value: Optional[float], spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def format_row(r: dict) -> str:
    interval = f"[{_f(r.get('grad_cosine_low'))}, {_f(r.get('grad_cosine_high'))}]"
    return (f"round {r['round']:>4}: cosine {_f(r.get('grad_cosine'))} {interval}  common "
            f"{_f(r.get('grad_cosine_common'))}  per example {_f(r.get('grad_example_cosine'))}  norm ratio "
            f"{_f(r.get('grad_norm_ratio'))}  transfer {_f(r.get('transfer'))}  ({r['seconds']:.1f} s)")


def format_summary(r: dict, path: Path) -> str:
    return (f"mean over {len(r['rounds'])} adapters: cosine {_f(r['mean_grad_cosine'])}, common-layer cosine "
            f"{_f(r['mean_grad_cosine_common'])}, per-example cosine {_f(r['mean_grad_example_cosine'])}, "
            f"norm ratio {_f(r['mean_grad_norm_ratio'])}, transfer {_f(r['mean_transfer'])}; cost: {r['build_seconds']:.1f} s to build the models, "
            f"{r['score_seconds']:.1f} s to score ({r['probe_examples']} probe examples, {r['world_size']} rank(s)); "
            f"wrote {path}")

"""Where a run's artifacts live: every path derived from the config in one place.

    run.dir/
      config.yaml            the resolved config (fedpft_dist.config.write_resolved_config)
      proxy/                 Stage 1 (proxy.out overrides)      proxy.json   its report
      proxy_distilled/       Stage 2 (distill.out overrides)    distill.json, distill_log.jsonl
      emulator/              FedOT's emulator                   emulator.json
      emulator_distilled/    FedOT's distilled emulator (distill.emulator_out overrides)
      checkpoints/rounds/    federated round checkpoints
      checkpoints/distill/   layer-level distillation checkpoints
      metrics.jsonl, summary.json, adapter/   federated training
      round_adapters/        every round's global adapter (fed.save_round_adapters)
      trajectory_fidelity.json   fedpft fidelity --trajectory
      tensorboard/, wandb/   the trackers of run.report_to (fedpft_dist.federation.trackers)
      bench.json             fedpft bench (bench.out overrides)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    run_dir: Path
    proxy: Path                # where Stage 1 writes the proxy
    proxy_report: Path
    distill_source: Path       # the proxy Stage 2 distils: distill.proxy, else the proxy above
    source_given: bool         # distill.proxy names an existing proxy (never built here)
    distilled: Path
    distill_report: Path
    distill_log: Path
    distill_checkpoints: Path
    emulator: Path
    emulator_report: Path
    emulator_distilled: Path
    round_checkpoints: Path
    metrics: Path
    tensorboard: Path
    summary: Path
    adapter: Path
    round_adapters: Path
    trajectory_fidelity: Path
    bench: Path

    @classmethod
    def from_config(cls, cfg) -> "RunLayout":
        run = Path(cfg.run.dir)
        proxy = Path(cfg.proxy.out) if cfg.proxy.out else run / "proxy"
        return cls(
            run_dir=run,
            proxy=proxy, proxy_report=run / "proxy.json",
            distill_source=Path(cfg.distill.proxy) if cfg.distill.proxy else proxy,
            source_given=bool(cfg.distill.proxy),
            distilled=Path(cfg.distill.out) if cfg.distill.out else run / "proxy_distilled",
            distill_report=run / "distill.json", distill_log=run / "distill_log.jsonl",
            distill_checkpoints=run / "checkpoints" / "distill",
            emulator=run / "emulator", emulator_report=run / "emulator.json",
            emulator_distilled=Path(cfg.distill.emulator_out) if cfg.distill.emulator_out else run / "emulator_distilled",
            round_checkpoints=run / "checkpoints" / "rounds",
            metrics=run / "metrics.jsonl", tensorboard=run / "tensorboard", summary=run / "summary.json",
            adapter=run / "adapter", round_adapters=run / "round_adapters",
            trajectory_fidelity=run / "trajectory_fidelity.json",
            bench=Path(cfg.bench.out) if cfg.bench.out else run / "bench.json")


def is_model_dir(path: Path) -> bool:
    """A saved Hugging Face model (a proxy, an emulator, a distilled one) is complete once its config is
    there: directories appear atomically."""
    return (path / "config.json").exists()

"""Where a run's artifacts live: every path derived from the config in one place.

    run.dir/
      config.yaml            the resolved config
      proxy/                 Stage 1 (proxy.out overrides)      proxy.json   its report
      proxy_distilled/       Stage 2 (distill.out overrides)    distill.json, distill_log.jsonl
      emulator/              FedOT's emulator                   emulator.json
      emulator_distilled/    FedOT's distilled emulator
      checkpoints/rounds/    federated round checkpoints
      checkpoints/distill/   layer-level distillation checkpoints
      metrics.jsonl, summary.json, adapter/   federated training
      bench.json             fedpft bench (bench.out overrides)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    run_dir: Path
    proxy: Path                # where Stage 1 writes the proxy
    distill_source: Path       # the proxy Stage 2 distils: distill.proxy, else the proxy above
    source_given: bool         # distill.proxy names an existing proxy (never built here)
    distilled: Path
    emulator: Path
    emulator_distilled: Path
    bench: Path

    @classmethod
    def from_config(cls, cfg) -> "RunLayout":
        run = Path(cfg.run.dir)
        proxy = Path(cfg.proxy.out) if cfg.proxy.out else run / "proxy"
        return cls(run_dir=run, proxy=proxy,
                   distill_source=Path(cfg.distill.proxy) if cfg.distill.proxy else proxy,
                   source_given=bool(cfg.distill.proxy),
                   distilled=Path(cfg.distill.out) if cfg.distill.out else run / "proxy_distilled",
                   emulator=run / "emulator", emulator_distilled=run / "emulator_distilled",
                   bench=Path(cfg.bench.out) if cfg.bench.out else run / "bench.json")

    # -- reports and logs ---------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.run_dir / "config.yaml"

    @property
    def proxy_report(self) -> Path:
        return self.run_dir / "proxy.json"

    @property
    def emulator_report(self) -> Path:
        return self.run_dir / "emulator.json"

    @property
    def distill_report(self) -> Path:
        return self.run_dir / "distill.json"

    @property
    def distill_log(self) -> Path:
        return self.run_dir / "distill_log.jsonl"

    # -- checkpoints -----------------------------------------------------------------------------------
    @property
    def round_checkpoints(self) -> Path:
        return self.run_dir / "checkpoints" / "rounds"

    @property
    def distill_checkpoints(self) -> Path:
        return self.run_dir / "checkpoints" / "distill"

    # -- federated results -------------------------------------------------------------------------
    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.run_dir / "summary.json"

    @property
    def adapter(self) -> Path:
        return self.run_dir / "adapter"


def is_model_dir(path: Path) -> bool:
    """A saved Hugging Face model (a proxy, an emulator, a distilled one) is complete once its config is
    there: directories appear atomically."""
    return (path / "config.json").exists()

"""Experiment trackers (``run.report_to``): every metrics row rank 0 writes to ``metrics.jsonl`` also
goes to TensorBoard event files in ``<run.dir>/tensorboard`` and to a Weights & Biases run in
``<run.dir>/wandb``, with the round as the step. Each package is imported only when its tracker is
asked for; a missing one is a :class:`UserError` that names the pip line."""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol, Sequence

from ..config import Config, config_to_dict, dump_config
from ..errors import UserError
from ..run_layout import RunLayout

log = logging.getLogger(__name__)

# tracker -> the modules it imports and the package that provides them
PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "torch.utils.tensorboard"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
}


class Tracker(Protocol):
    def log(self, row: Mapping[str, Any]) -> None: ...

    def close(self, ok: bool) -> None: ...


def missing_package(report_to: Sequence[str]) -> Optional[str]:
    """The error for the first tracker of ``report_to`` whose package does not import; None when all do."""
    for name in report_to:
        if name not in PACKAGES:
            continue
        modules, package = PACKAGES[name]
        try:
            for module in modules:
                importlib.import_module(module)
        except ImportError:
            return f"run.report_to: {name} needs the '{package}' package: pip install {package}"
    return None


def scalars(row: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics row by name, nested dicts as ``seconds/local_training``, booleans as 0/1;
    lists (per rank, per layer, per class) and text are left out."""
    out: dict[str, float] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(scalars(value, f"{name}/"))
        elif isinstance(value, (bool, int, float)):
            out[name] = float(value)
    return out


class TensorBoardTracker:
    """Scalars of each row at step = round, and the resolved config as text at the step the run starts
    from. A fresh run removes an earlier run's event files (metrics.jsonl starts afresh too); a resumed
    one hides the earlier events of the rounds it redoes (``purge_step``), as metrics.jsonl drops their rows."""

    def __init__(self, cfg: Config, log_dir: Path, start_round: int):
        from torch.utils.tensorboard import SummaryWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        if not start_round:
            for old in log_dir.glob("events.out.tfevents.*"):
                old.unlink()
        self.writer = SummaryWriter(str(log_dir), purge_step=start_round + 1 if start_round else None)
        # a fenced block: TensorBoard renders text as Markdown, which would join the YAML's lines
        self.writer.add_text("config", f"```yaml\n{dump_config(cfg)}```", global_step=start_round)
        self.writer.flush()

    def log(self, row: Mapping[str, Any]) -> None:
        step = int(row["round"])
        for name, value in scalars(row).items():
            if name != "round":
                self.writer.add_scalar(name, value, global_step=step)
        # a run that dies later keeps the rounds it finished
        self.writer.flush()

    def close(self, ok: bool) -> None:
        self.writer.close()


class WandbTracker:
    """One W&B run per invocation (a resumed run starts a new one at its next round), named after the run
    dir, with the resolved config; offline by default, so nothing leaves the machine until
    ``wandb sync``."""

    def __init__(self, cfg: Config, run_dir: Path):
        import wandb

        self.mode = cfg.run.wandb_mode
        try:
            # silent: the run's own lines stay the only output; close() names the directory to sync
            self.run = wandb.init(mode=self.mode, dir=str(run_dir), project=cfg.run.wandb_project,
                                  name=run_dir.resolve().name, config=config_to_dict(cfg),
                                  settings=wandb.Settings(silent=True))
        except wandb.errors.Error as exc:   # online without an API key, a service that did not start
            raise UserError(f"run.report_to: wandb did not start (run.wandb_mode={self.mode}): {exc}") from None

    def log(self, row: Mapping[str, Any]) -> None:
        self.run.log(dict(row), step=int(row["round"]))

    def close(self, ok: bool) -> None:
        import wandb

        sync_dir = getattr(self.run.settings, "sync_dir", None)
        self.run.finish(exit_code=0 if ok else 1)
        # finish() leaves the run's file to W&B's service process, which writes it out when it stops: stop
        # it now, so the run is complete on disk when the engine returns (not only at interpreter exit)
        wandb.teardown(exit_code=0 if ok else 1)
        if self.mode == "offline" and sync_dir:
            log.info("wandb: offline run in %s; upload it with `wandb sync %s`", sync_dir, sync_dir)


def open_trackers(cfg: Config, layout: RunLayout, start_round: int) -> list[Tracker]:
    """The trackers ``run.report_to`` asks for beyond metrics.jsonl, started (rank 0 only); one that
    fails to start closes those started before it."""
    problem = missing_package(cfg.run.report_to)
    if problem:
        raise UserError(problem)
    opened: list[Tracker] = []
    try:
        for name in cfg.run.report_to:
            if name == "tensorboard":
                opened.append(TensorBoardTracker(cfg, layout.tensorboard, start_round))
            elif name == "wandb":
                opened.append(WandbTracker(cfg, layout.run_dir))
    except BaseException:
        close_trackers(opened, ok=False)
        raise
    return opened


def close_trackers(trackers: Sequence[Tracker], ok: bool) -> None:
    """Flush and close each tracker; one that fails is reported and the others still close
    (metrics.jsonl holds every row regardless)."""
    for tracker in trackers:
        try:
            tracker.close(ok)
        except Exception as exc:
            log.warning("closing the %s tracker failed: %s", type(tracker).__name__, exc)

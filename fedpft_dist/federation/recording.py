"""What the round loop records: the seconds of each phase (every rank), and on rank 0 metrics rows
(JSON lines, and the trackers of ``run.report_to``) and progress bars. On other ranks the last two
are silent, so the loop calls them the same way everywhere."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Iterator, Sequence

from ..environment import peak_memory_bytes, reset_peak_memory, return_freed_memory
from ..fsutil import truncate_jsonl
from ..runtime import phase as job_phase

from .trackers import Tracker, close_trackers


class PhaseClock:
    """Seconds of each round phase, the round's own (its metrics row) and the run's totals, and the
    peak memory of each phase over the run (:func:`~fedpft_dist.environment.peak_memory_bytes` on
    ``device``: allocated CUDA bytes, or the CPU process's resident set)."""

    def __init__(self, phases: Sequence[str], device=None):
        self.total: dict[str, float] = dict.fromkeys(phases, 0.0)
        self.peak: dict[str, int] = {}
        self.device = device

    @contextlib.contextmanager
    def timed(self, seconds: dict[str, float], phase: str, release: bool = True,
              collect: bool = False) -> Iterator[None]:
        """Time the block as ``phase`` into ``seconds`` and the totals. ``release``: the memory the
        phase freed goes back to the system after it (``collect``: first the reference cycles it left,
        such as a distillation's DeepSpeed engine)."""
        t0 = time.perf_counter()
        if self.device is not None:
            reset_peak_memory(self.device)
        with job_phase(phase.replace("_", " ")):
            yield
        if self.device is not None:
            peak = peak_memory_bytes(self.device)
            if peak is not None:
                self.peak[phase] = max(self.peak.get(phase, 0), peak)
        if release:
            return_freed_memory(collect=collect)
        seconds[phase] = time.perf_counter() - t0
        self.total[phase] += seconds[phase]


class MetricsLog:
    """``metrics.jsonl``: one row per round, appended as the round ends, and the same row to each
    tracker. A resumed run keeps the rows of the rounds it resumes after and drops any later ones
    (they were never checkpointed)."""

    def __init__(self, path: Path, active: bool, resume_after: int = 0, trackers: Sequence[Tracker] = ()):
        self.path, self.active = path, active
        self.rows: list[dict] = []
        self.trackers: list[Tracker] = list(trackers) if active else []
        if not active:
            return
        self.rows = truncate_jsonl(path, lambda row: row.get("round", 0) <= resume_after) if resume_after else []
        if not resume_after:
            path.write_text("")

    def append(self, row: dict) -> None:
        if not self.active:
            return
        self.rows.append(row)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        for tracker in self.trackers:
            tracker.log(row)

    def close(self, ok: bool = True) -> None:
        """Flush and close the trackers (``ok``: the run ended without an error); later calls do nothing."""
        trackers, self.trackers = self.trackers, []
        close_trackers(trackers, ok)


class RoundProgress:
    """A bar over rounds and, within a round, one over this rank's clients (rank 0 only)."""

    def __init__(self, active: bool, total: int, done: int, desc: str):
        self.bar = self.inner = None
        if active:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=desc, unit="round", dynamic_ncols=True)

    def start_clients(self, round_no: int, clients: int) -> None:
        if self.bar is not None and clients > 1:
            from tqdm import tqdm

            self.inner = tqdm(total=clients, desc=f"round {round_no} clients (rank 0)", leave=False,
                              dynamic_ncols=True)

    def client_done(self) -> None:
        if self.inner is not None:
            self.inner.update(1)

    def end_clients(self) -> None:
        if self.inner is not None:
            self.inner.close()
            self.inner = None

    def round_done(self, row: dict, keys: tuple[str, ...]) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: f"{row[k]:.4f}" for k in keys if k in row})
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

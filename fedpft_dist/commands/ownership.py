"""One owner per run directory: every command that writes into ``run.dir`` holds its lock for the
command's life (:class:`~fedpft_dist.fsutil.RunDirLock`, taken by rank 0), and a second command on the
same directory exits with code 2 naming the holder, on every rank of its job."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from ..config import Config
from ..errors import UserError
from ..fsutil import RunDirLock
from ..runtime import Runtime


@contextlib.contextmanager
def owning_run_dir(cfg: Config, command: str, rt: Optional[Runtime] = None) -> Iterator[None]:
    """Hold ``cfg.run.dir``'s lock for the block. ``rt``: the job's runtime (rank 0 takes the lock, one
    collective tells every rank whether it may go on); None: a one-process command."""
    lock = RunDirLock(cfg.run.dir, command) if rt is None or rt.is_main else None
    problem = lock.acquire() if lock is not None else None
    refused = problem is not None
    if rt is not None and rt.world_size > 1:
        refused = rt.comm.agree(refused, op="max", name="run-dir/lock")
    if refused:
        raise UserError(problem or f"run.dir {cfg.run.dir} is in use by another command (rank 0 names it)")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()

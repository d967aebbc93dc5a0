"""Small file-system helpers: atomic writes so a crash never leaves a half-written file, and one
line for the file-system faults a user can fix."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        fault = as_os_error(exc, path)
        if fault is not None:
            raise fault from exc
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``target``; on success it replaces ``target`` (an existing
    one is moved aside first and removed after), on failure it is deleted. Readers see the old
    directory or the new one, never a half-written one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        fault = as_os_error(exc, target)
        if fault is not None:
            raise fault from exc
        raise


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of an append-only JSON-lines log (metrics.jsonl, distill_log.jsonl). A last line cut
    short by a kill (not valid JSON) is dropped with a warning; a broken line before the last raises
    :class:`UserError` naming the file and line."""
    import logging

    from .errors import UserError

    path = Path(path)
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                logging.getLogger(__name__).warning("%s: line %d is cut short (the run was killed while writing "
                                                    "it): left out", path, number)
                break
            raise UserError(f"{path}: line {number} is not JSON ({exc.msg}, column {exc.colno})") from None
    return rows


def truncate_jsonl(path: str | os.PathLike, keep) -> list[dict]:
    """Rewrite the log at ``path`` (atomically) with the rows for which ``keep(row)`` is true, a cut-short
    last line dropped: what a resumed job does before it appends, so that no row appears twice.
    Returns the rows kept; a missing file is an empty log."""
    path = Path(path)
    rows = [row for row in read_jsonl(path) if keep(row)] if path.exists() else []
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    return rows


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing) for the block: one process at a time.
    It serialises the processes of one host, and those of several hosts on file systems whose locks
    span hosts (NFSv4, Lustre mounted with ``flock``, GPFS); where they do not, each host builds its own
    copy and :func:`build_once` keeps the first complete one, which is still correct."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_once(target: str | os.PathLike, build, ready=None) -> Path:
    """A cached directory that several processes (the ranks of a job, on one or several hosts) may ask
    for at once: the first builds it (``build(tmp_dir)``) under a lock beside it while the others wait,
    then all read it. ``ready(target)`` (default: ``target/config.json`` exists) says it is complete; a
    directory appears whole or not at all, and a complete one is never replaced."""
    target = Path(target)
    ready = ready or (lambda t: (t / "config.json").is_file())
    if ready(target):
        return target
    with file_lock(target.parent / f".{target.name}.lock"):
        if ready(target):  # built by another process while this one waited
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            build(tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if not ready(target):  # a half-built directory in the way is replaced; a complete one kept
                    shutil.rmtree(target, ignore_errors=True)
                    os.rename(tmp, target)
        except BaseException as exc:
            fault = as_os_error(exc, target)
            if fault is not None:
                raise fault from exc
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def as_os_error(exc: BaseException, path: str | os.PathLike) -> Optional[OSError]:
    """``exc`` as an ``OSError`` naming ``path``, when it is a file-system fault that does not say where
    it happened: an ``OSError`` without a file name, or a library's wrapped one (safetensors reports
    "I/O error: No space left on device (os error 28)"). None otherwise."""
    if isinstance(exc, OSError):
        return OSError(exc.errno, exc.strerror, str(path)) if exc.filename is None and exc.errno else None
    found = re.search(r"\(os error (\d+)\)", str(exc))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


# File-system faults the person running the job can fix, and what to do about each.
_FS_HINTS = {
    errno.ENOSPC: "free space there, or point run.dir at another file system",
    errno.EDQUOT: "free space within the quota, or point run.dir at another file system",
    errno.EROFS: "point run.dir at a writable file system",
    errno.EACCES: "point run.dir at a place you may write, or fix the permissions",
    errno.EPERM: "point run.dir at a place you may write, or fix the permissions",
    errno.ENOTDIR: "a part of the path is a file: choose another run.dir, or move the file",
    errno.EEXIST: "a file is where a directory should be: choose another run.dir, or move the file",
    errno.EISDIR: "a directory is where a file should be: choose another path",
}


def filesystem_error(exc: OSError) -> Optional[str]:
    """One line for an ``OSError`` that is a fault of the file system or of a path (None for others):
    which path, what happened, what to do. Checkpoints and results are written atomically, so what
    was complete before the fault still is."""
    hint = _FS_HINTS.get(exc.errno)
    if hint is None:
        return None
    path = exc.filename if exc.filename is not None else "a file of the run"
    what = (exc.strerror or os.strerror(exc.errno)).lower()
    return f"{path}: {what}: {hint} (files completed before this are intact)"


def run_dir_problem(run_dir: str | os.PathLike) -> Optional[str]:
    """Why files cannot be written in ``run_dir`` (created if missing), as :func:`filesystem_error`
    words it; None when they can."""
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=run_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return filesystem_error(exc) or f"{run_dir}: {exc}"
    return None


# ----------------------------------------------------------------------------------------------------
# One owner per run directory
# ----------------------------------------------------------------------------------------------------

class RunDirLock:
    """The lock a command that writes into a run directory holds for its life (rank 0 of the job):
    an exclusive ``flock`` on ``<run.dir>/.fedpft.lock``, and the holder's record (host, pid, start
    time, command) in ``<run.dir>/.fedpft.owner`` for whoever is refused.

    The kernel releases the lock when its process ends, however it ends, so a lock whose holder is gone
    is free: the next command takes it, and warns when the holder left its record behind (it was
    killed). Across nodes this needs a file system whose locks span hosts (NFSv4, Lustre mounted with
    ``flock``, GPFS): there a job on another node is refused too. Where locks are local to a host, a
    second job on another node cannot be told from the owner of a record it finds: it takes over with
    a warning naming that owner."""

    LOCK, OWNER = ".fedpft.lock", ".fedpft.owner"

    def __init__(self, run_dir: str | os.PathLike, command: str):
        self.dir, self.command = Path(run_dir), command
        self._fh = None

    def acquire(self) -> Optional[str]:
        """Take the lock; None on success, else one line naming the holder."""
        import fcntl
        import socket
        import time

        self.dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.dir / self.LOCK, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            holder = self.holder()
            who = (f"`fedpft {holder.get('command', '?')}` (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
                   f"started {holder.get('started', '?')})") if holder else "another fedpft command"
            return (f"run.dir {self.dir} is in use by {who}: wait for it to end, or choose another run.dir")
        self._fh = fh
        earlier = self.holder()
        if earlier:
            import logging

            logging.getLogger(__name__).warning(
                "run.dir %s: taking over from `fedpft %s` (host %s, pid %s, started %s), which ended without "
                "releasing it (killed?)", self.dir, earlier.get("command"), earlier.get("host"), earlier.get("pid"),
                earlier.get("started"))
        atomic_write_json(self.dir / self.OWNER, {
            "command": self.command, "host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())})
        return None

    def holder(self) -> dict:
        try:
            return json.loads((self.dir / self.OWNER).read_text())
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self._fh is None:
            return
        import fcntl

        with contextlib.suppress(OSError):
            (self.dir / self.OWNER).unlink()
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()
        self._fh = None

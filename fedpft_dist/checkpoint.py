"""Checkpoints: a directory of safetensors files plus ``state.json``, written to a temporary
directory and renamed into place, so a checkpoint either exists completely or not at all. Nothing is
pickled; loading never runs code from the files.

``state.json`` records every tensor file's size and SHA-256 (``files``). Loading verifies them, so a
checkpoint damaged after it was written (a truncated copy, a lost file, a half-synced disk) is
reported as such instead of failing inside the safetensors reader; :func:`newest_checkpoint` then
falls back to the newest one that verifies.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from .errors import UserError
from .fsutil import atomic_directory

log = logging.getLogger(__name__)

META = "state.json"
FILES = "files"           # the key of state.json that lists each tensor file's size and hash


class CheckpointInvalid(Exception):
    """A checkpoint that does not verify; the message says why."""


def file_record(path: Path) -> dict:
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    return {"bytes": path.stat().st_size, "sha256": digest}


def save_checkpoint(root: str | os.PathLike, name: str, tensors: dict[str, dict[str, torch.Tensor]],
                    meta: dict) -> Path:
    """Write ``root/name/`` with one ``<file>.safetensors`` per entry of ``tensors`` and ``state.json``
    (``meta`` plus each file's size and hash)."""
    final = Path(root) / name
    with atomic_directory(final) as tmp:
        files = {f"{fname}.safetensors": save_tensor_file(tmp / f"{fname}.safetensors", group)
                 for fname, group in tensors.items()}
        write_meta(tmp, meta, files)
    return final


def rank_file(group: str, rank: int) -> str:
    """The file of ``rank``'s share in a checkpoint written per rank (ZeRO-3 partitions)."""
    return f"{group}-rank{rank:05d}.safetensors"


def save_tensor_file(path: Path, tensors: dict[str, torch.Tensor]) -> dict:
    """One safetensors file (on the CPU) and its record for ``state.json``: size and SHA-256."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    return file_record(path)


def write_meta(path: Path, meta: dict, files: dict[str, dict]) -> None:
    """``state.json`` of a checkpoint: ``meta`` plus each file's record."""
    (path / META).write_text(json.dumps({**meta, FILES: files}, indent=2) + "\n")


def verify_rank_file(path: Path, name: str) -> dict:
    """``state.json`` of a checkpoint written per rank, after checking that it lists ``name`` (this
    rank's file) and that the file matches its size and hash; the other ranks check theirs."""
    meta = read_meta(path)
    files = meta.get(FILES)
    if not isinstance(files, dict) or name not in files:
        raise CheckpointInvalid(f"{META} lists no {name}")
    f, want = path / name, files[name]
    if not f.is_file():
        raise CheckpointInvalid(f"{name} is missing")
    if f.stat().st_size != want.get("bytes"):
        raise CheckpointInvalid(f"{name} has {f.stat().st_size} bytes, {want.get('bytes')} were written")
    if file_record(f)["sha256"] != want.get("sha256"):
        raise CheckpointInvalid(f"{name} does not match the hash recorded when it was written")
    return meta


def remove_partial_writes(root: Optional[str | os.PathLike]) -> int:
    """Remove the temporary directories that checkpoint writes killed midway left in ``root`` (their
    names start with a dot; a complete checkpoint never does). Called by the one process that owns the
    run directory as a job starts; returns how many were removed."""
    if not root or not Path(root).is_dir():
        return 0
    partial = [p for p in Path(root).iterdir() if p.is_dir() and p.name.startswith(".")]
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    if partial:
        log.warning("removed %d partial checkpoint write(s) in %s, left by a job stopped while writing",
                    len(partial), root)
    return len(partial)


def checkpoint_dirs(root: Optional[str | os.PathLike], prefix: str) -> list[Path]:
    """Every ``root/<prefix>NNN`` directory, complete or not, newest first (names sort by their
    zero-padded number; the temporary directories of a write in progress start with a dot)."""
    if not root or not Path(root).is_dir():
        return []
    return sorted((p for p in Path(root).glob(f"{prefix}*") if p.is_dir()), reverse=True)


def read_meta(path: Path) -> dict:
    """``state.json`` of the checkpoint at ``path``; :class:`CheckpointInvalid` when it is missing,
    unreadable or not a JSON object."""
    meta_path = path / META
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise CheckpointInvalid(f"no {META}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointInvalid(f"{META} is unreadable ({exc.__class__.__name__})") from None
    if not isinstance(meta, dict):
        raise CheckpointInvalid(f"{META} is not a JSON object")
    return meta


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint's ``state.json`` after checking every file it lists against its size and hash."""
    path = Path(path)
    meta = read_meta(path)
    files = meta.get(FILES)
    if not isinstance(files, dict):
        raise CheckpointInvalid(f"{META} lists no file sizes and hashes (written by an older fedpft-dist)")
    for name, want in sorted(files.items()):
        f = path / name
        if not f.is_file():
            raise CheckpointInvalid(f"{name} is missing")
        size = f.stat().st_size
        if size != want.get("bytes"):
            raise CheckpointInvalid(f"{name} has {size} bytes, {want.get('bytes')} were written")
        if file_record(f)["sha256"] != want.get("sha256"):
            raise CheckpointInvalid(f"{name} does not match the hash recorded when it was written")
    return meta


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(tensors by file, state.json) of a checkpoint that verifies; :class:`CheckpointInvalid` otherwise."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = verify_checkpoint(path)
    tensors = {name[: -len(".safetensors")]: load_file(str(path / name)) for name in sorted(meta[FILES])}
    return tensors, meta


def newest_checkpoint(root: Optional[str | os.PathLike], prefix: str, key: str
                      ) -> Optional[tuple[Path, dict[str, dict[str, torch.Tensor]], dict]]:
    """The newest ``root/<prefix>NNN`` that verifies, as (path, tensors, meta); None when there is no
    checkpoint at all. Newer ones that do not verify are skipped with a warning; when none verifies
    the error names ``key`` (the setting that asked to resume) and the newest one's fault."""
    found = checkpoint_dirs(root, prefix)
    faults = []
    for path in found:
        try:
            tensors, meta = load_checkpoint(path)
        except CheckpointInvalid as exc:
            log.warning("%s: skipping checkpoint %s: %s", key, path, exc)
            faults.append(f"{path.name}: {exc}")
            continue
        if faults:
            log.warning("%s: resuming from %s, the newest checkpoint that verifies (%d newer skipped)",
                        key, path.name, len(faults))
        return path, tensors, meta
    if faults:
        raise UserError(f"{key}: none of the {len(faults)} checkpoints in {root} verifies (newest, "
                        f"{faults[0]}); start afresh with {key}=false and run.rebuild=true, which moves them aside")
    return None


def move_aside(path: Path) -> Path:
    """Rename ``path`` to ``<path>.stale-<UTC time>`` next to it (kept, never deleted); returns the new path."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.stale-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.stale-{stamp}-{n}")
    shutil.move(str(path), str(target))
    return target

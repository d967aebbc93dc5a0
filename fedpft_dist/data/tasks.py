"""The clients' data of a federated run: a labelled train/test split for sequence classification, or
text examples for causal-LM fine-tuning, tokenised (cached) and partitioned over the clients.

Everything here is a function of (config, tokenizer, seed): every rank prepares the same task.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import Config, FedConfig
from ..errors import ConfigError, UserError
from ..resources import cache_dir
from .labelled import load_labelled, tokenize_cached, train_test_split
from .lm import LMText, check_examples, lm_examples, load_lm_text
from .partition import apply_size_imbalance, partition
from .public import BUILTIN

CAUSAL_LM = "causal-lm"
CLASSIFICATION = "sequence-classification"
# The split a Hugging Face dataset named as data.test_file gives where the name does not say.
TEST_SPLITS = ("validation", "test")


@dataclass
class ClientData:
    """Tokenised examples of one client (rows of the shared train tensors)."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: Optional[torch.Tensor]                  # class ids; None = causal LM (next-token targets)
    token_type_ids: Optional[torch.Tensor] = None   # sentence pairs

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass
class Task:
    """Tokenised train and test sets and the clients' shares of the train set. A causal-LM task has
    no labels (``train_labels``/``test_labels`` None, no ``label_names``): the tokens are the targets."""
    train_ids: torch.Tensor
    train_mask: torch.Tensor
    train_labels: Optional[torch.Tensor]
    test_ids: torch.Tensor
    test_mask: torch.Tensor
    test_labels: Optional[torch.Tensor]
    label_names: list[str]
    parts: list[list[int]]
    train_types: Optional[torch.Tensor] = None  # segment ids of sentence pairs
    test_types: Optional[torch.Tensor] = None
    kind: str = CLASSIFICATION

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def causal_lm(self) -> bool:
        return self.kind == CAUSAL_LM

    def client(self, c: int) -> ClientData:
        idx = torch.as_tensor(self.parts[c], dtype=torch.long)
        types = self.train_types[idx] if self.train_types is not None else None
        labels = self.train_labels[idx] if self.train_labels is not None else None
        return ClientData(self.train_ids[idx], self.train_mask[idx], labels, types)


def _subset(indices: list[int], limit: int, seed: int) -> list[int]:
    if not limit or len(indices) <= limit:
        return indices
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(indices), generator=g)[:limit]
    return sorted(indices[i] for i in pick.tolist())


def _expand(path: str, key: str) -> str:
    """``$VAR`` / ``~`` in a data path (cluster configs name their data roots by variables)."""
    out = os.path.expanduser(os.path.expandvars(path))
    if "$" in out:
        raise UserError(f"{key}: {path} names an environment variable that is not set")
    return out


# The setting to change when a scheme cannot split the train set (its message says how).
_SCHEME_KEYS = {"iid": "fed.num_clients", "dirichlet": "fed.alpha", "labels": "fed.labels_per_client"}


def split_clients(labels: list[int], fed: FedConfig, seed: int, scheme: Optional[str] = None) -> list[list[int]]:
    """The clients' shares of the train set by ``scheme`` (default ``fed.partition``) and
    ``fed.size_sigma``; settings that make the split impossible are a ConfigError naming the key."""
    scheme = scheme or fed.partition
    if fed.num_clients > len(labels):
        raise ConfigError("fed.num_clients", f"{fed.num_clients} clients but only {len(labels)} training examples")
    try:
        parts = partition(labels, fed.num_clients, scheme, seed, alpha=fed.alpha, k=fed.labels_per_client)
    except ValueError as exc:
        raise ConfigError(_SCHEME_KEYS.get(scheme, "fed.partition"), str(exc)) from None
    if fed.size_sigma > 0:  # as partition(..., size_sigma=) would, with its own key in the error
        try:
            parts = apply_size_imbalance(parts, fed.size_sigma, seed)
        except ValueError as exc:
            raise ConfigError("fed.size_sigma", str(exc)) from None
    return parts


def prepare_task(cfg: Config, tokenizer, kind: str) -> Task:
    """The clients' data for the task ``kind`` (:func:`~fedpft_dist.models.loading.resolve_task`)."""
    if kind == CAUSAL_LM:
        return prepare_lm_task(cfg, tokenizer)
    return prepare_classification_task(cfg, tokenizer)


def held_back_texts(cfg: Config) -> list[str]:
    """The texts of ``data.dataset``'s training split that ``data.max_train`` leaves out: unlabelled
    text of the clients' domain that is in no client's data and not in the test split (all of it,
    before ``data.max_test``), for in-domain public text. Sentence pairs are joined by a space."""
    d = cfg.data
    if d.dataset == BUILTIN:
        raise ConfigError("data.dataset", f"'{BUILTIN}' is unlabelled text: it has no held-back rows")
    data = load_labelled(_expand(d.dataset, "data.dataset"), d.text_column, d.label_column, d.text_pair_column,
                         d.max_dropped_fraction)
    if d.test_file:
        train_idx = list(range(len(data.labels)))
    else:
        train_idx, _ = train_test_split(len(data.labels), d.test_fraction, cfg.run.seed, data.labels)
    used = set(_subset(train_idx, d.max_train, cfg.run.seed + 1))
    pairs = data.text_pairs

    def text(i: int) -> str:
        return data.texts[i] if pairs is None else f"{data.texts[i]} {pairs[i]}"
    return [text(i) for i in sorted(train_idx) if i not in used]


def prepare_classification_task(cfg: Config, tokenizer) -> Task:
    """Labelled data, a seeded stratified train/test split, tokenisation (cached), client partition."""

    d, f = cfg.data, cfg.fed
    if d.dataset == BUILTIN:
        raise ConfigError("data.dataset", f"'{BUILTIN}' is unlabelled text, for causal-LM fine-tuning "
                                          f"(model.task=causal-lm with a decoder model)")
    data = load_labelled(_expand(d.dataset, "data.dataset"), d.text_column, d.label_column, d.text_pair_column,
                         d.max_dropped_fraction)
    if d.test_file:
        test_data = load_labelled(_expand(d.test_file, "data.test_file"), d.text_column, d.label_column,
                                  d.text_pair_column, d.max_dropped_fraction, splits=TEST_SPLITS)
        if test_data.label_names != data.label_names:
            raise UserError(f"data.test_file: labels {test_data.label_names} differ from data.dataset's "
                            f"{data.label_names}")
        train_idx, test_idx = list(range(len(data.labels))), list(range(len(test_data.labels)))
    else:
        test_data = data
        train_idx, test_idx = train_test_split(len(data.labels), d.test_fraction, cfg.run.seed, data.labels)
    train_idx = _subset(train_idx, d.max_train, cfg.run.seed + 1)
    test_idx = _subset(test_idx, d.max_test, cfg.run.seed + 2)
    if f.num_clients > len(train_idx):
        raise ConfigError("fed.num_clients", f"{f.num_clients} clients but only {len(train_idx)} training examples")
    cache = d.cache_dir or str(cache_dir() / "tokens")

    def tokens(source, idx):
        pairs = [source.text_pairs[i] for i in idx] if source.text_pairs is not None else None
        return tokenize_cached(tokenizer, [source.texts[i] for i in idx], d.max_length, cache, pairs)

    train, test = tokens(data, train_idx), tokens(test_data, test_idx)
    train_labels = torch.tensor([data.labels[i] for i in train_idx], dtype=torch.long)
    test_labels = torch.tensor([test_data.labels[i] for i in test_idx], dtype=torch.long)
    parts = split_clients(train_labels.tolist(), f, cfg.run.seed)
    return Task(train["input_ids"], train["attention_mask"], train_labels, test["input_ids"],
                test["attention_mask"], test_labels, list(data.label_names), parts,
                train.get("token_type_ids"), test.get("token_type_ids"))


def prepare_lm_task(cfg: Config, tokenizer) -> Task:
    """Text for next-token training: documents split into train and test by a seeded permutation
    (before they become examples, so no document feeds both), examples (packed chunks of prose or one
    row per text; :mod:`fedpft_dist.data.lm`), seeded subsets, and an IID split over clients. When the
    clients' corpus is the public text's, only its held-out documents are used."""

    d, f, p = cfg.data, cfg.fed, cfg.public_text
    if d.text_pair_column:
        raise ConfigError("data.text_pair_column", "sentence pairs are for sequence classification; next-token "
                                                   "training reads single texts")
    if f.partition != "iid":
        raise ConfigError("fed.partition", f"{f.partition!r} splits by label and next-token training has no "
                                           f"labels: use iid (optionally with fed.size_sigma)")
    cache = d.cache_dir or str(cache_dir() / "tokens")

    def text(key: str, source: str) -> LMText:
        try:
            return load_lm_text(_expand(source, key), d.text_column, p.source, p.held_out_fraction, cfg.run.seed)
        except ConfigError:
            raise
        except UserError as exc:  # the loaders speak of "public text"; say which key it came from
            raise UserError(f"{key}: {exc}") from None

    data = text("data.dataset", d.dataset)
    if d.test_file:
        train_text, test_text, test_key = data, text("data.test_file", d.test_file), "data.test_file"
    else:
        train_idx, test_idx = train_test_split(len(data.docs), d.test_fraction, cfg.run.seed)
        train_text = LMText([data.docs[i] for i in train_idx], data.packed, data.source, data.public_held_out)
        test_text = LMText([data.docs[i] for i in test_idx], data.packed, data.source, data.public_held_out)
        test_key = "data.test_fraction"
    train = lm_examples(tokenizer, train_text, d.max_length, cache)
    test = lm_examples(tokenizer, test_text, d.max_length, cache)
    check_examples(train, "data.dataset", d.dataset, d.max_length)
    check_examples(test, test_key, d.test_file or d.dataset, d.max_length)
    train_idx = torch.as_tensor(_subset(list(range(len(train["input_ids"]))), d.max_train, cfg.run.seed + 1))
    test_idx = torch.as_tensor(_subset(list(range(len(test["input_ids"]))), d.max_test, cfg.run.seed + 2))
    if f.num_clients > len(train_idx):
        raise ConfigError("fed.num_clients", f"{f.num_clients} clients but only {len(train_idx)} training examples")
    # IID needs only the number of examples; the "labels" it is given carry no meaning.
    parts = split_clients([0] * len(train_idx), f, cfg.run.seed, scheme="iid")
    return Task(train["input_ids"][train_idx], train["attention_mask"][train_idx], None,
                test["input_ids"][test_idx], test["attention_mask"][test_idx], None, [], parts, kind=CAUSAL_LM)

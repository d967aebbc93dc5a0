"""Hugging Face ``datasets`` as inputs, never downloaded.

Two forms of a source name: a directory written by ``Dataset.save_to_disk`` or
``DatasetDict.save_to_disk``, and ``hf:NAME[:CONFIG][@SPLIT]``, a dataset that ``datasets`` has
already prepared in its local cache (``$HF_DATASETS_CACHE``, by default
``~/.cache/huggingface/datasets``), found there with the library in offline mode: a cluster's cached
GLUE is ``hf:nyu-mll/glue:qnli@validation``. Where no split is named, the caller's preference order
picks one (``train`` for training data, ``validation`` then ``test`` for a test set).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from fedpft_dist.errors import UserError

if TYPE_CHECKING:
    import datasets

PREFIX = "hf:"
HELP = "a datasets.save_to_disk directory or hf:NAME[:CONFIG][@SPLIT] from the local datasets cache"


@dataclass(frozen=True)
class HubSource:
    """A parsed source name: ``name`` is a directory (``on_disk``) or a dataset name in the cache."""

    name: str
    config: Optional[str]
    split: Optional[str]
    on_disk: bool

    def describe(self) -> str:
        if self.on_disk:
            return f"saved dataset '{self.name}'"
        return f"cached dataset '{self.name}'" + (f" (config '{self.config}')" if self.config else "")


def is_hub_source(source: str) -> bool:
    """Whether ``source`` names a Hugging Face dataset (``hf:...`` or a ``save_to_disk`` directory)."""
    return source.startswith(PREFIX) or _saved_dataset_dir(source) is not None


def parse(source: str) -> HubSource:
    """``hf:NAME[:CONFIG][@SPLIT]`` or ``DIR[@SPLIT]`` (the ``@SPLIT`` of a directory only where the
    whole name is not itself a directory)."""
    if source.startswith(PREFIX):
        spec, _, split = source[len(PREFIX):].partition("@")
        name, _, config = spec.partition(":")
        if not name or (":" in source[len(PREFIX):] and not config) or ("@" in source and not split):
            raise UserError(f"'{source}' is not hf:NAME[:CONFIG][@SPLIT]")
        return HubSource(name=name, config=config or None, split=split or None, on_disk=False)
    saved = _saved_dataset_dir(source)
    if saved is None:
        raise UserError(f"'{source}' is not {HELP}")
    directory, split = saved
    return HubSource(name=str(directory), config=None, split=split, on_disk=True)


def load_split(source: str, preferred_splits: Sequence[str]) -> tuple["datasets.Dataset", str]:
    """The split of ``source`` to read, and a description of it for messages.

    ``preferred_splits`` is tried in order where the name has no ``@SPLIT`` and the dataset has more
    than one split. Everything a user can get wrong (no such directory, not in the cache, no such
    split) is a :class:`~fedpft_dist.errors.UserError`."""
    src = parse(source)
    splits = _load(src)
    if not isinstance(splits, dict):  # a Dataset: one split, whatever its name
        if src.split is not None:
            raise UserError(f"{src.describe()} holds a single split, not a DatasetDict: drop '@{src.split}'")
        return splits, src.describe()
    names = list(splits)
    if src.split is not None:
        chosen = src.split
    elif len(names) == 1:
        chosen = names[0]
    else:
        chosen = next((s for s in preferred_splits if s in splits), "")
        if not chosen:
            raise UserError(f"{src.describe()} has splits {', '.join(names)}: name one with @SPLIT "
                            f"(none of {', '.join(preferred_splits)})")
    if chosen not in splits:
        raise UserError(f"{src.describe()} has no split '{chosen}' (splits: {', '.join(names)})")
    return splits[chosen], f"{src.describe()}, split '{chosen}'"


def class_names(table: "datasets.Dataset", column: str) -> Optional[list[str]]:
    """The class names of a ``ClassLabel`` column, else None (the labels are then raw values)."""
    import datasets

    feature = table.features.get(column)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def _load(src: HubSource) -> Any:
    """A ``Dataset`` or a ``{split: Dataset}`` mapping (a ``DatasetDict``)."""
    _offline()
    import datasets

    if src.on_disk:
        try:
            loaded = datasets.load_from_disk(src.name)
        except Exception as exc:  # a damaged or foreign directory is the user's to fix
            raise UserError(f"could not read {src.describe()}: {exc}") from exc
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else loaded
    try:
        loaded = datasets.load_dataset(src.name, src.config)
    except Exception as exc:
        cache = datasets.config.HF_DATASETS_CACHE
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{src.describe()} is not in the local datasets cache ({cache}; nothing is "
                        f"downloaded): {first}") from exc
    return dict(loaded)


def _offline() -> None:
    """``datasets`` must only look in its cache: the environment for a library imported later, and its
    config for one imported already (a user's HF_DATASETS_OFFLINE=0 included)."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets

    datasets.config.HF_HUB_OFFLINE = True
    datasets.config.HF_DATASETS_OFFLINE = True


def _saved_dataset_dir(source: str) -> Optional[tuple[Path, Optional[str]]]:
    """The ``save_to_disk`` directory that ``source`` names and the split after its ``@``, else None."""
    head, _, split = source.rpartition("@")
    for candidate, chosen in ((source, None), (head, split or None)):
        path = Path(candidate).expanduser() if candidate else None
        if path is not None and path.is_dir() and ((path / "dataset_dict.json").is_file()
                                                   or (path / "state.json").is_file()):
            return path, chosen
    return None

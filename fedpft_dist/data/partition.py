"""Split a labelled data set among virtual clients.

Every partitioner is a pure function of ``(labels, parameters, seed)`` returning one sorted index list
per client, with every sample assigned to exactly one client. Randomness comes from a
``numpy.random.Generator`` seeded with ``seed`` alone (PCG64: the same draws on every platform for a
given numpy version), so each rank computes the same split without communicating. ``partition``
chooses a scheme by name.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..config import FedConfig

SCHEMES = ("iid", "dirichlet", "labels")
# Dirichlet draws until every client has min_size samples; this many failures means the parameters
# make that too unlikely (tiny alpha with many clients) rather than bad luck.
DIRICHLET_MAX_TRIES = 1000
# partition()'s defaults are the fed section's: one source for every default.
_FED = FedConfig()


def iid(labels: Sequence[int], num_clients: int, seed: int) -> list[list[int]]:
    """A uniformly random split into ``num_clients`` parts whose sizes differ by at most one."""
    y = _as_labels(labels)
    _check_clients(num_clients, len(y))
    order = np.random.default_rng(seed).permutation(len(y))
    return [sorted(part.tolist()) for part in np.array_split(order, num_clients)]


def dirichlet(labels: Sequence[int], num_clients: int, alpha: float, seed: int,
              min_size: int = 1) -> list[list[int]]:
    """Label-skewed split: each class is divided among the clients in proportions drawn from Dir(alpha).

    The NIID-Bench / FedLab algorithm: for every class (in sorted order) shuffle its samples, draw
    client proportions ``p ~ Dir(alpha * 1)``, zero the share of clients that already hold
    ``n / num_clients`` samples or more (which keeps sizes from running away), renormalise and cut the
    class at the cumulative proportions. Small ``alpha`` gives each client few classes; large ``alpha``
    approaches IID. The whole draw is repeated, continuing the same seeded stream, until every client
    has at least ``min_size`` samples; ``ValueError`` after :data:`DIRICHLET_MAX_TRIES` draws.
    """
    y = _as_labels(labels)
    n = len(y)
    _check_clients(num_clients, n)
    if not alpha > 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    if min_size < 0:
        raise ValueError(f"dirichlet min_size must be >= 0, got {min_size}")
    if num_clients * min_size > n:
        raise ValueError(f"dirichlet partition cannot give {num_clients} clients {min_size} samples each "
                         f"from {n} samples")
    rng = np.random.default_rng(seed)
    classes = [np.flatnonzero(y == c) for c in np.unique(y)]
    cap = n / num_clients
    for _ in range(DIRICHLET_MAX_TRIES):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for members in classes:
            members = rng.permutation(members)
            p = rng.dirichlet(np.full(num_clients, alpha))
            open_clients = np.array([len(part) < cap for part in parts])
            masked = p * open_clients
            # With tiny alpha every open client's share can underflow to 0; spread the class evenly
            # over the open clients instead of dividing by zero.
            p = masked / masked.sum() if masked.sum() > 0 else open_clients / open_clients.sum()
            cuts = (np.cumsum(p) * len(members)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(members, cuts)):
                part.extend(chunk.tolist())
        if min(len(part) for part in parts) >= min_size:
            return [sorted(part) for part in parts]
    raise ValueError(f"dirichlet partition (alpha={alpha}) found no split giving all {num_clients} clients "
                     f">= {min_size} samples in {DIRICHLET_MAX_TRIES} draws; raise alpha or lower "
                     f"num_clients or min_size")


def labels_per_client(labels: Sequence[int], num_clients: int, k: int, seed: int) -> list[list[int]]:
    """Pathological label skew: every client holds exactly ``k`` distinct labels.

    The classes are shuffled once and dealt round-robin: client ``i`` gets positions
    ``i*k .. i*k + k - 1`` of the shuffled order repeated cyclically, so its ``k`` labels are distinct
    (``k <= C``) and, since ``num_clients * k >= C`` is required, every label is dealt. Each label's
    samples are then shuffled and split evenly (sizes differ by at most one) among the clients that
    hold it. ``ValueError`` if a label has fewer samples than holders, since a holder would get none.
    """
    y = _as_labels(labels)
    _check_clients(num_clients, len(y))
    classes = np.unique(y)
    if not 1 <= k <= len(classes):
        raise ValueError(f"labels-per-client k must be in [1, {len(classes)}] (the number of classes), got {k}")
    if num_clients * k < len(classes):
        raise ValueError(f"labels-per-client needs num_clients * k >= {len(classes)} classes so that every "
                         f"sample is assigned, got {num_clients} * {k}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for client in range(num_clients):
        for j in range(k):
            holders[int(order[(client * k + j) % len(order)])].append(client)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c in classes.tolist():
        members = rng.permutation(np.flatnonzero(y == c))
        if len(members) < len(holders[c]):
            raise ValueError(f"labels-per-client: label {c} has {len(members)} samples for "
                             f"{len(holders[c])} clients; lower num_clients or k")
        for client, chunk in zip(holders[c], np.array_split(members, len(holders[c]))):
            parts[client].extend(chunk.tolist())
    return [sorted(part) for part in parts]


def apply_size_imbalance(parts: Sequence[Sequence[int]], sigma: float, seed: int) -> list[list[int]]:
    """Re-cut ``parts`` so that client sizes follow log-normal(0, ``sigma``) proportions.

    The clients' samples are pooled in client order (each client's indices in their given order) and
    the pool is cut into consecutive pieces of the new sizes: client ``i`` keeps mostly its own
    samples, spilling into or taking from its neighbours, so a label-skewed partition stays mostly
    skewed. Sizes are ``1 + floor`` of the weights' share of the remaining ``n - num_clients`` samples,
    leftovers going to the largest remainders, so every client keeps at least one sample and every
    sample stays assigned exactly once. ``sigma == 0`` returns the parts unchanged (sorted).
    """
    if sigma < 0:
        raise ValueError(f"size imbalance sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return [sorted(int(i) for i in part) for part in parts]
    pool = [int(i) for part in parts for i in part]
    num_clients, n = len(parts), len(pool)
    if num_clients == 0:
        return []
    if n < num_clients:
        raise ValueError(f"size imbalance needs at least one sample per client: {n} samples, "
                         f"{num_clients} clients")
    weights = np.random.default_rng(seed).lognormal(0.0, sigma, num_clients)
    share = weights / weights.sum() * (n - num_clients)
    sizes = np.floor(share).astype(int)
    # Largest remainder; argsort is stable, so ties go to the lower client index on every machine.
    leftover = (n - num_clients) - int(sizes.sum())
    sizes[np.argsort(-(share - sizes), kind="stable")[:leftover]] += 1
    sizes += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [sorted(pool[bounds[i]:bounds[i + 1]]) for i in range(num_clients)]


def partition(labels: Sequence[int], num_clients: int, scheme: str, seed: int, alpha: float = _FED.alpha,
              k: int = _FED.labels_per_client, size_sigma: float = _FED.size_sigma,
              min_size: int = 1) -> list[list[int]]:
    """Split by ``scheme`` ("iid", "dirichlet" with ``alpha``/``min_size``, "labels" with ``k``
    labels per client), then, if ``size_sigma > 0``, apply :func:`apply_size_imbalance`. The defaults
    are those of ``fed.alpha``, ``fed.labels_per_client`` and ``fed.size_sigma``."""
    if scheme == "iid":
        parts = iid(labels, num_clients, seed)
    elif scheme == "dirichlet":
        parts = dirichlet(labels, num_clients, alpha, seed, min_size=min_size)
    elif scheme == "labels":
        parts = labels_per_client(labels, num_clients, k, seed)
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    return apply_size_imbalance(parts, size_sigma, seed) if size_sigma > 0 else parts


def label_skew(parts: Sequence[Sequence[int]], labels: Sequence[int], num_classes: int) -> float:
    """Mean total-variation distance between each non-empty client's label distribution and the
    global one: 0 for identical distributions, approaching 1 when clients hold disjoint rare labels."""
    y = _as_labels(labels)
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
    if len(y) == 0:
        return 0.0
    overall = np.bincount(y, minlength=num_classes) / len(y)
    distances = []
    for part in parts:
        if len(part):
            local = np.bincount(y[np.asarray(part, dtype=np.int64)], minlength=num_classes) / len(part)
            distances.append(0.5 * np.abs(local - overall).sum())
    return float(np.mean(distances)) if distances else 0.0


def _as_labels(labels: Sequence[int]) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {tuple(y.shape)}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    return y.astype(np.int64)


def _check_clients(num_clients: int, n: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if n < num_clients:
        raise ValueError(f"cannot split {n} samples among {num_clients} clients (need at least one each)")

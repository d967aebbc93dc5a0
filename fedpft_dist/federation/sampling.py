"""Shared decisions of a round, as pure functions of (seed, round): every rank computes the same."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def clients_per_round(num_clients: int, fraction: float) -> int:
    """K = max(1, floor(N * fraction))."""
    return max(1, math.floor(num_clients * fraction))


def sample_clients(num_clients: int, k: int, seed: int, round_idx: int) -> list[int]:
    """K distinct client ids for round ``round_idx``, sorted; identical on every rank."""
    rng = np.random.default_rng([seed, round_idx, 0x5A])
    return sorted(rng.choice(num_clients, size=k, replace=False).tolist())


def client_seed(seed: int, round_idx: int, client: int) -> int:
    """The seed of one client's local training in one round (batch order, dropout): the same whichever
    rank trains it, so 1 rank and W ranks produce the same updates."""
    return int(np.random.default_rng([seed, round_idx, client, 0xC1]).integers(0, 2**31 - 1))


def assign_to_ranks(clients: Sequence[int], cost: Sequence[float], world_size: int) -> list[list[int]]:
    """Longest-processing-time assignment: clients by falling cost (ties by id) go to the least
    loaded rank (ties to the lowest rank). Balances token counts; deterministic."""
    order = sorted(range(len(clients)), key=lambda i: (-cost[i], clients[i]))
    loads = [0.0] * world_size
    out: list[list[int]] = [[] for _ in range(world_size)]
    for i in order:
        r = min(range(world_size), key=lambda j: (loads[j], j))
        out[r].append(clients[i])
        loads[r] += cost[i]
    return [sorted(x) for x in out]


def round_lr(base_lr: float, schedule: str, round_idx: int, rounds: int) -> float:
    """Learning rate of round t (0-based): constant, exponential (0.95^t), inverse (1/(t+1)) or
    linear decay to zero over the run."""
    if schedule == "constant":
        return base_lr
    if schedule == "exponential":
        return base_lr * 0.95 ** round_idx
    if schedule == "inverse":
        return base_lr / (round_idx + 1)
    if schedule == "linear":
        return base_lr * (1.0 - round_idx / max(1, rounds))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")

"""``fedpft bench``: time one federated workload phase by phase and write bench.json.

The measurements themselves (rounds, local training, all-reduce against a bare one, alignment,
evaluation, limits) are :mod:`fedpft_dist.benchmarks.federated`.
"""
from __future__ import annotations

from ..benchmarks import federated
from ..config import Config


def run_bench(cfg: Config) -> int:
    """Run the workload of ``cfg`` on every rank of the job; rank 0 prints the result and writes bench.json."""
    federated.run_bench(cfg)
    return 0

"""Functions that run inside 2-rank jobs started by the tests (spawned or as scripts)."""
from __future__ import annotations

import json
import os
import sys
import time

import torch

from fedpft_dist.errors import CollectiveError
from fedpft_dist.runtime import init_runtime


def comm_suite(rank: int, out_dir: str) -> None:
    """Exercise every communicator method; rank r writes what it received to out_dir/rank{r}.json."""
    rt = init_runtime(timeout_s=60, threads_per_rank=1)
    comm = rt.comm
    # Weighted sum as the engine does it: rank 0 has weight 3 (3 samples), rank 1 weight 0.
    weight = [3.0, 0.0][rank]
    theta = torch.arange(6, dtype=torch.float32).reshape(2, 3) * (rank + 1)
    mixed = {
        "theta": weight * theta,                                      # float32, 2-D
        "bias": torch.full((5,), weight * (rank + 0.5), dtype=torch.float64),
        "count": torch.tensor([int(weight)], dtype=torch.int64),
        "hits": torch.tensor([[rank + 1, 10 * (rank + 1)]], dtype=torch.int32),
        "half": torch.full((3,), float(rank + 1), dtype=torch.bfloat16),
    }
    summed = comm.all_reduce_sum(mixed)
    state = {"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(11)), "step": torch.tensor([7])} \
        if rank == 0 else None
    got = comm.broadcast_state(state)
    metrics_sum = comm.all_reduce_metrics({"loss": 1.5 * (rank + 1), "n": float(rank)})
    metrics_max = comm.all_reduce_metrics({"t": float(rank + 2)}, op="max")
    agree_min = comm.agree(rank == 0, "min")
    agree_max = comm.agree(rank == 0, "max")
    comm.barrier()
    try:
        comm.all_reduce_sum({"flag": torch.tensor([True])})
        bool_rejected = False
    except TypeError:
        bool_rejected = True
    result = {
        "theta": summed["theta"].tolist(), "theta_dtype": str(summed["theta"].dtype),
        "bias": summed["bias"].tolist(), "bias_dtype": str(summed["bias"].dtype),
        "count": summed["count"].tolist(), "count_dtype": str(summed["count"].dtype),
        "hits": summed["hits"].tolist(), "half": summed["half"].float().tolist(),
        "half_dtype": str(summed["half"].dtype),
        "bcast_w": got["w"].tolist(), "bcast_step": got["step"].tolist(),
        "metrics_sum": metrics_sum, "metrics_max": metrics_max,
        "agree_min": agree_min, "agree_max": agree_max, "bool_rejected": bool_rejected,
        "world_size": rt.world_size, "backend": rt.backend,
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)
    rt.shutdown()


def fault_main(mode: str, timeout_s: float) -> int:
    """Rank 1 leaves mid-job (``exit``: dies; ``hang``: stops answering); rank 0 is inside an
    all-reduce and must end non-zero naming it, as the CLI does."""
    rt = init_runtime(timeout_s=timeout_s, threads_per_rank=1)
    rt.comm.barrier(name="startup")
    if rt.rank == 1:
        if mode == "exit":
            os._exit(17)
        time.sleep(10 * timeout_s + 120)
        return 0
    try:
        rt.comm.all_reduce_sum({"adapter": torch.ones(1000)}, name="aggregate/adapter")
    except CollectiveError as exc:  # what fedpft_dist.cli does
        sys.stderr.write(f"fedpft: error: {exc}\n")
        sys.stderr.flush()
        os._exit(3)
    return 0


if __name__ == "__main__":
    raise SystemExit(fault_main(sys.argv[1], float(sys.argv[2])))


def fake_client_adapter(c: int) -> dict:
    """Client c's "update" in the aggregation tests: seeded tensors; client 4's is NaN."""
    g = torch.Generator().manual_seed(100 + c)
    state = {"a.lora_A.weight": torch.randn(2, 3, generator=g), "head.weight": torch.randn(4, generator=g)}
    if c == 4:
        state["head.weight"] = torch.full((4,), float("nan"))
    return state


def aggregation_suite(rank: int, out_dir: str, aggregation: str, clients_per_rank: list) -> None:
    """Each rank accumulates its clients (client c has c + 1 examples) and joins one reduce; rank r
    writes the mean and counters to out_dir/rank{r}.json."""
    from fedpft_dist.federation.aggregation import make_aggregator
    from fedpft_dist.federation.client import ClientUpdate

    rt = init_runtime(timeout_s=60, threads_per_rank=1)
    agg = make_aggregator(aggregation, fake_client_adapter(0))
    for c in clients_per_rank[rank]:
        upd = ClientUpdate(fake_client_adapter(c), num_samples=c + 1, loss_sum=0.0, steps=1, tokens=0)
        agg.accumulate(upd.adapter, agg.weight(upd))
    red = agg.reduce(rt.comm, {"rider": torch.tensor([float(rank + 1)], dtype=torch.float64)})
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"mean": {k: v.tolist() for k, v in red.mean.items()}, "excluded": red.excluded,
                   "all_finite": red.all_finite, "total_weight": red.total_weight,
                   "rider": red.extra["rider"].tolist(), "bytes": red.payload_bytes}, fh)
    rt.shutdown()

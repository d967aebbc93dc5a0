"""A federated run in which one client's round-1 update is poisoned with NaN.

Started by tests/test_federation.py under torchrun (2 ranks):

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/fed_worker.py OUT_DIR key=value ...

Every rank wraps ``engine.assign_to_ranks`` (to learn round 1's assignment, identical on every rank)
and ``engine.train_client``: the first client that the *last* rank trains in round 1 gets an update
whose first adapter tensor is filled with NaN, so the exclusion has to travel from a rank other than
rank 0 (which writes the metrics). The poisoning rank writes OUT_DIR/poisoned-rank<r>.json.
"""
from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    out_dir = Path(argv[0])
    overrides = argv[1:]
    from fedpft_dist.environment import prepare_process

    prepare_process()
    import torch

    import fedpft_dist.federation.engine as engine
    from fedpft_dist.config import load_config
    from fedpft_dist.federation.sampling import client_seed

    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    state: dict = {"assignment": None, "target": None, "poisoned": []}
    real_assign = engine.assign_to_ranks
    real_train = engine.train_client
    signature = inspect.signature(real_train)

    def assign(clients, cost, world_size):
        out = real_assign(clients, cost, world_size)
        if state["assignment"] is None:          # the first call is round 1's
            state["assignment"] = [list(x) for x in out]
            state["target"] = out[-1][0]         # a client of the last rank
        return out

    def train(*args, **kwargs):
        update = real_train(*args, **kwargs)
        seed = signature.bind(*args, **kwargs).arguments["seed"]
        if state["target"] is not None and seed == client_seed(cfg.run.seed, 0, state["target"]):
            key = sorted(update.adapter)[0]
            update.adapter[key] = torch.full_like(update.adapter[key], float("nan"))
            state["poisoned"].append({"client": state["target"], "round": 1, "key": key})
        return update

    engine.assign_to_ranks = assign
    engine.train_client = train
    engine.run_federated(cfg)
    rank = int(os.environ.get("RANK", "0"))
    if state["poisoned"]:
        (out_dir / f"poisoned-rank{rank}.json").write_text(json.dumps(
            {"rank": rank, "assignment": state["assignment"], "poisoned": state["poisoned"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""In-domain public text for a classification config: the training rows its `data.max_train` leaves
out (in no client's data, not in the test split), written as JSON lines with a "text" field, for
`public_text.source=FILE`. The run's seed decides the split, so use the config's `run.seed`.

    python scripts/in_domain_text.py --config configs/quickstart.yaml --out runs/tweets-public.jsonl
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedpft_dist.config import load_config
from fedpft_dist.data.tasks import held_back_texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    texts = held_back_texts(cfg)
    if not texts:
        raise SystemExit(f"{args.config}: data.max_train ({cfg.data.max_train}) leaves no training row out")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    print(f"{len(texts)} texts of {cfg.data.dataset} (rows data.max_train leaves out) -> {args.out}")


if __name__ == "__main__":
    main()

"""`launcher/torchrun.sh N ARGS` on two "nodes" of this machine, for scripts/scaling.sh.

    python scripts/scaling_nodes.py N bench --config FILE run.dir=DIR ...

The nodes are two network namespaces joined by a veth pair, each with its own host name
(tests/netns_nodes.py, which tests/test_two_nodes.py uses too): every byte between them crosses the
pair. Each node runs torchrun with N ranks; the nodes meet through a c10d rendezvous on node1. Their
outputs follow one another on stdout (node1's, then node2's). Exit status: the first node's that
failed, else 0; 77, with the reason as the last line on stdout, when the namespaces cannot be made
here (not root, no iproute2, ...). Every process left in the namespaces is killed on the way out.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from netns_nodes import NetnsUnavailable, two_nodes  # noqa: E402

UNAVAILABLE = 77
RDZV_PORT = 29500


def run_on(nodes, nproc: int, args: list[str]) -> int:
    """torchrun on both nodes at once; when one fails the other is stopped (its ranks would wait for the
    missing ones until dist.timeout_s)."""
    rdzv = (f"--nnodes 2 --rdzv-backend c10d --rdzv-endpoint {nodes[0].name}:{RDZV_PORT} "
            f"--rdzv-id scaling-{os.getpid()} --rdzv-conf join_timeout=120")
    env = {**os.environ, "TORCHRUN_ARGS": rdzv}
    with tempfile.TemporaryDirectory(prefix="scaling-nodes-") as tmp:
        logs = [Path(tmp) / f"{node.name}.log" for node in nodes]
        procs = []
        for node, log in zip(nodes, logs):
            with open(log, "wb") as f:
                procs.append(subprocess.Popen([*node.prefix, "bash", str(REPO / "launcher" / "torchrun.sh"),
                                               str(nproc), *args], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                              stdout=f, stderr=subprocess.STDOUT))
        while True:   # until both have finished, or one has failed
            codes = [p.poll() for p in procs]
            if None not in codes or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.5)
        for p in procs:
            if p.poll() is None:
                p.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(10)
        for node, log, p in zip(nodes, logs, procs):
            print(f"--- {node.name} (exit {p.poll()}) ---\n{log.read_text(errors='replace')}", flush=True)
    return next((p.returncode for p in procs if p.returncode), 0)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: python scripts/scaling_nodes.py N FEDPFT-ARGS...", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        try:
            nodes = stack.enter_context(two_nodes())
        except NetnsUnavailable as exc:
            print(f"two nodes cannot be made here: {exc}", flush=True)
            return UNAVAILABLE
        return run_on(nodes, int(argv[0]), argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

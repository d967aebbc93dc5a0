"""Two real nodes on one machine: two network namespaces joined by a veth pair, each with its own host
name (tests/netns_nodes.py), so that every byte between the ranks crosses the pair.

(a) torchrun --nnodes 2 --nproc-per-node 1 through launcher/torchrun.sh, c10d rendezvous on node1:
    `fedpft doctor`, and a tiny `train` whose global adapter must equal a 1-rank run's;
(b) a two-node Slurm (slurmctld on node1, one slurmd per node, tests/slurm_cluster.py):
    slurm/multi-node.sbatch and slurm/srun-per-gpu.sbatch with --nodes=2, the same train and check.

Skipped, with the reason, when not root, when network namespaces cannot be made or (b) when Slurm is
not installed or does not come up (FEDPFT_TEST_INSTALL_SLURM=1 lets it apt-get install Slurm);
FEDPFT_REQUIRE_SLURM=1 turns those skips into failures, as in tests/test_slurm.py.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CHEAP_RUN, PYTHON, REPO, TINY_RUN_ARGS, child_env
from helpers import adapter, assert_trained, max_abs_diff
from netns_nodes import NetnsUnavailable, two_nodes
from slurm_cluster import SlurmUnavailable, _children_of, slurm_cluster
from test_slurm import submit

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.cluster]

REQUIRED = os.environ.get("FEDPFT_REQUIRE_SLURM") == "1"
# The suite's cheap train (conftest.CHEAP_RUN: proxy, 3 rounds of 4 of the 8 clients, evaluation on 32
# test rows sharded over the ranks; no distillation, alignment or fidelity probe), so that its shared
# 1-rank run is the reference. Every rank logs (log_all_ranks), so each node's output shows its rank.
TRAIN = (*TINY_RUN_ARGS, *CHEAP_RUN, "dist.timeout_s=60", "dist.log_all_ranks=true")
# 16 MiB, median of 5: the gloo bandwidth over the veth pair (printed; `pytest -s` shows it)
DOCTOR = ("doctor", "--config", "configs/tiny.yaml", "doctor.allreduce_mb=16", "doctor.iters=5",
          "dist.timeout_s=60")
# A run takes 20-30 s on 2 quiet cores (both nodes share them), 50 s on a busy machine.
RUN_TIMEOUT_S = 240
DOCTOR_LINE = re.compile(r"^\[rank (\d)/2\] (\S+) device cpu backend gloo: all-reduce sum = 3 \(expected 3\) ok$",
                         re.M)


def _runtime_line(kind: str) -> re.Pattern:
    return re.compile(rf"\[rank (\d)/2\] INFO fedpft_dist\.runtime\.dist: runtime: {kind} launch, world size 2,")


def _unavailable(why: str):
    if REQUIRED:
        pytest.fail(f"FEDPFT_REQUIRE_SLURM=1 but: {why}")
    pytest.skip(why)


def _entered(make, unavailable: type):
    """The context manager ``make()`` entered for a module's tests, exited after them; a setup that
    raises ``unavailable`` skips them (or fails them where CI requires them)."""
    try:
        cm = make()
        started = cm.__enter__()
    except unavailable as exc:
        _unavailable(str(exc))
    try:
        yield started
    finally:
        cm.__exit__(None, None, None)


@pytest.fixture(scope="module")
def nodes():
    yield from _entered(two_nodes, NetnsUnavailable)


@pytest.fixture(scope="module")
def cluster(nodes):
    install = os.environ.get("FEDPFT_TEST_INSTALL_SLURM") == "1"
    yield from _entered(lambda: slurm_cluster(install=install, nodes=nodes), SlurmUnavailable)


@pytest.fixture(scope="module")
def reference(cheap_run):
    """The same train on 1 rank, a plain process on this machine (the suite's shared run): its adapter
    is what 2 ranks on 2 nodes must reproduce (1 rank = 2 ranks is tests/test_federation.py's guarantee)."""
    state = adapter(cheap_run)
    assert_trained(state)  # two untrained adapters would be equal too
    return state


def _check_adapter(run: Path, reference, report: str) -> None:
    summary = run / "summary.json"
    assert summary.is_file(), f"no {summary}\n{report}"
    assert json.loads(summary.read_text())["world_size"] == 2, report
    # tests/test_federation.py's tolerance: bit-identical when measured, room for other CPUs' kernels.
    assert max_abs_diff(reference, adapter(run)) <= 1e-5, report


# ----------------------------------------------------------------------------------------------------
# (a) torchrun on two nodes, without Slurm
# ----------------------------------------------------------------------------------------------------

def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts each rank in a session of its own,
    so killing torchrun's process group would leave the ranks running)."""
    tree, todo = [pid], [pid]
    while todo:
        todo = _children_of(set(todo))
        tree += todo
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def torchrun_two_nodes(nodes, tmp: Path, args: list[str], rdzv_port: int) -> list[str]:
    """launcher/torchrun.sh 1 ARGS on each node at once, nodes meeting at node1:rdzv_port; returns
    each node's output (stdout and stderr), after asserting that both exited with 0."""
    rdzv = (f"--nnodes 2 --rdzv-backend c10d --rdzv-endpoint {nodes[0].name}:{rdzv_port} "
            f"--rdzv-id fedpft-{rdzv_port} --rdzv-conf join_timeout=60")
    env = child_env(FEDPFT_PYTHON=PYTHON, TORCHRUN_ARGS=rdzv)
    outs = [tmp / f"{node.name}.out" for node in nodes]
    procs = []
    try:
        for node, out in zip(nodes, outs):
            with open(out, "wb") as f:
                procs.append(subprocess.Popen([*node.prefix, "bash", str(REPO / "launcher" / "torchrun.sh"),
                                               "1", *args], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                              stdout=f, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + RUN_TIMEOUT_S
        for proc in procs:
            proc.wait(max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                _kill_tree(proc.pid)
                proc.wait(10)
    texts = [out.read_text(errors="replace") for out in outs]
    report = "\n".join(f"--- {node.name} (exit {proc.returncode}) ---\n{text[-5000:]}"
                       for node, proc, text in zip(nodes, procs, texts))
    assert all(proc.returncode == 0 for proc in procs), f"torchrun failed or timed out (-9)\n{report}"
    return texts


def test_torchrun_doctor_on_two_nodes(nodes, tmp_path):
    run = tmp_path / "run"
    texts = torchrun_two_nodes(nodes, tmp_path, [*DOCTOR, f"run.dir={run}"], 29400)
    report = "\n".join(texts)
    # Each node prints its own rank's line, with the host name that rank saw.
    seen = [DOCTOR_LINE.findall(text) for text in texts]
    assert [[host for _, host in lines] for lines in seen] == [[node.name] for node in nodes], report
    assert sorted(rank for lines in seen for rank, _ in lines) == ["0", "1"], report
    doctor = json.loads((run / "doctor.json").read_text())
    res = doctor["allreduce"]
    assert res["world_size"] == 2 and res["sum_ok"] is True, report
    assert doctor["environment"]["launch"]["kind"] == "torchrun", report
    assert res["bytes"] == 16 << 20 and res["iters"] == 5 and 0 < res["algbw_GBps"] < 1e3, res
    print(f"two-node all-reduce over the veth pair: {res['bytes'] >> 20} MiB fp32, median {res['median_s']:.4f} s "
          f"of {res['iters']}: algbw {res['algbw_GBps']:.3f} GB/s, busbw {res['busbw_GBps']:.3f} GB/s")


def test_torchrun_train_on_two_nodes_equals_one_rank(nodes, reference, tmp_path):
    run = tmp_path / "run"
    texts = torchrun_two_nodes(nodes, tmp_path, [*TRAIN, f"run.dir={run}"], 29401)
    report = "\n".join(text[-3000:] for text in texts)
    ranks = [_runtime_line("torchrun").findall(text) for text in texts]
    assert len(ranks[0]) == 1 and len(ranks[1]) == 1 and sorted(ranks[0] + ranks[1]) == ["0", "1"], report
    _check_adapter(run, reference, report)


# ----------------------------------------------------------------------------------------------------
# (b) the Slurm templates on a two-node cluster
# ----------------------------------------------------------------------------------------------------

def test_multi_node_template_on_two_nodes(cluster, reference, tmp_path):
    """One torchrun per node (srun), c10d rendezvous on the job's first node, one rank per node."""
    run = tmp_path / "run"
    job_id, report = submit(cluster, tmp_path, "multi-node.sbatch", ["--nodes=2"], [*TRAIN, f"run.dir={run}"],
                            timeout=RUN_TIMEOUT_S)
    batch = (tmp_path / f"batch-{job_id}.out").read_text()
    assert f"2 nodes x 1 ranks, rendezvous {cluster.nodes[0].name}:" in batch, report
    ranks = []
    for node_id in (0, 1):
        log = tmp_path / "logs" / job_id / f"node-{node_id}.log"
        assert log.is_file(), f"no per-node log {log}\n{report}"
        found = _runtime_line("torchrun").findall(log.read_text())
        assert len(found) == 1, f"expected one rank's runtime line in {log}\n{report}"
        ranks += found
    assert sorted(ranks) == ["0", "1"], report
    _check_adapter(run, reference, report)


def test_srun_per_gpu_template_on_two_nodes(cluster, reference, tmp_path):
    """One Slurm task per node, rank and world size from Slurm, rank 0's node as MASTER_ADDR."""
    run = tmp_path / "run"
    job_id, report = submit(cluster, tmp_path, "srun-per-gpu.sbatch", ["--nodes=2", "--ntasks=2"],
                            [*TRAIN, f"run.dir={run}"], timeout=RUN_TIMEOUT_S)
    batch = (tmp_path / f"batch-{job_id}.out").read_text()
    assert "2 tasks on node[1-2];" in batch, report
    for rank in (0, 1):
        log = tmp_path / "logs" / job_id / f"rank-{rank}.log"
        assert log.is_file(), f"no per-rank log {log}\n{report}"
        assert _runtime_line("slurm").findall(log.read_text()) == [str(rank)], f"rank {rank} line\n{report}"
    _check_adapter(run, reference, report)

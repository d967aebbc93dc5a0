"""The slurm/*.sbatch templates against a real one-node Slurm cluster (tests/slurm_cluster.py).

Skipped, with the reason, when not root, when Slurm is not installed (FEDPFT_TEST_INSTALL_SLURM=1
lets the test apt-get install it) or when the cluster does not come up; FEDPFT_REQUIRE_SLURM=1 turns
those skips into failures (for CI, where the cluster is expected to work).
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

try:
    from .slurm_cluster import SlurmCluster, SlurmUnavailable, slurm_cluster
except ImportError:
    from slurm_cluster import SlurmCluster, SlurmUnavailable, slurm_cluster

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 120  # `timeout` around sbatch --wait; each job takes ~5 s here
DOCTOR_ARGS = ("doctor.allreduce_mb=1", "doctor.iters=2", "dist.timeout_s=60")
# Inherited launcher variables would change how the ranks see themselves.
SCRUB_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "PMI_", "OMPI_", "MPI_", "TORCHELASTIC_")
SCRUB = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
         "FEDPFT_HOME", "FEDPFT_LOG_DIR", "GPUS_PER_NODE", "OMP_NUM_THREADS", "RDZV_PORT"}


def _rank_line(rank: int, world: int) -> re.Pattern:
    return re.compile(rf"\[rank {rank}/{world}\] .*all-reduce sum = 3 \(expected 3\) ok")


@pytest.fixture(scope="module")
def cluster():
    try:
        cm = slurm_cluster(install=os.environ.get("FEDPFT_TEST_INSTALL_SLURM") == "1")
        started = cm.__enter__()
    except SlurmUnavailable as exc:
        if os.environ.get("FEDPFT_REQUIRE_SLURM") == "1":
            pytest.fail(f"FEDPFT_REQUIRE_SLURM=1 but: {exc}")
        pytest.skip(str(exc))
    try:
        yield started
    finally:
        cm.__exit__(None, None, None)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError as exc:
        return f"<{exc}>"


def submit(cluster: SlurmCluster, tmp: Path, template: str, sbatch_args: list[str],
           fedpft_args: list[str], env_extra: dict[str, str] | None = None) -> tuple[str, str]:
    """sbatch --wait the template from the repository root; returns (job id, report for asserts)."""
    env = {k: v for k, v in cluster.env.items() if k not in SCRUB and not k.startswith(SCRUB_PREFIXES)}
    env.update(FEDPFT_LOG_DIR=str(tmp / "logs"), FEDPFT_PYTHON=sys.executable, **(env_extra or {}))
    cmd = ["sbatch", "--wait", "--parsable", f"--chdir={REPO}", f"--output={tmp}/batch-%j.out",
           "--time=5", *sbatch_args, f"slurm/{template}", *fedpft_args]
    proc = cluster.run(cmd, timeout=JOB_TIMEOUT_S, env=env, cwd=str(REPO))
    job_id = proc.stdout.strip().splitlines()[0].split(";")[0] if proc.stdout.strip() else "?"
    logs = sorted((tmp / "logs").rglob("*.log")) if (tmp / "logs").exists() else []
    report = "\n".join([
        f"$ {' '.join(cmd)}", f"exit {proc.returncode}", f"stdout: {proc.stdout}", f"stderr: {proc.stderr}",
        f"--- batch log ---\n{_read(tmp / f'batch-{job_id}.out')}",
        *(f"--- {p.relative_to(tmp)} ---\n{_read(p)}" for p in logs),
        cluster.diagnostics(),
    ])
    assert proc.returncode == 0, f"sbatch --wait failed (124 = timed out)\n{report}"
    return job_id, report


def _two_cpus(cluster: SlurmCluster) -> list[str]:
    # Two ranks want two CPUs; on a one-CPU node let Slurm overcommit instead of rejecting the job.
    return [] if cluster.cpus >= 2 else ["--overcommit"]


def test_srun_per_gpu_two_tasks(cluster, tmp_path):
    run_dir = tmp_path / "run"
    job_id, report = submit(cluster, tmp_path, "srun-per-gpu.sbatch", ["--ntasks=2", *_two_cpus(cluster)],
                            ["doctor", f"run.dir={run_dir}", *DOCTOR_ARGS])
    for rank in (0, 1):
        log = tmp_path / "logs" / job_id / f"rank-{rank}.log"
        assert log.is_file(), f"no per-rank log {log}\n{report}"
        assert _rank_line(rank, 2).search(log.read_text()), f"rank {rank} line missing in {log}\n{report}"
    assert (run_dir / "doctor.json").is_file(), report
    assert '"kind": "slurm"' in (run_dir / "doctor.json").read_text(), report


def test_single_node_torchrun(cluster, tmp_path):
    run_dir = tmp_path / "run"
    cpus = str(min(2, cluster.cpus))
    job_id, report = submit(cluster, tmp_path, "single-node.sbatch",
                            ["--ntasks=1", f"--cpus-per-task={cpus}", *_two_cpus(cluster)],
                            ["doctor", f"run.dir={run_dir}", *DOCTOR_ARGS], {"GPUS_PER_NODE": "2"})
    job_logs = tmp_path / "logs" / job_id
    for rank in (0, 1):
        logs = list(job_logs.glob(f"*/attempt_0/{rank}/stdout.log"))
        assert len(logs) == 1, f"expected one torchrun log for local rank {rank} under {job_logs}\n{report}"
        assert _rank_line(rank, 2).search(logs[0].read_text()), f"rank {rank} line missing\n{report}"
    assert (run_dir / "doctor.json").is_file(), report
    assert '"kind": "torchrun"' in (run_dir / "doctor.json").read_text(), report


def test_multi_node_template_on_one_node(cluster, tmp_path):
    """The c10d rendezvous path of the multi-node template, with the one node this cluster has."""
    run_dir = tmp_path / "run"
    cpus = str(min(2, cluster.cpus))
    job_id, report = submit(cluster, tmp_path, "multi-node.sbatch",
                            ["--nodes=1", f"--cpus-per-task={cpus}", *_two_cpus(cluster)],
                            ["doctor", f"run.dir={run_dir}", *DOCTOR_ARGS], {"GPUS_PER_NODE": "2"})
    node_log = tmp_path / "logs" / job_id / "node-0.log"
    assert node_log.is_file(), f"no per-node log {node_log}\n{report}"
    text = node_log.read_text()
    for rank in (0, 1):
        assert _rank_line(rank, 2).search(text), f"rank {rank} line missing in {node_log}\n{report}"
    assert (run_dir / "doctor.json").is_file(), report

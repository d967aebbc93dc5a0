"""The slurm/*.sbatch templates, the sweep array job among them, against a real one-node Slurm cluster
(tests/slurm_cluster.py), started once for all of them.

Skipped, with the reason, when not root, when Slurm is not installed (FEDPFT_TEST_INSTALL_SLURM=1
lets the test apt-get install it) or when the cluster does not come up; FEDPFT_REQUIRE_SLURM=1 turns
those skips into failures (for CI, where the cluster is expected to work).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli

try:
    from .slurm_cluster import SlurmCluster, SlurmUnavailable, slurm_cluster
except ImportError:
    from slurm_cluster import SlurmCluster, SlurmUnavailable, slurm_cluster

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.cluster]

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


def _sbatch(cluster: SlurmCluster, tmp: Path, template: str, sbatch_args: list[str], fedpft_args: list[str],
            env_extra: dict[str, str] | None, timeout: float, wait: bool):
    env = {k: v for k, v in cluster.env.items() if k not in SCRUB and not k.startswith(SCRUB_PREFIXES)}
    env.update(FEDPFT_LOG_DIR=str(tmp / "logs"), FEDPFT_PYTHON=sys.executable, **(env_extra or {}))
    cmd = ["sbatch", *(["--wait"] if wait else []), "--parsable", f"--chdir={REPO}",
           f"--output={tmp}/batch-%j.out", "--time=5", *sbatch_args, f"slurm/{template}", *fedpft_args]
    proc = cluster.run(cmd, timeout=timeout, env=env, cwd=str(REPO))
    job_id = proc.stdout.strip().splitlines()[0].split(";")[0] if proc.stdout.strip() else "?"
    return cmd, proc, job_id


def _report(cluster: SlurmCluster, tmp: Path, job_id: str, *lines: str) -> str:
    logs = sorted((tmp / "logs").rglob("*.log")) if (tmp / "logs").exists() else []
    return "\n".join([
        *lines,
        f"--- batch log ---\n{_read(tmp / f'batch-{job_id}.out')}",
        *(f"--- {p.relative_to(tmp)} ---\n{_read(p)}" for p in logs),
        cluster.diagnostics(),
    ])


def submit(cluster: SlurmCluster, tmp: Path, template: str, sbatch_args: list[str],
           fedpft_args: list[str], env_extra: dict[str, str] | None = None,
           timeout: float = JOB_TIMEOUT_S) -> tuple[str, str]:
    """sbatch --wait the template from the repository root; returns (job id, report for asserts)."""
    cmd, proc, job_id = _sbatch(cluster, tmp, template, sbatch_args, fedpft_args, env_extra, timeout,
                                wait=True)
    report = _report(cluster, tmp, job_id, f"$ {' '.join(cmd)}", f"exit {proc.returncode}",
                     f"stdout: {proc.stdout}", f"stderr: {proc.stderr}")
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


# ----------------------------------------------------------------------------------------------------
# A stop signal: the ranks checkpoint at the end of the round, the template requeues the job, and the
# requeued job continues from the checkpoint
# ----------------------------------------------------------------------------------------------------

ROUNDS = 4
TRAIN_ARGS = ("train", "--config", "configs/tiny.yaml", "dist.threads_per_rank=1", "dist.timeout_s=60",
              "fed.method=fedpft_no_layer_distill", "fed.align_every=0", "fed.fidelity_every=0",
              f"fed.rounds={ROUNDS}", "fed.resume=true")
# Each test takes ~40-70 s on 2 idle cores (start-up ~15 s, ~3 s a round, the requeued job starts
# ~11 s after attempt 1), three times that on a busy machine.
FIRST_ROUND_TIMEOUT_S = 240
REQUEUED_TIMEOUT_S = 360      # from the signal: the rest of attempt 1, the requeue delay, attempt 2
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
STOP_LINE = re.compile(rf"fedpft: stopped after round (\d+) of {ROUNDS} on a stop signal")


def _job_state(cluster: SlurmCluster, job_id: str) -> dict[str, str] | None:
    """JobState, Restarts and ExitCode from `scontrol show job` (None once the job has left the
    controller, MinJobAge seconds after it ended; there is no accounting to ask afterwards)."""
    proc = cluster.run(["scontrol", "show", "job", "-o", job_id], timeout=15)
    if proc.returncode != 0 or "JobState=" not in proc.stdout:
        return None
    return {key: m.group(1) for key in ("JobState", "Restarts", "ExitCode")
            if (m := re.search(rf"\b{key}=(\S+)", proc.stdout))}


def _metric_rounds(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["round"] for line in path.read_text().splitlines() if line.strip()]


def _stop_and_requeue(cluster: SlurmCluster, tmp: Path, template: str, sbatch_args: list[str],
                      env_extra: dict[str, str] | None, scancel_scope: str) -> tuple[str, Path, str]:
    """Submit a 4-round train job, send SIGUSR1 once round 1 is recorded, and follow the job through
    its requeue to the end. Returns (job id, run dir, report)."""
    run_dir = tmp / "run"
    cmd, proc, job_id = _sbatch(cluster, tmp, template, ["--requeue", "--open-mode=append", *sbatch_args],
                                [*TRAIN_ARGS, f"run.dir={run_dir}"], env_extra, 60, wait=False)
    seen: list[str] = []

    def report(*lines: str) -> str:
        return _report(cluster, tmp, job_id, f"$ {' '.join(cmd)}", f"exit {proc.returncode}",
                       f"stdout: {proc.stdout}", f"stderr: {proc.stderr}", f"states seen: {seen}", *lines)

    assert proc.returncode == 0 and job_id.isdigit(), f"sbatch failed\n{report()}"
    finished = False
    try:
        deadline = time.monotonic() + FIRST_ROUND_TIMEOUT_S
        while not _metric_rounds(run_dir):
            state = _job_state(cluster, job_id)
            seen.append(str(state))
            assert state is not None and state["JobState"] not in FINAL_STATES, \
                f"job {job_id} ended before its first round\n{report()}"
            assert time.monotonic() < deadline, \
                f"no round recorded after {FIRST_ROUND_TIMEOUT_S} s\n{report()}"
            time.sleep(0.5)
        stop = cluster.run(["scancel", f"--{scancel_scope}", "--signal=USR1", job_id], timeout=15)
        assert stop.returncode == 0, f"scancel: {stop.stderr}\n{report()}"
        deadline = time.monotonic() + REQUEUED_TIMEOUT_S
        last: dict[str, str] | None = None
        while True:
            state = _job_state(cluster, job_id)
            if state is None:
                break
            last = state
            if not seen or seen[-1] != str(state):
                seen.append(str(state))
            if state["JobState"] in FINAL_STATES and state.get("Restarts", "0") != "0":
                break
            assert time.monotonic() < deadline, \
                f"job {job_id} not done {REQUEUED_TIMEOUT_S} s after the signal\n{report()}"
            time.sleep(0.5)
        finished = True
    finally:
        if not finished:
            cluster.run(["scancel", job_id], timeout=15)
    text = report()
    assert last is not None and last["JobState"] == "COMPLETED" and last.get("ExitCode") == "0:0", \
        f"requeued job did not complete\n{text}"
    assert last.get("Restarts") == "1", f"expected exactly one requeue\n{text}"
    return job_id, run_dir, text


def _check_resumed_run(tmp: Path, job_id: str, run_dir: Path, rank_output: str, report: str) -> None:
    batch_log = _read(tmp / f"batch-{job_id}.out")
    stops = [int(n) for n in STOP_LINE.findall(rank_output)]
    assert stops and all(n == stops[0] for n in stops) and 1 <= stops[0] < ROUNDS, \
        f"no (or inconsistent) stop line in the ranks' output: {stops}\n{report}"
    requeue = re.compile(rf"^fedpft: job {job_id} stopped on SIGUSR1 to the batch shell \(exit \d+\); "
                         rf"requeueing it", re.M)
    assert len(requeue.findall(batch_log)) == 1, f"requeue line missing from the batch log\n{report}"
    assert re.search(rf"^fedpft: job {job_id} \(restart 1\),", batch_log, re.M), \
        f"the requeued attempt's start line is missing (--open-mode=append keeps both)\n{report}"
    assert (run_dir / "summary.json").is_file(), f"no summary.json: the requeued run did not finish\n{report}"
    assert _metric_rounds(run_dir) == list(range(1, ROUNDS + 1)), \
        f"metrics rounds {_metric_rounds(run_dir)}\n{report}"
    assert f"continuing at round {stops[0] + 1}" in rank_output, f"attempt 2 did not resume\n{report}"


def test_srun_per_gpu_stop_signal_requeues_and_resumes(cluster, tmp_path):
    """scancel --batch --signal=USR1 (what --signal=B:USR1@T does before a time limit): srun passes
    the signal to both ranks, they exit with 75 after the round, the job is requeued, and the second
    attempt resumes from the round checkpoint to the end."""
    job_id, run_dir, report = _stop_and_requeue(cluster, tmp_path, "srun-per-gpu.sbatch",
                                                ["--ntasks=2", *_two_cpus(cluster)], None, "batch")
    rank_logs = [tmp_path / "logs" / job_id / f"rank-{r}.log" for r in (0, 1)]
    _check_resumed_run(tmp_path, job_id, run_dir, _read(rank_logs[0]), report)
    assert STOP_LINE.search(_read(rank_logs[1])), f"rank 1 did not stop on the signal\n{report}"


def test_single_node_stop_signal_requeues_and_resumes(cluster, tmp_path):
    """scancel --full --signal=USR1: the batch shell, torchrun (which ignores it) and both ranks get
    the signal; the ranks stop after the round, torchrun fails, the job is requeued and resumes."""
    cpus = str(min(2, cluster.cpus))
    job_id, run_dir, report = _stop_and_requeue(cluster, tmp_path, "single-node.sbatch",
                                                ["--ntasks=1", f"--cpus-per-task={cpus}", *_two_cpus(cluster)],
                                                {"GPUS_PER_NODE": "2"}, "full")
    batch_log = _read(tmp_path / f"batch-{job_id}.out")
    _check_resumed_run(tmp_path, job_id, run_dir, batch_log, report)
    for rank in (0, 1):  # torchrun --tee prefixes each rank's lines with [default<rank>]
        assert re.search(rf"\[default{rank}\]:{STOP_LINE.pattern}", batch_log), \
            f"rank {rank} did not stop on the signal\n{report}"


def test_sweep_array_job_on_slurm(cluster, tmp_path):
    """sbatch --array=0-1 trains both points (cheap ones: 1 round, no layer-level distillation)."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"base: {REPO / 'configs/tiny.yaml'}\nout: {tmp_path / 'runs'}\n"
                    "grid:\n  fed.align_keep: [0.5, 0.8]\n")
    overcommit = [] if cluster.cpus >= 2 else ["--overcommit"]
    _, report = submit(cluster, tmp_path, "sweep-array.sbatch", ["--array=0-1", "--cpus-per-task=1", *overcommit],
                       [str(spec), "dist.threads_per_rank=1", "fed.method=fedpft_no_layer_distill", "fed.rounds=1",
                        "fed.fidelity_every=0"])
    for name in ("000-align_keep=0.5", "001-align_keep=0.8"):
        summary = tmp_path / "runs" / name / "summary.json"
        assert summary.is_file(), f"no {summary}\n{report}"
        assert json.loads(summary.read_text())["method"] == "fedpft_no_layer_distill"
    proc = run_cli("sweep", "--list", str(spec), timeout=60)
    assert proc.stdout.splitlines()[-1] == "all points are done", proc.stdout + proc.stderr

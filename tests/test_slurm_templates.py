"""Fast checks of slurm/*.sbatch: valid bash, documented, thin and safe to submit anywhere."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((REPO / "slurm").glob("*.sbatch"))
EXPECTED = {"single-node.sbatch", "multi-node.sbatch", "srun-per-gpu.sbatch"}


def _header(text: str) -> str:
    """The leading comment block (shebang, #SBATCH lines and comments) before the first command."""
    lines = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def _variables_read(text: str) -> set[str]:
    """Upper-case variables the script reads with a default (${NAME:-...} / ${NAME:?...}), other
    than the ones Slurm sets."""
    names = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):[-?]", text))
    return {n for n in names if not n.startswith("SLURM_")}


def test_all_templates_present():
    assert EXPECTED <= {p.name for p in TEMPLATES}


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_bash_syntax(path):
    bash = shutil.which("bash")
    assert bash, "bash not found"
    proc = subprocess.run([bash, "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_documented(path):
    text = path.read_text()
    header = _header(text)
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert re.search(rf"^#\s+sbatch .*slurm/{re.escape(path.name)} (COMMAND|SPEC)", header, re.M), \
        "no usage line in the header comment"
    assert "usage:" in text, "no usage message for a call without arguments"
    undocumented = sorted(v for v in _variables_read(text) if not re.search(rf"^#\s+{v}\b", header, re.M))
    assert not undocumented, f"variables read but not documented in the header: {undocumented}"
    for var in ("FEDPFT_HOME", "FEDPFT_PYTHON", "FEDPFT_LOG_DIR"):
        assert re.search(rf"^#\s+{var}\b", header, re.M), f"{var} not documented"
    assert "SLURM_SUBMIT_DIR" in text, "FEDPFT_HOME must default to the submit dir (sbatch spools a copy)"


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_no_hardcoded_gpus_or_log_dirs(path):
    sbatch_lines = [ln for ln in path.read_text().splitlines() if ln.startswith("#SBATCH")]
    for line in sbatch_lines:
        assert not re.search(r"--(gpus|gres|gpus-per-\w+)\b|--gres=gpu", line), \
            f"GPU request hard-coded (a CPU-only partition would reject it): {line}"
        m = re.search(r"--(output|error)=(\S+)", line)
        if m:
            assert "/" not in m.group(2), f"Slurm does not create log directories: {line}"


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_no_arguments_prints_usage(path, tmp_path):
    proc = subprocess.run(["bash", str(path)], capture_output=True, text=True, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert "usage:" in proc.stderr

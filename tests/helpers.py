"""What the end-to-end tests share: run `fedpft train`, read a run's outputs, compare adapters.

Every run goes through the real command line (a plain process for 1 rank, torchrun for more) with
``dist.threads_per_rank=1``, so that 1-rank and 2-rank runs use the same thread count and their
results can be compared bit for bit.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PYTHON, REPO, child_env, run_cli, run_ranks

CONFIG = "configs/tiny.yaml"
# the metrics row entries of a round that aligned
ALIGN_KEYS = ("align_steps", "align_loss_first", "align_loss_last", "align_error_before", "align_error_after",
              "align_ffn_bytes")
# Wall-clock measurements: they differ from run to run whatever the code.
TIMING_KEYS = ("seconds", "local_seconds_per_rank", "align_step_seconds", "align_set_up_seconds")


def tail(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"


def train(run_dir: Path, *overrides: str, ranks: int = 1, config: str = CONFIG, timeout: int = 300,
          check: bool = True) -> subprocess.CompletedProcess:
    """`fedpft train --config CONFIG run.dir=... dist.threads_per_rank=1 ...` on 1 rank (a plain
    process) or under torchrun; with ``check`` it asserts success."""
    args = ["train", "--config", config, f"run.dir={run_dir}", "dist.threads_per_rank=1", *overrides]
    if ranks == 1:
        proc = run_cli(*args, timeout=timeout)
    elif check:
        proc = run_ranks(args, ranks, timeout)
    else:   # a failure's exit code and output as torchrun reports them
        proc = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                               str(ranks), "-m", "fedpft_dist", *args], cwd=REPO, env=child_env(),
                              capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, tail(proc)
    return proc


def one_line_error(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The one `fedpft: error:` line of a failed command (no traceback)."""
    assert proc.returncode == code, tail(proc)
    assert "Traceback" not in proc.stderr, tail(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fedpft: error:")]
    assert len(errors) == 1, tail(proc)
    return errors[0]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    path = run_dir / "adapter" / "adapter_model.safetensors"
    assert path.is_file(), f"no adapter at {path}"
    return load_file(str(path))


def metrics(run_dir: Path, timings: bool = False) -> list[dict]:
    """The rows of metrics.jsonl, without their wall-clock timings unless ``timings``."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return rows if timings else [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest |a - b| over all tensors; the key sets and shapes must match and all values be finite."""
    assert a, "empty adapter"
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))[:5]
    worst = 0.0
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.isfinite(a[k]).all() and torch.isfinite(b[k]).all(), f"non-finite values in {k}"
        worst = max(worst, (a[k].double() - b[k].double()).abs().max().item())
    return worst


def assert_trained(state: dict[str, torch.Tensor]) -> None:
    """LoRA B starts at zero: a trained adapter has non-zero B matrices."""
    b = [v for k, v in state.items() if ".lora_B." in k]
    assert b and any(float(v.abs().max()) > 0 for v in b), "the adapter looks untrained (all lora_B zero)"


def assert_same_rounds(a: list[dict], b: list[dict], loss_rel: float = 1e-6) -> None:
    """Two runs' metrics rows agree: the same rounds, counts and evaluation, train losses within ``loss_rel``."""
    assert [r["round"] for r in a] == [r["round"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("lr", "clients", "excluded_clients", "all_updates_finite", "accuracy", "macro_f1",
                    "predicted_per_class"):
            assert ra.get(key) == rb.get(key), (ra["round"], key, ra.get(key), rb.get(key))
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=loss_rel), ra["round"]


def assert_plan_agrees(run_dir: Path, world_size: int, out: Path, band: tuple[float, float] = (0.85, 1.15)) -> list[dict]:
    """A run measured with run.exact_memory against `fedpft memory-plan --measured`: each round
    phase's measured / planned within ``band``; the rows."""
    s = summary(run_dir)
    assert s["peak_memory_kind"] == "rss" and s["memory_exact"] is True
    proc = run_cli("memory-plan", "--config", str(run_dir / "config.yaml"), "--world-size", str(world_size),
                   "--measured", str(run_dir), "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["measured"]
    assert [r["phase"] for r in rows] == ["client_training", "alignment", "evaluation", "fidelity"]
    for r in rows:
        assert band[0] <= r["ratio"] <= band[1], rows
    return rows

"""Reliability, second pass: caches the ranks of a job share are built once, one owner per run
directory, logs that survive a kill, ranks without clients, errors that point at the broken line.

The unit tests run in-process; the end-to-end ones start real processes (marked slow)."""
import json
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, child_env

# ----------------------------------------------------------------------------------------------------
# Shared caches: built by one process while the others wait
# ----------------------------------------------------------------------------------------------------

LOAD_RANDOM = """
import sys
from fedpft_dist.models import random_init
from fedpft_dist.models.loading import load_model, resolve_model_dir

build = random_init.random_model
def counted(*args, **kwargs):
    print("building the random model", file=sys.stderr)
    return build(*args, **kwargs)
random_init.random_model = counted
model = load_model(resolve_model_dir("random:" + sys.argv[1]), "base")
print(sum(p.numel() for p in model.parameters()), float(sum(p.double().sum() for p in model.parameters())))
"""


@pytest.mark.slow
def test_two_ranks_on_an_empty_cache_build_the_model_once(tmp_path):
    """Both ranks of a job ask for the same cached model (here a random one built from a config; a
    GGUF's conversion takes the same lock) at once on an empty cache: one builds, the other waits,
    and both load the same model; no temporary directory is left."""
    from fedpft_dist.models.loading import resolve_model_dir

    source = resolve_model_dir("minilm")
    spec = tmp_path / "spec"
    spec.mkdir()
    config = {**json.loads((source / "config.json").read_text()), "num_hidden_layers": 6, "hidden_size": 768,
              "intermediate_size": 3072, "num_attention_heads": 12}
    (spec / "config.json").write_text(json.dumps(config))
    for name in ("vocab.txt", "tokenizer_config.json"):
        (spec / name).write_bytes((source / name).read_bytes())
    env = child_env(FEDPFT_CACHE=str(tmp_path / "cache"))
    procs = [subprocess.Popen([PYTHON, "-c", LOAD_RANDOM, str(spec)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert len({out.strip().splitlines()[-1] for out, _ in outs}) == 1   # the same parameters in both
    assert sum("building the random model" in err for _, err in outs) == 1
    left = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(left) == 2 and left[0] == f".{left[1]}.lock" and left[1].startswith("random-spec-s0-"), left


def test_build_once_builds_once_and_keeps_a_complete_directory(tmp_path):
    from fedpft_dist.fsutil import build_once

    calls = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "config.json").write_text("{}")

    target = tmp_path / "model"
    assert build_once(target, build) == target and build_once(target, build) == target
    assert len(calls) == 1 and (target / "config.json").is_file()
    half = tmp_path / "half"
    half.mkdir()
    (half / "weights.bin").write_text("x")   # a directory left half-built by a killed process
    build_once(half, build)
    assert sorted(p.name for p in half.iterdir()) == ["config.json"]
    with pytest.raises(RuntimeError):
        build_once(tmp_path / "fails", lambda tmp: (_ for _ in ()).throw(RuntimeError("boom")))
    assert not (tmp_path / "fails").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]


# ----------------------------------------------------------------------------------------------------
# Stop signals everywhere: fedpft distill
# ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_distill_stops_on_sigterm_with_a_checkpoint_and_resumes_without_repeating_a_step(tmp_path, tiny_run):
    """SIGTERM during `fedpft distill` (sent by the process to itself after step 2 of 4): the step ends, a
    checkpoint is written, exit 75 with one line; the resumed job logs each step once."""
    from conftest import run_cli

    args = ("distill", "--config", "configs/tiny.yaml", f"run.dir={tmp_path}", f"distill.proxy={tiny_run / 'proxy'}",
            "distill.zero_stage=0", "dist.threads_per_rank=1", "distill.log_every=1")
    stopped = subprocess.run([PYTHON, "-m", "fedpft_dist", *args], cwd=REPO, capture_output=True, text=True,
                             timeout=300, env=child_env(FEDPFT_FAULT="distill-step@2:sigterm"))
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert "stopped after step 2 of 4 on SIGTERM" in stopped.stderr and "distill.resume=true" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert (tmp_path / "checkpoints" / "distill" / "step-0000002" / "state.json").is_file()
    assert not (tmp_path / "proxy_distilled").exists()
    # a kill while writing step 3's row
    log = tmp_path / "distill_log.jsonl"
    log.write_text(log.read_text() + '{"step": 3, "lr"')
    resumed = run_cli(*args, "distill.resume=true", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "distill.json").read_text())["steps"] == 4


# ----------------------------------------------------------------------------------------------------
# Every phase fails the same way
# ----------------------------------------------------------------------------------------------------

FAULT_TIMEOUT_S = 5


def _pair(tmp_path: Path, fault: str, *overrides: str) -> tuple[subprocess.Popen, subprocess.Popen]:
    """Two ranks of `fedpft train` started as a cluster's launcher starts them (each its own process, as
    srun does: no torchrun agent to kill the survivor), rank 1 made to fail at ``fault``."""
    from fedpft_dist.runtime import free_port

    port, procs = str(free_port()), []
    for rank in range(2):
        env = child_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port, FEDPFT_FAULT=fault, FEDPFT_FAULT_RANK="1")
        procs.append(subprocess.Popen(
            [PYTHON, "-m", "fedpft_dist", "train", "--config", "configs/tiny.yaml", f"run.dir={tmp_path / 'run'}",
             "dist.threads_per_rank=1", f"dist.timeout_s={FAULT_TIMEOUT_S}", *overrides],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs[0], procs[1]


@pytest.mark.slow
def test_a_peer_lost_in_a_zero3_alignment_ends_the_survivor_with_one_line_and_exit_3(tmp_path, reuse_distilled):
    """A rank dies inside DeepSpeed's own collectives (ZeRO-3 gathers and broadcasts of an alignment
    round): before, the survivor ended with a raw gloo traceback and exit 1. A hang there ends the same
    way once the process group's timeout (dist.timeout_s) runs out; our own collectives' deaths and
    hangs are tests/test_timeout.py's."""
    fault, phase = "align/round-1-step@1:die", "during alignment"
    collective = "torch.distributed.broadcast (called by deepspeed)"
    survivor, faulty = _pair(tmp_path, fault, reuse_distilled, "fed.rounds=2", "fed.align_every=1",
                             "fed.align_steps=2", "fed.checkpoint_every=1", "data.max_test=32", "fed.fidelity_every=0")
    start = time.monotonic()
    try:
        _, err = survivor.communicate(timeout=FAULT_TIMEOUT_S + 30 + 60)   # + start-up of the run
        elapsed = time.monotonic() - start
    finally:
        for p in (survivor, faulty):
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert survivor.returncode == 3, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("fedpft: error:")]
    assert len(lines) == 1 and phase in lines[0] and collective in lines[0], err[-3000:]
    assert "Traceback" not in err
    assert elapsed < FAULT_TIMEOUT_S + 30 + 60


# ----------------------------------------------------------------------------------------------------
# One owner per run directory
# ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_command_on_a_run_dir_in_use_is_refused_and_a_dead_owner_is_taken_over(tmp_path, reuse_distilled):
    from conftest import run_cli

    run = tmp_path / "run"
    args = ("train", "--config", "configs/tiny.yaml", f"run.dir={run}", "dist.threads_per_rank=1",
            "fed.method=fedpft_no_layer_distill", "fed.align_every=0", "fed.rounds=1", "fed.fidelity_every=0",
            "data.max_test=32")
    first = subprocess.Popen([PYTHON, "-m", "fedpft_dist", *args], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=child_env(FEDPFT_FAULT="aggregation@1:hang"))
    try:
        deadline = time.monotonic() + 120
        while not (run / ".fedpft.owner").exists():   # it holds the run dir, then hangs in round 1
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.5)
        owner = json.loads((run / ".fedpft.owner").read_text())
        assert owner["pid"] == first.pid and owner["command"] == "train"
        for command in (args, ("distill", *args[1:])):
            second = run_cli(*command, timeout=120)
            assert second.returncode == 2, second.stderr[-2000:]
            assert f"run.dir {run} is in use by `fedpft train` (host {owner['host']}, pid {first.pid}, started " \
                   in second.stderr and "Traceback" not in second.stderr
    finally:
        first.kill()   # as a node failure would: no clean-up, the record stays behind
        first.communicate()
    assert (run / ".fedpft.owner").exists()
    third = run_cli(*args, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"taking over from `fedpft train` (host {owner['host']}, pid {first.pid}" in third.stderr
    assert not (run / ".fedpft.owner").exists()   # released at the end

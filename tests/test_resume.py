"""Runs that stop and resume, and runs that repeat: the same seed gives the same adapter, an
interrupted and resumed run (after a plain round, after an alignment round, past a corrupt checkpoint,
on a stop signal that reached one rank, with a server optimizer's moments) gives the uninterrupted
one's. The uninterrupted cheap run is the suite's shared one (conftest.cheap_run)."""
import json
import os
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import CHEAP_RUN, PYTHON, REPO, child_env
from helpers import (ALIGN_KEYS, CONFIG, adapter, assert_same_rounds, assert_trained, max_abs_diff, metrics,
                     summary, tail, train)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# rounds 1, 2 (alignment: neuron-level distillation, ZeRO-3), 3; no fidelity probe
ALIGN_3 = ("fed.method=fedpft_no_layer_distill", "fed.rounds=3", "fed.checkpoint_every=1", "fed.align_every=2",
           "fed.align_steps=1", "fed.fidelity_every=0")


@pytest.fixture(scope="module")
def align_resume(tmp_path_factory) -> dict:
    """ALIGN_3 uninterrupted, and interrupted after the alignment round (round 2) then resumed."""
    root = tmp_path_factory.mktemp("align-resume")
    train(root / "full", *ALIGN_3)
    stopped = train(root / "parts", *ALIGN_3, "fed.stop_after=2")
    stopped_metrics = metrics(root / "parts")
    stopped_summary_exists = (root / "parts" / "summary.json").exists()
    resumed = train(root / "parts", *ALIGN_3, "fed.resume=true")
    return {"full": root / "full", "parts": root / "parts", "stopped": stopped, "resumed": resumed,
            "stopped_metrics": stopped_metrics, "stopped_summary_exists": stopped_summary_exists}


# ----------------------------------------------------------------------------------------------------
# 1. Seeds
# ----------------------------------------------------------------------------------------------------

def test_same_seed_repeats_and_another_seed_differs(cheap_run, tmp_path):
    train(tmp_path / "again", *CHEAP_RUN)
    first, again = adapter(cheap_run), adapter(tmp_path / "again")
    assert_trained(first)
    assert max_abs_diff(first, again) == 0.0
    assert metrics(cheap_run) == metrics(tmp_path / "again")

    train(tmp_path / "seed1", *CHEAP_RUN, "run.seed=1")
    other = adapter(tmp_path / "seed1")
    assert max_abs_diff(first, other) > 1e-4
    assert summary(tmp_path / "seed1")["world_size"] == 1


# ----------------------------------------------------------------------------------------------------
# 2. Interrupted and resumed == uninterrupted
# ----------------------------------------------------------------------------------------------------

def test_checkpoints_of_an_uninterrupted_run(cheap_run):
    rounds = cheap_run / "checkpoints" / "rounds"
    # checkpoint_every=1 over 3 rounds: after rounds 1 and 2 (the last round's result is the adapter)
    assert sorted(p.name for p in rounds.iterdir() if not p.name.startswith(".")) == ["round-000001",
                                                                                     "round-000002"]
    for n in (1, 2):
        ckpt = rounds / f"round-{n:06d}"
        # no alignment ran, so the proxy's FFN weights are still those of its directory: not saved
        assert {p.name for p in ckpt.iterdir()} == {"adapter.safetensors", "state.json"}
        meta = json.loads((ckpt / "state.json").read_text())
        assert meta["round"] == n and meta["method"] == "fedpft_no_layer_distill" and meta["seed"] == 0
        assert meta["alignment_rounds"] == 0 and meta["excluded_clients"] == 0


def test_interrupted_and_resumed_equals_uninterrupted(cheap_run, tmp_path):
    run = tmp_path / "run"
    stopped = train(run, *CHEAP_RUN, "fed.stop_after=1")
    assert "stopped after round 1 of 3" in stopped.stdout, tail(stopped)
    assert "fed.resume=true" in stopped.stdout
    assert not (run / "summary.json").exists()
    assert not (run / "adapter").exists()
    assert [r["round"] for r in metrics(run)] == [1]
    assert (run / "checkpoints" / "rounds" / "round-000001" / "state.json").is_file()

    resumed = train(run, *CHEAP_RUN, "fed.resume=true")
    assert "resumed from" in resumed.stderr and "continuing at round 2" in resumed.stderr, tail(resumed)
    assert max_abs_diff(adapter(cheap_run), adapter(run)) <= 1e-7
    rows = metrics(run)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert_same_rounds(metrics(cheap_run), rows, loss_rel=1e-7)
    full, parts = summary(cheap_run), summary(run)
    for key in ("final_accuracy", "best_accuracy", "final_macro_f1", "rounds", "excluded_clients",
                "bytes_up_per_client", "bytes_down_per_client"):
        assert parts[key] == full[key], key


def test_resume_falls_back_past_a_corrupt_newest_checkpoint_to_the_uninterrupted_result(cheap_run, tmp_path):
    run = tmp_path / "run"
    train(run, *CHEAP_RUN, "fed.stop_after=2")
    newest = run / "checkpoints" / "rounds" / "round-000002" / "adapter.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])   # truncated, as by a copy that did not finish
    # a kill while writing round 3's row and round 3's checkpoint: a cut-short last line, a temporary directory
    log = run / "metrics.jsonl"
    log.write_text(log.read_text() + '{"round": 3, "lr": 0.0')
    (run / "checkpoints" / "rounds" / ".round-000003.k1ll3d").mkdir()
    resumed = train(run, *CHEAP_RUN, "fed.resume=true")
    assert "skipping checkpoint" in resumed.stderr and "round-000002" in resumed.stderr, tail(resumed)
    assert "continuing at round 2" in resumed.stderr, tail(resumed)
    assert "line 3 is cut short" in resumed.stderr and "partial checkpoint write" in resumed.stderr, tail(resumed)
    assert max_abs_diff(adapter(cheap_run), adapter(run)) <= 1e-7
    assert [r["round"] for r in metrics(run)] == [1, 2, 3]
    assert not [p for p in (run / "checkpoints" / "rounds").iterdir() if p.name.startswith(".")]


def _worker_pid(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank."""
    for child in subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(child)
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher_pid}")


def test_a_stop_signal_on_one_rank_stops_every_rank_at_the_same_round(cheap_run, tmp_path):
    import signal
    import time

    run = tmp_path / "run"
    args = ["train", "--config", CONFIG, f"run.dir={run}", "dist.threads_per_rank=1", *CHEAP_RUN,
            "fed.checkpoint_every=0"]
    proc = subprocess.Popen([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "fedpft_dist", *args], cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first round"
        time.sleep(0.02)   # a round takes about a second: the signal must reach rank 1 during round 2
    os.kill(_worker_pid(proc.pid, 1), signal.SIGTERM)   # rank 1 only, during round 2 of 3
    out, err = proc.communicate(timeout=240)
    # both ranks stopped on the signal after round 2 (torchrun itself reports the workers' exit 75 as a failure)
    assert err.count("stopped after round 2 of 3 on a stop signal") == 2, err[-4000:]
    assert [p.name for p in (run / "checkpoints" / "rounds").iterdir() if p.name.startswith("round-")] == [
        "round-000002"]
    resumed = train(run, *CHEAP_RUN, "fed.resume=true", ranks=2)
    assert "continuing at round 3" in resumed.stderr, tail(resumed)
    assert max_abs_diff(adapter(cheap_run), adapter(run)) <= 1e-5
    assert [r["round"] for r in metrics(run)] == [1, 2, 3]


def test_a_server_optimizer_gives_one_adapter_on_one_and_two_ranks_and_after_a_resume(cheap_run, tmp_path):
    args = (*CHEAP_RUN, "fed.server_optimizer=fedadam", "fed.server_lr=0.05")
    full = tmp_path / "full"
    train(full, *args)
    two = tmp_path / "two"
    train(two, *args, ranks=2)
    assert max_abs_diff(adapter(full), adapter(two)) <= 1e-5
    # the server's moments are part of the checkpoint: a resumed run takes the steps it would have
    parts = tmp_path / "parts"
    train(parts, *args, "fed.stop_after=1")
    saved = load_file(str(parts / "checkpoints" / "rounds" / "round-000001" / "server_opt.safetensors"))
    assert {k.split("/")[0] for k in saved} == {"m", "v"}
    train(parts, *args, "fed.resume=true")
    assert max_abs_diff(adapter(full), adapter(parts)) <= 1e-7
    # and the adaptive steps took the adapter elsewhere than FedAvg's
    assert summary(full)["server_optimizer"] == "fedadam"
    assert max_abs_diff(adapter(cheap_run), adapter(full)) > 1e-3


def test_resume_after_an_alignment_round_keeps_metrics_and_state(align_resume):
    r = align_resume
    assert "stopped after round 2 of 3" in r["stopped"].stdout, tail(r["stopped"])
    assert not r["stopped_summary_exists"]
    assert [row["round"] for row in r["stopped_metrics"]] == [1, 2]
    rows = metrics(r["parts"])
    assert [row["round"] for row in rows] == [1, 2, 3]
    assert all(k in rows[1] for k in ALIGN_KEYS) and not any(k in rows[2] for k in ALIGN_KEYS)
    # what round 3 starts from (global adapter and re-aligned proxy FFN) is the same in both runs
    from fedpft_dist.checkpoint import load_checkpoint

    full, _ = load_checkpoint(r["full"] / "checkpoints" / "rounds" / "round-000002")
    parts, _ = load_checkpoint(r["parts"] / "checkpoints" / "rounds" / "round-000002")
    assert sorted(full) == sorted(parts) == ["adapter", "proxy_ffn"]
    for group in full:
        assert max_abs_diff(full[group], parts[group]) == 0.0, group


def test_resume_after_an_alignment_round_gives_the_uninterrupted_adapter(align_resume):
    # The ZeRO-3 loading of the teacher (fedpft_dist/alignment/zero.py, zero3_loading) must not leave
    # DeepSpeed's zero.Init linear in torch.nn.functional: the uninterrupted run would then train
    # round 3 with DeepSpeed's LinearFunctionForZeroStage3 and the resumed process (which did not
    # align yet) with torch's linear -> differences of ~1e-6 after one round.
    r = align_resume
    assert max_abs_diff(adapter(r["full"]), adapter(r["parts"])) <= 1e-7
    assert_same_rounds(metrics(r["full"]), metrics(r["parts"]), loss_rel=1e-7)


def test_resumed_summary_counts_the_rounds_before_the_interruption(align_resume):
    # The alignment in round 2 (before the interruption) belongs in the resumed run's summary: the
    # counters are part of the round checkpoint.
    full, parts = summary(align_resume["full"]), summary(align_resume["parts"])
    assert full["alignment_rounds"] == 1
    for key in ("alignment_rounds", "ffn_bytes_per_alignment", "bytes_down_per_client", "bytes_up_per_client",
                "excluded_clients", "best_accuracy", "rounds"):
        assert parts[key] == full[key], (key, parts[key], full[key])

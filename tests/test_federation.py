"""The federated engine end to end (`fedpft train`): 1 rank and 2 ranks agree, seeds, interrupted and
resumed runs, a rank without clients, a non-finite client update, the saved adapter, the outputs.

All runs use dist.threads_per_rank=1 so that 1-rank and 2-rank runs use the same thread count.
The "cheap" variant (fedpft_no_layer_distill, no alignment) builds a proxy and trains, nothing else.
"""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import CHEAP_RUN, PYTHON, REPO, child_env
from helpers import CONFIG, adapter, assert_trained, max_abs_diff, metrics, summary, tail, train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

CHEAP = ("fed.method=fedpft_no_layer_distill", "fed.align_every=0")
# rounds 1, 2 (alignment: neuron-level distillation, ZeRO-3), 3
ALIGN_3 = ("fed.method=fedpft_no_layer_distill", "fed.rounds=3", "fed.checkpoint_every=1", "fed.align_every=2",
           "fed.align_steps=1")
SUMMARY_KEYS = ("final_accuracy", "best_accuracy", "final_macro_f1", "rounds", "world_size", "method",
                "phase_seconds", "bytes_up_per_client", "bytes_down_per_client", "excluded_clients")
ALIGN_KEYS = ("align_steps", "align_loss_first", "align_loss_last", "align_error_before", "align_error_after",
              "align_ffn_bytes")


def assert_same_rounds(a: list[dict], b: list[dict], loss_rel: float = 1e-6) -> None:
    assert [r["round"] for r in a] == [r["round"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("lr", "clients", "excluded_clients", "all_updates_finite", "accuracy", "macro_f1",
                    "predicted_per_class"):
            assert ra.get(key) == rb.get(key), (ra["round"], key, ra.get(key), rb.get(key))
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=loss_rel), ra["round"]


# ----------------------------------------------------------------------------------------------------
# Fixtures: runs shared by several tests
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_runs(tiny_run, tmp_path_factory) -> dict[int, Path]:
    """configs/tiny.yaml as it is (proxy, 4-step ZeRO-3 layer distillation, 2 rounds of 4 of 8 clients,
    round 1 aligns) on 1 rank (the suite's shared run) and on 2 ranks (torchrun)."""
    two = tmp_path_factory.mktemp("tiny") / "rank2"
    train(two, ranks=2)
    return {1: tiny_run, 2: two}


# Client groups: dropout off (a split batch draws other masks). The 1 x 2 runs start from the suite's
# distilled tiny proxy. The 2 x 2 runs distil their own, which also checks layer-level distillation on
# 4 ranks against 1: the same sum of micro-batch gradients at any world size, but bit for bit only up
# to 2 micro-batches (see alignment.job.accumulation_steps), so 4 ranks need micro-batches of 1.
GROUPS = {"1x2": ("model.dropout=0", "fed.lora_dropout=0"),
          "2x2": ("model.dropout=0", "fed.lora_dropout=0", "distill.micro_batch=1")}


@pytest.fixture(scope="module", params=["1x2", "2x2"])
def group_runs(request, reuse_distilled, tmp_path_factory) -> tuple[str, Path, dict[str, Path]]:
    """configs/tiny.yaml with GROUPS[layout] on 1 rank, and on 2 ranks as 1 client group of 2 (the
    client model whole on each rank, and sharded over both with FSDP2), or on 4 ranks as 2 x 2."""
    layout = request.param
    root = tmp_path_factory.mktemp(f"groups-{layout}")
    over = (*GROUPS[layout], reuse_distilled) if layout == "1x2" else GROUPS[layout]
    train(root / "1", *over)
    ranks = 2 if layout == "1x2" else 4
    train(root / layout, *over, "dist.ranks_per_client=2", ranks=ranks, timeout=600)
    runs = {layout: root / layout}
    if layout == "1x2":
        train(root / "fsdp", *over, "dist.ranks_per_client=2", "fed.client_sharding=fsdp", ranks=2)
        runs["fsdp"] = root / "fsdp"
    return layout, root / "1", runs


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
# 1. 1 rank == 2 ranks
# ----------------------------------------------------------------------------------------------------

def test_one_rank_and_two_ranks_give_the_same_adapter(tiny_runs):
    one, two = adapter(tiny_runs[1]), adapter(tiny_runs[2])
    assert_trained(one)
    # Client sums are float64 and the distillation batches do not depend on the world size:
    # measured bit-identical; 1e-5 leaves room for other CPUs' kernels, not for a wrong average.
    assert max_abs_diff(one, two) <= 1e-5
    m1, m2 = metrics(tiny_runs[1]), metrics(tiny_runs[2])
    assert [r["round"] for r in m1] == [1, 2]
    assert_same_rounds(m1, m2, loss_rel=1e-5)
    # the probe set is sharded over ranks and its gradients summed: the same fidelity
    for a, b in zip(m1, m2):
        assert a["grad_cosine"] == pytest.approx(b["grad_cosine"], abs=1e-6)
        assert a["grad_rel_error"] == pytest.approx(b["grad_rel_error"], rel=1e-5)
    assert summary(tiny_runs[1])["world_size"] == 1
    assert summary(tiny_runs[2])["world_size"] == 2


def test_client_groups_give_the_single_rank_adapter(group_runs):
    layout, single, runs = group_runs
    one = adapter(single)
    assert_trained(one)
    m1 = metrics(single)
    ranks = 2 if layout == "1x2" else 4
    for name, run in runs.items():
        # each batch's gradient is the sum of its row blocks' (fp32 sums in another order) and AdamW
        # carries that through two rounds and an alignment: measured 5.7e-6 (1x2, also sharded), 4.7e-6 and
        # 1.6e-5 (2x2, on another CPU)
        assert max_abs_diff(one, adapter(run)) <= 5e-5, name
        mg = metrics(run)
        assert_same_rounds(m1, mg, loss_rel=1e-5)
        for a, b in zip(m1, mg):
            # the sharded client model's fidelity: the group's probe rows split like a batch
            assert b["grad_cosine"] == pytest.approx(a["grad_cosine"], abs=1e-5), name
            # every rank computed rows of every round, and together the tokens one rank computes
            assert len(b["tokens_per_rank"]) == ranks and min(b["tokens_per_rank"]) > 0
            assert sum(b["tokens_per_rank"]) == sum(a["tokens_per_rank"])
        assert summary(run)["world_size"] == ranks and summary(run)["ranks_per_client"] == 2
    if "fsdp" in runs:
        # a rank of the sharded group holds about half of the client model's parameters
        whole, half = summary(runs[layout])["client_bytes_per_rank"], summary(runs["fsdp"])["client_bytes_per_rank"]
        assert summary(single)["client_bytes_per_rank"] == whole
        assert abs(half - whole / 2) <= 0.01 * whole, (half, whole)


def test_the_held_fm_as_teacher_gives_the_same_adapter_on_one_and_two_ranks(reuse_distilled, tmp_path):
    """ZeRO-0: the alignment round's teacher is the FM each rank holds for evaluation."""
    for ranks in (1, 2):
        train(tmp_path / f"rank{ranks}", "distill.zero_stage=0", reuse_distilled, ranks=ranks)
    one, two = adapter(tmp_path / "rank1"), adapter(tmp_path / "rank2")
    assert_trained(one)
    assert max_abs_diff(one, two) <= 1e-5
    m1, m2 = metrics(tmp_path / "rank1"), metrics(tmp_path / "rank2")
    assert_same_rounds(m1, m2, loss_rel=1e-5)
    aligned = [r for r in m1 + m2 if "align_steps" in r]
    assert len(aligned) == 2 and all(r["align_teacher_in_memory"] for r in aligned)
    assert m1[0]["align_loss_last"] == pytest.approx(m2[0]["align_loss_last"], rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# 2. Seeds
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
# 3. Interrupted and resumed == uninterrupted
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
    resumed = train(run, *CHEAP_RUN, "fed.resume=true")
    assert "skipping checkpoint" in resumed.stderr and "round-000002" in resumed.stderr, tail(resumed)
    assert "continuing at round 2" in resumed.stderr, tail(resumed)
    assert max_abs_diff(adapter(cheap_run), adapter(run)) <= 1e-7
    assert [r["round"] for r in metrics(run)] == [1, 2, 3]


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


# ----------------------------------------------------------------------------------------------------
# 4. A rank without clients
# ----------------------------------------------------------------------------------------------------

def test_a_rank_without_clients(tmp_path):
    # K = max(1, floor(8 * 0.125)) = 1: every round one of the 2 ranks trains nobody; round 1 aligns
    # (its activation statistics are all on the other rank).
    over = ("fed.method=fedpft_no_layer_distill", "fed.client_fraction=0.125", "fed.align_every=1",
            "fed.align_steps=1")
    train(tmp_path / "rank1", *over)
    train(tmp_path / "rank2", *over, ranks=2)
    one, two = adapter(tmp_path / "rank1"), adapter(tmp_path / "rank2")
    assert_trained(one)
    assert max_abs_diff(one, two) <= 1e-5
    m1, m2 = metrics(tmp_path / "rank1"), metrics(tmp_path / "rank2")
    assert [r["clients"] for r in m2] == [1, 1]
    assert all(k in m2[0] for k in ALIGN_KEYS)
    assert_same_rounds(m1, m2, loss_rel=1e-5)
    s = summary(tmp_path / "rank2")
    assert s["world_size"] == 2 and s["clients_per_round"] == 1 and s["excluded_clients"] == 0


# ----------------------------------------------------------------------------------------------------
# 5. A non-finite client update
# ----------------------------------------------------------------------------------------------------

def test_a_non_finite_client_update_is_excluded_and_reported(tmp_path):
    from fedpft_dist.config import load_config
    from fedpft_dist.federation.sampling import clients_per_round, sample_clients

    run = tmp_path / "run"
    over = [*CHEAP, f"run.dir={run}", "dist.threads_per_rank=1"]
    proc = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "tests/fed_worker.py", str(tmp_path), *over], cwd=REPO,
                          env=child_env(PYTHONPATH=f"{REPO}:{REPO / 'tests'}"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, tail(proc)

    cfg = load_config(REPO / CONFIG, over)
    sampled = sample_clients(cfg.fed.num_clients, clients_per_round(cfg.fed.num_clients, cfg.fed.client_fraction),
                             cfg.run.seed, 0)
    reports = sorted(tmp_path.glob("poisoned-rank*.json"))
    assert [p.name for p in reports] == ["poisoned-rank1.json"], "the poisoned client must be trained on rank 1"
    report = json.loads(reports[0].read_text())
    assert len(report["poisoned"]) == 1
    target = report["poisoned"][0]["client"]
    assert target in sampled and target in report["assignment"][1]
    assert sorted(c for part in report["assignment"] for c in part) == sampled

    rows = metrics(run)
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["excluded_clients"] == 1 and rows[0]["all_updates_finite"] is False
    assert rows[0]["clients"] == len(sampled)
    assert rows[1]["excluded_clients"] == 0 and rows[1]["all_updates_finite"] is True
    for r in rows:
        assert torch.isfinite(torch.tensor([r["train_loss"], r["accuracy"], r["macro_f1"]])).all(), r
    s = summary(run)
    assert s["excluded_clients"] == 1 and s["world_size"] == 2
    state = adapter(run)
    assert all(torch.isfinite(v).all() for v in state.values())
    assert_trained(state)


# ----------------------------------------------------------------------------------------------------
# 6. The saved adapter on the FM reproduces the logged accuracy
# ----------------------------------------------------------------------------------------------------

def test_saved_adapter_reproduces_the_logged_accuracy(tiny_runs):
    from peft import PeftModel

    from fedpft_dist.config import load_config
    from fedpft_dist.federation.client import accuracy_and_macro_f1, confusion_counts, predict
    from fedpft_dist.data.tasks import CLASSIFICATION, prepare_task
    from fedpft_dist.models.loading import load_model, load_tokenizer, resolve_model_dir

    run = tiny_runs[1]
    cfg = load_config(run / "config.yaml")
    assert Path(cfg.run.dir) == run
    fm_dir = resolve_model_dir("minilm")
    task = prepare_task(cfg, load_tokenizer(fm_dir), CLASSIFICATION)
    fm = load_model(fm_dir, "sequence-classification", num_labels=task.num_classes)
    model = PeftModel.from_pretrained(fm, str(run / "adapter"))
    preds = predict(model, task.test_ids, task.test_mask, cfg.fed.eval_batch_size)
    acc, f1 = accuracy_and_macro_f1(confusion_counts(preds, task.test_labels, task.num_classes))
    s = summary(run)
    assert len(preds) == metrics(run)[-1]["test_examples"]
    assert acc == pytest.approx(s["final_accuracy"], abs=1e-9)
    assert f1 == pytest.approx(s["final_macro_f1"], abs=1e-9)
    assert torch.bincount(preds, minlength=task.num_classes).tolist() == s["final_predicted_per_class"]
    assert metrics(run)[-1]["predicted_classes"] == sum(1 for x in s["final_predicted_per_class"] if x)
    # batches of similar length (the default) predict what batches in row order predict
    assert torch.equal(preds, predict(model, task.test_ids, task.test_mask, cfg.fed.eval_batch_size, by_length=False))


# ----------------------------------------------------------------------------------------------------
# 7. Output format
# ----------------------------------------------------------------------------------------------------

def test_outputs_of_a_run(tiny_runs):
    for ranks, run in tiny_runs.items():
        s = summary(run)
        missing = [k for k in SUMMARY_KEYS if k not in s]
        assert not missing, missing
        assert s["method"] == "fedpft" and s["rounds"] == 2 and s["world_size"] == ranks
        assert s["excluded_clients"] == 0 and s["alignment_rounds"] == 1
        assert s["best_accuracy"] >= s["final_accuracy"]
        assert 0.0 <= s["final_accuracy"] <= 1.0 and 0.0 <= s["final_macro_f1"] <= 1.0
        assert set(s["phase_seconds"]) >= {"local_training", "aggregation", "alignment", "evaluation"}
        assert s["bytes_up_per_client"] > 0 and s["bytes_down_per_client"] > s["bytes_up_per_client"]

        rows = metrics(run)
        assert [r["round"] for r in rows] == [1, 2]
        for r in rows:
            for key in ("round", "lr", "clients", "excluded_clients", "all_updates_finite", "train_loss",
                        "accuracy", "macro_f1"):
                assert key in r, (r["round"], key)
            assert r["clients"] == 4 and r["all_updates_finite"] is True
        # round 1 aligns; round 2, the last, does not (nothing would train on its alignment)
        assert all(k in rows[0] for k in ALIGN_KEYS) and rows[0]["align_skipped"] is False
        assert not any(k in rows[1] for k in ALIGN_KEYS)
        assert rows[1]["accuracy"] == s["final_accuracy"]
        assert max(r["accuracy"] for r in rows) == s["best_accuracy"]
        # gradient fidelity in every evaluation round, LoRA and head apart, per layer
        for r in rows:
            assert 0 < r["grad_cosine"] <= 1 and r["grad_rel_error"] > 0 and -1 <= r["grad_cosine_head"] <= 1
            assert len(r["grad_cosine_per_layer"]) == 6 and r["grad_probe_examples"] == 64
        assert s["final_grad_cosine"] == rows[-1]["grad_cosine"] and s["align_skipped"] == 0

        cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA"
        assert (run / "config.yaml").is_file()
        assert not (run / "checkpoints" / "rounds").exists()   # checkpoint_every defaults to 0


# ----------------------------------------------------------------------------------------------------
# 8. Summaries and artifact paths
# ----------------------------------------------------------------------------------------------------

STOP_AND_RESUME = """
import json, sys
from fedpft_dist.environment import prepare_process
prepare_process()
from fedpft_dist.config import load_config
from fedpft_dist.federation.engine import run_federated
run, base = sys.argv[1], sys.argv[2:]
stopped = run_federated(load_config("configs/tiny.yaml", base + [f"run.dir={run}", "fed.stop_after=1"]))
done = run_federated(load_config("configs/tiny.yaml", base + [f"run.dir={run}", "fed.resume=true"]))
print(json.dumps({"stopped": stopped, "done": done}))
"""


def test_an_early_stop_returns_the_summary_of_a_finished_run(tmp_path):
    args = ["dist.threads_per_rank=1", "fed.method=fedpetuning", "fed.rounds=2", "fed.checkpoint_every=1"]
    proc = subprocess.run([PYTHON, "-c", STOP_AND_RESUME, str(tmp_path / "run"), *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, tail(proc)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    stopped, done = out["stopped"], out["done"]
    assert set(stopped) == set(done)
    assert stopped["stopped_early"] is True and stopped["rounds_done"] == 1 and stopped["rounds"] == 2
    assert done["stopped_early"] is False and done["rounds_done"] == 2
    assert stopped["final_accuracy"] is not None   # round 1 was evaluated (eval_every=1)
    assert done["final_grad_cosine"] is None        # fedpetuning's clients hold the FM: nothing to monitor
    assert summary(tmp_path / "run") == done


def test_a_proxy_built_at_proxy_out_is_the_one_distilled(tmp_path):
    run, proxy = tmp_path / "run", tmp_path / "elsewhere" / "proxy"
    train(run, "fed.rounds=1", "fed.align_every=0", "distill.steps=1", f"proxy.out={proxy}")
    assert (proxy / "fedpft_proxy.json").is_file()
    assert not (run / "proxy").exists()
    assert json.loads((run / "distill.json").read_text())["proxy_in"] == str(proxy)
    assert (run / "proxy_distilled" / "config.json").is_file()
    assert json.loads((run / "proxy.json").read_text())["proxy_dir"] == str(proxy)


def test_a_non_finite_alignment_is_kept_out_and_counted(tmp_path):
    # an absurd alignment learning rate: the distilled FFN weights overflow on every rank
    train(tmp_path, "fed.method=fedpft_no_layer_distill", "fed.align_every=1", "fed.align_lr=1e30")
    rows = metrics(tmp_path)
    assert rows[0]["align_skipped"] is True and "align_ffn_bytes" not in rows[0]
    # round 2 trains on the proxy as it was: every update finite, nobody excluded
    assert rows[1]["all_updates_finite"] is True and rows[1]["excluded_clients"] == 0
    assert rows[1]["train_loss"] == pytest.approx(rows[1]["train_loss"]) and rows[1]["accuracy"] > 0
    s = summary(tmp_path)
    assert s["align_skipped"] == 1 and s["alignment_rounds"] == 0 and s["excluded_clients"] == 0

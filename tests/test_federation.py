"""The federated engine end to end (`fedpft train`): 1 rank and 2 ranks agree, a rank without clients,
a non-finite client update or alignment, the saved adapter, the outputs. Resumed and repeated runs
are in test_resume.py, client groups in test_client_groups.py.

All runs use dist.threads_per_rank=1 so that 1-rank and 2-rank runs use the same thread count.
The "cheap" variant (fedpft_no_layer_distill, no alignment) builds a proxy and trains, nothing else.
"""
import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, REPO, child_env
from helpers import (ALIGN_KEYS, CONFIG, adapter, assert_same_rounds, assert_trained, max_abs_diff, metrics,
                     summary, tail, train)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

CHEAP = ("fed.method=fedpft_no_layer_distill", "fed.align_every=0")
# for runs whose gradient fidelity no test reads (tiny_runs check it)
NO_PROBE = "fed.fidelity_every=0"
SUMMARY_KEYS = ("final_accuracy", "best_accuracy", "final_macro_f1", "rounds", "world_size", "method",
                "phase_seconds", "bytes_up_per_client", "bytes_down_per_client", "excluded_clients")


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
    # the probe's per-example gradients are shared out over ranks and summed in example order, and
    # every rank computes the transfer whole: the same figures, bit for bit
    for a, b in zip(m1, m2):
        fidelity = [k for k in a if k.startswith(("grad_", "transfer"))]
        assert "transfer" in fidelity and "grad_cosine_common_low" in fidelity
        assert {k: a[k] for k in fidelity} == {k: b[k] for k in fidelity}
    assert summary(tiny_runs[1])["world_size"] == 1
    assert summary(tiny_runs[2])["world_size"] == 2


def test_the_held_fm_as_teacher_gives_the_same_adapter_on_one_and_two_ranks(reuse_distilled, tmp_path):
    """ZeRO-0: the alignment round's teacher is the FM each rank holds for evaluation."""
    for ranks in (1, 2):
        train(tmp_path / f"rank{ranks}", "distill.zero_stage=0", reuse_distilled, NO_PROBE, ranks=ranks)
    one, two = adapter(tmp_path / "rank1"), adapter(tmp_path / "rank2")
    assert_trained(one)
    assert max_abs_diff(one, two) <= 1e-5
    m1, m2 = metrics(tmp_path / "rank1"), metrics(tmp_path / "rank2")
    assert_same_rounds(m1, m2, loss_rel=1e-5)
    aligned = [r for r in m1 + m2 if "align_steps" in r]
    assert len(aligned) == 2 and all(r["align_teacher_in_memory"] for r in aligned)
    assert m1[0]["align_loss_last"] == pytest.approx(m2[0]["align_loss_last"], rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# 2. A rank without clients
# ----------------------------------------------------------------------------------------------------

def test_a_rank_without_clients(tmp_path):
    # K = max(1, floor(8 * 0.125)) = 1: every round one of the 2 ranks trains nobody; round 1 aligns
    # (its activation statistics are all on the other rank); the fidelity monitor runs in both rounds.
    over = ("fed.method=fedpft_no_layer_distill", "fed.client_fraction=0.125", "fed.align_every=1",
            "fed.align_steps=1", "fed.fidelity_examples=8", "fed.fidelity_transfer_steps=1")
    train(tmp_path / "rank1", *over)
    train(tmp_path / "rank2", *over, ranks=2)
    one, two = adapter(tmp_path / "rank1"), adapter(tmp_path / "rank2")
    assert_trained(one)
    assert max_abs_diff(one, two) <= 1e-5
    m1, m2 = metrics(tmp_path / "rank1"), metrics(tmp_path / "rank2")
    assert [r["clients"] for r in m2] == [1, 1] and all(0 in r["tokens_per_rank"] for r in m2)
    assert all(k in m2[0] for k in ALIGN_KEYS)
    assert_same_rounds(m1, m2, loss_rel=1e-5)
    assert m2[-1]["grad_cosine"] == pytest.approx(m1[-1]["grad_cosine"], abs=1e-5)
    s = summary(tmp_path / "rank2")
    assert s["world_size"] == 2 and s["clients_per_round"] == 1 and s["excluded_clients"] == 0


# ----------------------------------------------------------------------------------------------------
# 3. A non-finite client update
# ----------------------------------------------------------------------------------------------------

def test_a_non_finite_client_update_is_excluded_and_reported(tmp_path):
    from fedpft_dist.config import load_config
    from fedpft_dist.federation.sampling import clients_per_round, sample_clients

    run = tmp_path / "run"
    over = [*CHEAP, NO_PROBE, f"run.dir={run}", "dist.threads_per_rank=1"]
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
# 4. The saved adapter on the FM reproduces the logged accuracy
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
# 5. Output format
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
            assert r["grad_cosine_low"] <= r["grad_cosine"] <= r["grad_cosine_high"] and r["grad_norm_ratio"] > 0
            assert r["grad_cosine_common_low"] <= r["grad_cosine_common"] <= r["grad_cosine_common_high"]
            assert r["transfer_steps"] == 2 and r["transfer_fm_decrease"] > 0 and r["transfer"] is not None
        assert s["final_grad_cosine"] == rows[-1]["grad_cosine"] and s["align_skipped"] == 0
        assert s["final_transfer"] == rows[-1]["transfer"] and s["final_grad_cosine_common"] == rows[-1]["grad_cosine_common"]

        cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA"
        assert (run / "config.yaml").is_file()
        assert not (run / "checkpoints" / "rounds").exists()   # checkpoint_every defaults to 0


# ----------------------------------------------------------------------------------------------------
# 6. Summaries and artifact paths
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


def test_an_early_stop_returns_the_summary_of_a_finished_run(tmp_path, cheap_run):
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
    # equal adapters by default: fedpetuning tunes the LoRA FedPFT tunes (same targets, same layers)
    assert done["trainable_params"] == summary(cheap_run)["trainable_params"] > 0


def test_a_proxy_built_at_proxy_out_is_the_one_distilled(tmp_path):
    run, proxy = tmp_path / "run", tmp_path / "elsewhere" / "proxy"
    train(run, "fed.rounds=1", "fed.align_every=0", "distill.steps=1", f"proxy.out={proxy}", NO_PROBE)
    assert (proxy / "fedpft_proxy.json").is_file()
    assert not (run / "proxy").exists()
    assert json.loads((run / "distill.json").read_text())["proxy_in"] == str(proxy)
    assert (run / "proxy_distilled" / "config.json").is_file()
    assert json.loads((run / "proxy.json").read_text())["proxy_dir"] == str(proxy)


def test_a_non_finite_alignment_is_kept_out_and_counted(tmp_path):
    # an absurd alignment learning rate: the distilled FFN weights overflow on every rank
    train(tmp_path, "fed.method=fedpft_no_layer_distill", "fed.align_every=1", "fed.align_lr=1e30", NO_PROBE)
    rows = metrics(tmp_path)
    assert rows[0]["align_skipped"] is True and "align_ffn_bytes" not in rows[0]
    # round 2 trains on the proxy as it was: every update finite, nobody excluded
    assert rows[1]["all_updates_finite"] is True and rows[1]["excluded_clients"] == 0
    assert rows[1]["train_loss"] == pytest.approx(rows[1]["train_loss"]) and rows[1]["accuracy"] > 0
    s = summary(tmp_path)
    assert s["align_skipped"] == 1 and s["alignment_rounds"] == 0 and s["excluded_clients"] == 0

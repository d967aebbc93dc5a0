"""Distillation on 2 gloo ranks with DeepSpeed on the CPU (ZeRO 0, 2, 3), checkpoints, neuron level."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, child_env, run_cli
from fedpft_dist.models.families import layers_prefix

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], cwd=REPO, env=child_env(PYTHONPATH=f"{REPO}:{REPO / 'tests'}"),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def proxy_dir(tiny_run):
    """configs/tiny.yaml's proxy (what `fedpft proxy --config configs/tiny.yaml` builds), from the suite's
    shared run: read only."""
    return tiny_run / "proxy"


@pytest.fixture(scope="module")
def results(proxy_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill")
    proc = _torchrun("tests/distill_worker.py", str(proxy_dir), str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text()), out


def test_zero_stages_follow_the_same_trajectory(results):
    r, _ = results
    # fp32 everywhere: stages differ only in how gradients are reduced and parameters gathered, i.e.
    # in the order of fp32 sums (relative error ~1e-7 per step; measured: identical at stages 0 and
    # 2, 2e-8 absolute at stage 3). 1e-5 relative leaves room for other CPUs' summation orders
    # without letting a real difference (a missing gradient, a wrong average) through.
    base = torch.tensor(r["stage0"]["losses"])
    assert len(base) == 4
    # the trainable FFN parameters, counted before ZeRO-3 partitions them (a count after would be 0)
    assert r["stage0"]["trainable"] == r["stage2"]["trainable"] == r["stage3"]["trainable"] > 0
    for stage in ("stage2", "stage3"):
        torch.testing.assert_close(torch.tensor(r[stage]["losses"]), base, rtol=1e-5, atol=0)


def test_perturbed_distillation_with_the_derivative_term_at_zero_stages_0_and_3(results):
    r, _ = results
    base, terms = torch.tensor(r["stage0"]["losses"][:2]), torch.tensor(r["terms0"]["losses"])
    # the derivative term adds to the loss; the perturbation is drawn from (seed, step) on every rank
    assert (terms > base).all()
    torch.testing.assert_close(torch.tensor(r["terms3"]["losses"]), terms, rtol=1e-5, atol=0)
    # the held-out errors are measured without the perturbation: before training, as the plain job's
    assert r["terms3"]["before"] == pytest.approx(r["stage3"]["before"], rel=1e-6)
    assert r["terms3"]["after"][1] < r["terms3"]["before"][1]


def test_the_step_log_is_read_mid_job_on_every_rank(results):
    """distill.log_every=3 of 4 steps at ZeRO-3 on 2 ranks: the job reads the steps' loss terms after
    step 3 and at the end (every rank joins the read; a read on rank 0 alone hangs the job) and the
    log has one line per step with the job's losses."""
    r, out = results
    lines = [json.loads(line) for line in (out / "stage3_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert [line["loss"] for line in lines] == r["stage3"]["losses"]


def test_a_finished_job_leaves_nothing_behind(results):
    """DeepSpeed keeps a ZeRO-3 engine reachable from module globals after its job: without the
    release, each of the jobs above (stage 0 to 3) would keep its engine, optimizer and model pair
    (about 1.2 GB per job for SmolLM2-135M) for the life of the process."""
    r, _ = results
    assert r["alive"] == []


def test_per_layer_error_falls(results):
    r, _ = results
    before, after = r["stage3"]["before"], r["stage3"]["after"]
    assert before[0] == 0.0 and after[0] == 0.0          # layer 0 is retained: exact
    for l in (1, 2, 3, 4):
        assert after[l] < before[l], (l, before[l], after[l])
    assert r["stage3"]["losses"][-1] < r["stage3"]["losses"][0]


def test_stage3_partitions_the_teacher_and_the_student_as_they_load(results):
    r, _ = results
    full = r["stage3"]["full"]
    assert r["stage0"]["held"] == [full, full]           # stage 0: every rank holds the whole FM
    for held in r["stage3"]["held"]:                     # stage 3: about half each on 2 ranks
        assert held < 0.6 * full
    assert sum(r["stage3"]["held"]) >= full
    # the student too: loaded by the job inside ZeRO-3's loading context, so a rank holds its half
    # from the load on, before DeepSpeed's engine exists (a whole student would be partitioned only there)
    student = r["stage0"]["student_full"]
    assert r["stage3"]["student_full"] == student and r["stage0"]["student_held"] == [student, student]
    assert r["stage0"]["student_held_at_load"] == student
    assert r["stage3"]["student_held_at_load"] < 0.6 * student
    for held in r["stage3"]["student_held"]:
        assert held < 0.6 * student
    assert sum(r["stage3"]["student_held"]) >= student


def test_gathered_results_are_not_empty_partitions(results):
    # The ZeRO-3 trap: read outside a gather, partitioned tensors have 0 elements.
    r, _ = results
    raw, gathered = r["stage3"]["raw_numel"], r["stage3"]["state_numel"]
    assert raw and all(n == 0 for n in raw.values())
    assert all(gathered[k] > 0 for k in raw)
    assert r["stage0"]["raw_numel"] == r["stage0"]["state_numel"]
    assert gathered == r["stage0"]["state_numel"]


def test_resume_from_a_mid_run_checkpoint(results):
    r, out = results
    # ZeRO-3: each rank writes its own share of the state (safetensors), rank 0 the JSON listing both
    ckpt = out / "ckpt" / "step-0000002"
    meta = json.loads((ckpt / "state.json").read_text())
    assert meta["step"] == 2 and meta["per_rank"] is True
    names = ["train_state-rank00000.safetensors", "train_state-rank00001.safetensors"]
    assert sorted(meta["files"]) == names and all((ckpt / n).is_file() for n in names)
    from safetensors.torch import load_file

    shares = [load_file(str(ckpt / n)) for n in names]
    assert sorted(shares[0]) == sorted(shares[1])
    # two halves of each trainable tensor (ZeRO-3 pads the last share to equal size)
    whole = r["full_run"]["state_numel"]
    for name, numel in whole.items():
        assert 0 < shares[0][name].numel() < numel and shares[0][name].numel() + shares[1][name].numel() >= numel
    torch.testing.assert_close(torch.tensor(r["resumed"]["losses"]), torch.tensor(r["full_run"]["losses"]),
                               rtol=1e-6, atol=0)


def test_neuron_level_freezes_the_most_active_neurons(results, proxy_dir):
    from fedpft_dist.models.proxy import load_proxy

    r, out = results
    before = load_file(str(out / "neuron_before.safetensors"))
    after = load_file(str(out / "neuron_after.safetensors"))
    model, meta = load_proxy(proxy_dir, task="base")
    prefix = layers_prefix(model)
    for layer, frozen in r["neuron"]["frozen"].items():
        trainable = r["neuron"]["trainable"][layer]
        kept = len(meta["kept_indices"][layer])
        assert len(frozen) == len(trainable) == kept // 2  # align_keep 0.5
        assert sorted(frozen + trainable) == list(range(kept))
        w_in = f"{prefix}.{layer}.intermediate.dense.weight"
        b_in = f"{prefix}.{layer}.intermediate.dense.bias"
        w_out = f"{prefix}.{layer}.output.dense.weight"
        assert torch.equal(after[w_in][frozen], before[w_in][frozen])          # bit-identical
        assert torch.equal(after[b_in][frozen], before[b_in][frozen])
        assert torch.equal(after[w_out][:, frozen], before[w_out][:, frozen])
        assert not torch.equal(after[w_in][trainable], before[w_in][trainable])
        assert not torch.equal(after[w_out][:, trainable], before[w_out][:, trainable])
    # loaded as an alignment round loads it: partitioned as it loads (a rank holds about half of it on
    # 2 ranks before DeepSpeed's engine exists), the split made one Linear at a time on the partitions
    held, full = r["neuron"]["held_at_load"]
    assert held < 0.6 * full
    assert all(h < 0.6 * r["neuron"]["student_full"] for h in r["neuron"]["student_held"])


def test_a_teacher_in_memory_stands_for_the_loaded_merged_one(results):
    r = results[0]["lent_teacher"]
    # the same job, LoRA active on the held FM against LoRA merged into a loaded FM: float rounding apart
    assert r["keys_match"] and r["merged_modules"] > 0
    # fp32 rounding through the layers: measured up to 1.3e-6
    assert r["hidden_rel_diff"] < 1e-5
    assert r["max_state_diff"] <= 1e-2 * r["max_moved"]
    # and the held FM comes back as lent: trainable flags, modes and outputs
    assert r["any_trainable"] and r["flags_kept"] and r["modes_kept"] and r["output_kept"]


def test_zero_learning_rate_returns_the_input_bit_for_bit(results):
    # trained pieces come from the fp32 master weights, frozen neurons from their untouched frozen pieces
    r, _ = results
    for name in ("lr0-neuron", "lr0-layer"):
        assert r["lr0"][name]["tensors"] > 0 and r["lr0"][name]["finite"] is True
        assert r["lr0"][name]["same"] is True and r["lr0"][name]["bytes"] is True, name
    # at ZeRO-3 the job handed the tensors over a layer at a time (each layer's once, in order) and
    # kept none; at ZeRO-0 they came back whole in the result
    layers = sorted(int(l) for l in r["neuron"]["frozen"])
    assert r["lr0"]["lr0-neuron"]["parts"] == [[l] for l in layers] and r["lr0"]["lr0-neuron"]["state_left"] == 0
    assert r["lr0"]["lr0-layer"]["parts"] == [] and r["lr0"]["lr0-layer"]["state_left"] > 0


def test_distill_command_under_torchrun(tmp_path, proxy_dir):
    proc = _torchrun("-m", "fedpft_dist", "distill", "--config", "configs/tiny.yaml", f"run.dir={tmp_path}",
                     f"distill.proxy={proxy_dir}", "distill.zero_stage=3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "distill.json").read_text())
    assert report["world_size"] == 2 and report["zero_stage"] == 3 and report["steps"] == 4
    assert report["hidden_error_after"] < report["hidden_error_before"] and report["finite"] is True
    # gradient fidelity of the proxy against the FM, before and after, on the monitor's probe set
    for when in ("fidelity_before", "fidelity_after"):
        f = report[when]
        assert -1 <= f["grad_cosine"] <= 1 and f["grad_rel_error"] > 0 and f["grad_probe_examples"] == 64
        assert len(f["grad_cosine_per_layer"]) == 6
    assert "LoRA gradient cosine with the FM" in proc.stdout
    log = [json.loads(line) for line in (tmp_path / "distill_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3, 4]
    # the saved proxy reloads without the FM and reproduces the reported held-out error
    from fedpft_dist.models.loading import load_model, load_tokenizer, resolve_model_dir
    from fedpft_dist.models.proxy import hidden_state_errors, load_proxy
    from fedpft_dist.data.public import public_chunks
    from fedpft_dist.config import load_config

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    distilled, meta = load_proxy(tmp_path / "proxy_distilled")
    assert meta["distilled"]["steps"] == 4
    held = public_chunks(cfg, load_tokenizer(tmp_path / "proxy_distilled"), "held_out", cfg.distill.eval_chunks)
    errors = hidden_state_errors(load_model(resolve_model_dir("minilm"), "base"), distilled, held, 4)
    assert sum(errors) / len(errors) == pytest.approx(report["hidden_error_after"], rel=1e-4)


def test_a_non_finite_distillation_leaves_the_proxy_as_it_was(tmp_path, proxy_dir):
    from safetensors.torch import load_file

    proc = run_cli("distill", "--config", "configs/tiny.yaml", f"run.dir={tmp_path}", f"distill.proxy={proxy_dir}",
                   "distill.zero_stage=0", "distill.lr=1e30", "dist.threads_per_rank=1", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "distill.json").read_text())
    assert report["finite"] is False and "fidelity_after" not in report
    assert "NOT FINITE" in proc.stdout and "lower distill.lr" in proc.stderr
    before = load_file(str(proxy_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "proxy_distilled" / "model.safetensors"))
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)

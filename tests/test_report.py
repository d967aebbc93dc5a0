"""fedpft report: groups runs by method and partition (mean ± std over seeds), writes table and plots;
causal-LM runs get perplexity columns and plots, and a report of both tasks has a table per task; groups
that differ in one setting are compared seed by seed (paired differences with a t-interval)."""
import csv
import json
import math

import pytest

from conftest import run_cli
from fedpft_dist.commands.report import paired_stats, t_quantile


def _fake_run(path, method, seed, accs, partition="iid"):
    path.mkdir(parents=True)
    rows = [{"round": i + 1, "accuracy": a, "macro_f1": a - 0.1} for i, a in enumerate(accs)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps({
        "method": method, "rounds": len(accs), "world_size": 2, "partition": partition,
        "final_accuracy": accs[-1], "best_accuracy": max(accs), "final_macro_f1": accs[-1] - 0.1,
        "client_params": 19_000_000, "client_train_flops_per_example": 5.0e9, "wall_seconds": 10.0 + seed}))
    (path / "config.yaml").write_text(f"run:\n  seed: {seed}\nfed:\n  partition: {partition}\n  alpha: 1.0\n")


def test_report_groups_seeds(tmp_path):
    _fake_run(tmp_path / "runs" / "a0", "fedpft", 0, [0.5, 0.6])
    _fake_run(tmp_path / "runs" / "a1", "fedpft", 1, [0.5, 0.8])
    _fake_run(tmp_path / "runs" / "b0", "fedot", 0, [0.4, 0.5], partition="dirichlet")
    proc = run_cli("report", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "out" / "report.md").read_text()
    assert "| fedpft / iid | 2 | 2 | 70.0 ± 14.1 | 70.0 ± 14.1 | 60.0 ± 14.1 | – | 19.0M | 5.00 | 10 |" in table
    assert "| fedot / dirichlet(α=1.0) | 1 | 2 | 50.0 |" in table
    for png in ("accuracy.png", "cost.png"):
        data = (tmp_path / "out" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


PNG = b"\x89PNG\r\n\x1a\n"


def _fake_lm_run(path, method, seed, ppls, accs, initial=None, partition="iid", keep_ratio=0.25):
    """A causal-LM run as the engine writes it: classification keys null, perplexity keys set, and the
    FM's initial_* numbers when fed.eval_initial was on (``initial`` = (perplexity, next-token accuracy))."""
    path.mkdir(parents=True)
    rows = [{"round": i + 1, "train_loss": 3.0, "test_loss": 2.0, "perplexity": p, "next_token_accuracy": a}
            for i, (p, a) in enumerate(zip(ppls, accs))]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"method": method, "task": "causal-lm", "rounds": len(ppls), "world_size": 1, "partition": partition,
               "final_accuracy": None, "best_accuracy": None, "final_macro_f1": None,
               "trainable_params": 1_500_000, "client_params": 60_000_000, "client_train_flops_per_example": 2.5e10, "wall_seconds": 20.0 + seed,
               "final_perplexity": ppls[-1], "best_perplexity": min(ppls), "final_next_token_accuracy": accs[-1],
               "final_test_loss": 2.0}
    if initial is not None:
        summary.update({"initial_perplexity": initial[0], "initial_next_token_accuracy": initial[1],
                        "initial_test_loss": 3.4})
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "config.yaml").write_text(f"run:\n  seed: {seed}\nmodel:\n  task: causal-lm\nfed:\n  partition: {partition}\n"
                                      f"  alpha: 1.0\n  eval_initial: {str(initial is not None).lower()}\n"
                                      f"proxy:\n  keep_ratio: {keep_ratio}\n")


LM_HEADER = ("| method / partition | seeds | rounds | initial perplexity | final perplexity | best perplexity "
             "| final next-token accuracy (%) | trainable params | client params | client GFLOPs / example | wall s |")


def test_report_of_causal_lm_runs_shows_perplexity(tmp_path):
    _fake_lm_run(tmp_path / "runs" / "a0", "fedpft", 0, [20.0, 11.0, 12.0], [0.30, 0.38, 0.40], initial=(30.0, 0.2))
    _fake_lm_run(tmp_path / "runs" / "a1", "fedpft", 1, [20.0, 13.0, 14.0], [0.30, 0.40, 0.42], initial=(32.0, 0.2))
    _fake_lm_run(tmp_path / "runs" / "b0", "fedot", 0, [18.0, 15.5], [0.3, 0.35], partition="dirichlet")
    proc = run_cli("report", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    rows = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert rows == [
        LM_HEADER,
        "| fedpft / iid | 2 | 3 | 31.00 ± 1.41 | 13.00 ± 1.41 | 12.00 ± 1.41 | 41.0 ± 1.4 | 1.500M | 60.0M | 25.00 | 20 |",
        # no fed.eval_initial: no initial perplexity, and 1 seed: no ± std
        "| fedot / dirichlet(α=1.0) | 1 | 2 | – | 15.50 | 15.50 | 35.0 | 1.500M | 60.0M | 25.00 | 20 |",
        # perplexity per round, mean over seeds; round 0 is initial_perplexity where the runs have it
        "| group | round 0 | round 1 | round 2 | round 3 |",
        "| fedpft / iid | 31.00 | 20.00 | 12.00 | 13.00 |",
        "| fedot / dirichlet(α=1.0) | – | 18.00 | 15.50 | – |"]
    assert "##" not in (out / "report.md").read_text()  # one task: no per-task headings
    for png in ("perplexity.png", "perplexity-cost.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG and len(data) > 5000, png
    assert not (out / "accuracy.png").exists() and not (out / "perplexity-swept.png").exists()
    with (out / "report.csv").open() as f:
        table = list(csv.DictReader(f))
    assert "final_accuracy_mean" not in table[0]
    assert [r["task"] for r in table] == ["causal-lm", "causal-lm"]
    assert float(table[0]["final_perplexity_mean"]) == 13.0 and float(table[0]["best_perplexity_mean"]) == 12.0
    assert float(table[0]["final_next_token_accuracy_mean"]) == pytest.approx(0.41) and float(table[0]["final_test_loss_mean"]) == 2.0
    assert float(table[0]["initial_perplexity_mean"]) == 31.0 and table[1]["initial_perplexity_mean"] == "nan"


def test_report_shows_the_plug_in_gap_of_fedot_runs(tmp_path):
    """FedOT's evaluation rows carry the adapter's metrics on the emulator: the report shows the final
    one beside the FM's, from summary.json or (runs that did not keep it there) the last evaluation row."""
    _fake_lm_run(tmp_path / "runs" / "a0", "fedpft", 0, [20.0, 12.0], [0.3, 0.4])
    _fake_lm_run(tmp_path / "runs" / "b0", "fedot", 0, [18.0, 15.0], [0.3, 0.35])
    _fake_lm_run(tmp_path / "runs" / "b1", "fedot", 1, [18.0, 17.0], [0.3, 0.35])
    for name, emulator in (("b0", [30.0, 21.0]), ("b1", [30.0, 25.0])):
        path = tmp_path / "runs" / name
        rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        for row, ppl in zip(rows, emulator):
            row["emulator_perplexity"] = ppl
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = json.loads((tmp_path / "runs" / "b1" / "summary.json").read_text())
    summary["final_emulator_perplexity"] = 25.0
    (tmp_path / "runs" / "b1" / "summary.json").write_text(json.dumps(summary))
    proc = run_cli("report", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in (tmp_path / "out" / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert rows[0] == LM_HEADER.replace("initial perplexity | ", "").replace("(%) |", "(%) | final perplexity on the emulator |")
    assert rows[1] == "| fedpft / iid | 1 | 2 | 12.00 | 12.00 | 40.0 | – | 1.500M | 60.0M | 25.00 | 20 |"
    assert rows[2] == "| fedot / iid | 2 | 2 | 16.00 ± 1.41 | 16.00 ± 1.41 | 35.0 ± 0.0 | 23.00 ± 2.83 | 1.500M | 60.0M | 25.00 | 20 |"


def test_report_of_both_tasks_has_a_table_per_task(tmp_path):
    _fake_run(tmp_path / "runs" / "cls0", "fedpft", 0, [0.5, 0.6])
    _fake_run(tmp_path / "runs" / "cls1", "fedpft", 1, [0.5, 0.8])
    for seed in (0, 1):
        _fake_lm_run(tmp_path / "runs" / f"lm-k25-{seed}", "fedpft", seed, [20.0, 12.0 + seed], [0.3, 0.4])
        _fake_lm_run(tmp_path / "runs" / f"lm-k50-{seed}", "fedpft", seed, [20.0, 10.0], [0.3, 0.5], keep_ratio=0.5)
    proc = run_cli("report", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    report = (out / "report.md").read_text()
    cls, lm = report.split("## Sequence classification\n")[1].split("## Causal LM\n")
    lm_table, lm_paired = lm.split("### Paired differences (same seeds)\n")
    # Swept keys are each task's own: the LM runs' model.task and proxy.keep_ratio are no classification
    # column, and classification keeps today's rows.
    assert "| fedpft / iid | 2 | 2 | 70.0 ± 14.1 | 70.0 ± 14.1 | 60.0 ± 14.1 | – | 19.0M | 5.00 | 10 |" in cls
    assert "perplexity" not in cls and "accuracy" not in lm.replace("next-token accuracy", "")
    assert [line for line in lm_table.splitlines() if line.startswith("| ")] == [
        "| method / partition | proxy.keep_ratio | seeds | rounds | final perplexity | best perplexity "
        "| final next-token accuracy (%) | trainable params | client params | client GFLOPs / example | wall s |",
        "| fedpft / iid | 0.25 | 2 | 2 | 12.50 ± 0.71 | 12.50 ± 0.71 | 40.0 ± 0.0 | 1.500M | 60.0M | 25.00 | 20 |",
        "| fedpft / iid | 0.5 | 2 | 2 | 10.00 ± 0.00 | 10.00 ± 0.00 | 50.0 ± 0.0 | 1.500M | 60.0M | 25.00 | 20 |",
        "| group | round 1 | round 2 |",
        "| fedpft / iid, keep_ratio=0.25 | 20.00 | 12.50 |",
        "| fedpft / iid, keep_ratio=0.5 | 20.00 | 10.00 |"]
    # keep_ratio 0.25 − 0.5 per seed: 12 − 10, 13 − 10; mean 2.5, sd √0.5, 2.5 ± 12.7062 · √0.5 / √2
    assert [line for line in lm_paired.splitlines() if line.startswith("| fedpft")] == [
        "| fedpft / iid, keep_ratio=0.25 | fedpft / iid, keep_ratio=0.5 | proxy.keep_ratio | final perplexity "
        "| 2 | 0 | 2.50 | 0.71 | [-3.85, 8.85] | no |",
        "| fedpft / iid, keep_ratio=0.25 | fedpft / iid, keep_ratio=0.5 | proxy.keep_ratio | best perplexity "
        "| 2 | 0 | 2.50 | 0.71 | [-3.85, 8.85] | no |"]
    assert "Paired" not in cls  # one classification group: nothing to pair
    assert "![accuracy per round](accuracy.png)" in cls and "![perplexity per round](perplexity.png)" in lm
    assert "![final perplexity against the swept keys](perplexity-swept.png)" in lm and "swept.png" not in cls
    for png in ("accuracy.png", "cost.png", "perplexity.png", "perplexity-cost.png", "perplexity-swept.png"):
        assert (out / png).read_bytes()[:8] == PNG, png
    assert not (out / "swept.png").exists()
    with (out / "report.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [(r["task"], r["proxy.keep_ratio"], r["seeds"]) for r in table] == [
        ("sequence-classification", "", "2"), ("causal-lm", "0.25", "2"), ("causal-lm", "0.5", "2")]
    assert float(table[0]["final_accuracy_mean"]) == 0.7 and table[0]["final_perplexity_mean"] == ""
    assert table[1]["final_accuracy_mean"] == "" and float(table[1]["final_perplexity_mean"]) == 12.5


def test_report_shows_gradient_fidelity_where_runs_measured_it(tmp_path):
    runs = tmp_path / "runs"
    for seed, cos in ((0, [0.5, 0.7]), (1, [0.6, 0.9])):
        _fake_run(runs / f"p{seed}", "fedpft", seed, [0.5, 0.6])
        rows = [json.loads(line) for line in (runs / f"p{seed}" / "metrics.jsonl").read_text().splitlines()]
        for row, c in zip(rows, cos):
            row["grad_cosine"] = c
        (runs / f"p{seed}" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        summary = json.loads((runs / f"p{seed}" / "summary.json").read_text())
        (runs / f"p{seed}" / "summary.json").write_text(json.dumps({**summary, "final_grad_cosine": cos[-1]}))
    _fake_run(runs / "e0", "fedpetuning", 0, [0.6, 0.7])   # the FM itself: no fidelity to measure
    proc = run_cli("report", str(runs), "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "out" / "report.md").read_text()
    assert "LoRA gradient cosine with the FM |" in table
    assert "| fedpft / iid | 2 | 2 | 60.0 ± 0.0 | 60.0 ± 0.0 | 50.0 ± 0.0 | 0.800 ± 0.141 |" in table
    assert "| fedpetuning / iid | 1 | 2 | 70.0 | 70.0 | 60.0 | – |" in table
    assert (tmp_path / "out" / "fidelity.png").read_bytes()[:8] == PNG and "fidelity.png" in table
    with open(tmp_path / "out" / "report.csv") as fh:
        assert float({r["method"]: r["final_grad_cosine_mean"] for r in csv.DictReader(fh)}["fedpft"]) == pytest.approx(0.8)


def test_report_drops_a_cut_short_last_line_with_a_warning(tmp_path):
    """A run killed while appending to metrics.jsonl leaves a partial last line: the report leaves it out
    and says so; a broken line before the last is one error naming the file and line."""
    _fake_run(tmp_path / "runs" / "a0", "fedpft", 0, [0.5, 0.6])
    log = tmp_path / "runs" / "a0" / "metrics.jsonl"
    log.write_text(log.read_text() + '{"round": 3, "accur')
    proc = run_cli("report", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "metrics.jsonl: line 3 is cut short" in proc.stderr
    assert "| fedpft / iid | 1 | 2 | 60.0 |" in (tmp_path / "out" / "report.md").read_text()
    log.write_text('{"round": 1, "accuracy": 0.5}\n{"round": 2,\n{"round": 3, "accuracy": 0.6}\n')
    proc = run_cli("report", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "metrics.jsonl: line 2 is not JSON" in proc.stderr


def test_report_of_a_missing_run_is_a_user_error(tmp_path):
    proc = run_cli("report", str(tmp_path / "nope"), timeout=60)
    assert proc.returncode == 2 and "run directory not found" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_help_lists_the_commands():
    proc = run_cli("--help", timeout=60)
    for command in ("doctor", "proxy", "distill", "train", "report"):
        assert command in proc.stdout


# ----------------------------------------------------------------------------------------------------
# Paired differences over seeds
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("df,expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (29, 2.0452),
                                         (100, 1.9840), (1000, 1.9623)])
def test_t_quantile_matches_the_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-3)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-3)


def test_t_quantile_matches_closed_forms():
    # df = 1 is Cauchy: tan(π(p − ½)); df = 2: (2p − 1) / √(2p(1 − p))
    for p in (0.6, 0.9, 0.975, 0.995, 0.9999):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    assert t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-12)
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)  # the normal limit
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_paired_stats_is_the_t_interval():
    mean, sd, lo, hi = paired_stats([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451052 * math.sqrt(2.5) / math.sqrt(5)
    assert (mean, sd) == (3.0, pytest.approx(math.sqrt(2.5)))
    assert (lo, hi) == (pytest.approx(3.0 - half, abs=1e-9), pytest.approx(3.0 + half, abs=1e-9))
    with pytest.raises(ValueError):
        paired_stats([1.0])


def _seeded_run(path, method, seed, final, optimizer="sgd"):
    """A classification run whose final and best accuracy are ``final``, with fed.server_optimizer set."""
    _fake_run(path, method, seed, [0.5, final])
    (path / "config.yaml").write_text(f"run:\n  seed: {seed}\nfed:\n  partition: iid\n  alpha: 1.0\n"
                                      f"  server_optimizer: {optimizer}\n")


# Final accuracies (%) per seed. fedpft − fedavg = 1, 2, 3, 4, 5 points on seeds 0-4: mean 3, sd √2.5,
# 95 % CI 3 ± 2.7764 · √2.5 / √5 = [1.04, 4.96] (z = 1.96 would give [1.61, 4.39]). fedpft with adam ran
# seeds 0-3 and 5: sgd − adam = −1, 0, 1, 2 points on the 4 common seeds, seeds 4 and 5 left out; mean
# 0.5, sd √(5/3), CI 0.5 ± 3.1824 · √(5/3) / 2 = [−1.55, 2.55], which holds 0.
FEDPFT = {0: 80.0, 1: 82.0, 2: 84.0, 3: 86.0, 4: 88.0}
FEDAVG = {s: FEDPFT[s] - d for s, d in zip(range(5), (1, 2, 3, 4, 5))}
ADAM = {**{s: FEDPFT[s] - d for s, d in zip(range(4), (-1, 0, 1, 2))}, 5: 70.0}
PAIRED_ROWS = [
    "| fedpft / iid, server_optimizer=sgd | fedavg / iid, server_optimizer=sgd | fed.method "
    "| final accuracy (points) | 5 | 0 | 3.00 | 1.58 | [1.04, 4.96] | yes |",
    "| fedpft / iid, server_optimizer=sgd | fedpft / iid, server_optimizer=adam | fed.server_optimizer "
    "| final accuracy (points) | 4 | 2 | 0.50 | 1.29 | [-1.55, 2.55] | no |"]


def test_report_pairs_groups_that_differ_in_one_setting(tmp_path):
    runs = tmp_path / "runs"
    for name, method, optimizer, accs in (("a", "fedpft", "sgd", FEDPFT), ("b", "fedavg", "sgd", FEDAVG),
                                          ("c", "fedpft", "adam", ADAM)):
        for seed, acc in accs.items():
            _seeded_run(runs / f"{name}{seed}", method, seed, acc / 100, optimizer)
    proc = run_cli("report", str(runs), "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "out" / "report.md").read_text()
    main, paired = report.split("## Paired differences (same seeds)\n")
    # no run measured gradient fidelity: no cosine column
    assert "| method / partition | fed.server_optimizer | seeds | rounds | final accuracy (%) | best accuracy (%) " \
           "| final macro-F1 (%) | trainable params | client params |" in main
    assert "mean ± t(0.975, n − 1) · sd / √n" in paired
    rows = [line for line in paired.splitlines() if line.startswith("| ")]
    # fedavg and fedpft/adam differ in two settings: no pair; best accuracy equals final accuracy here
    assert rows == ["| A | B | differs in | metric | seeds | left out | A − B | sd | 95 % CI | CI excludes 0 |",
                    *PAIRED_ROWS, *(r.replace("final accuracy", "best accuracy") for r in PAIRED_ROWS)]
    assert "## Paired differences" in proc.stdout
    with (tmp_path / "out" / "paired.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [(r["metric"], r["differs_in"], r["seeds"], r["left_out"], r["common_seeds"], r["left_out_seeds"])
            for r in table] == [
        ("final_accuracy", "fed.method", "5", "0", "0 1 2 3 4", ""),
        ("final_accuracy", "fed.server_optimizer", "4", "2", "0 1 2 3", "4 5"),
        ("best_accuracy", "fed.method", "5", "0", "0 1 2 3 4", ""),
        ("best_accuracy", "fed.server_optimizer", "4", "2", "0 1 2 3", "4 5")]
    half = 2.7764451052 * math.sqrt(2.5) / math.sqrt(5) / 100  # fractions, as in report.csv
    row = table[0]
    assert row["task"] == "sequence-classification" and row["ci_excludes_zero"] == "True"
    assert float(row["mean_diff"]) == pytest.approx(0.03, abs=1e-9)
    assert float(row["sd"]) == pytest.approx(math.sqrt(2.5) / 100, abs=1e-9)
    assert float(row["ci95_low"]) == pytest.approx(0.03 - half, abs=1e-9)
    assert float(row["ci95_high"]) == pytest.approx(0.03 + half, abs=1e-9)
    half = 3.1824463053 * math.sqrt(5 / 3) / 2 / 100
    assert (float(table[1]["ci95_low"]), float(table[1]["ci95_high"])) == (
        pytest.approx(0.005 - half, abs=1e-9), pytest.approx(0.005 + half, abs=1e-9))
    assert table[1]["ci_excludes_zero"] == "False"


def test_report_needs_two_common_seeds_to_pair(tmp_path):
    runs = tmp_path / "runs"
    _seeded_run(runs / "a0", "fedpft", 0, 0.8)
    _seeded_run(runs / "a1", "fedpft", 1, 0.9)
    _seeded_run(runs / "b1", "fedavg", 1, 0.7)
    _seeded_run(runs / "b2", "fedavg", 2, 0.7)
    proc = run_cli("report", str(runs), "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Paired" not in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "paired.csv").read_text().count("\n") == 1  # the header


def test_report_pairs_causal_lm_runs_on_perplexity(tmp_path):
    runs = tmp_path / "runs"
    # fedpft − fedot final perplexity per seed: −2, −3, −4; mean −3, sd 1, CI −3 ± 4.3027 / √3
    for seed, (a, b) in enumerate(((12.0, 14.0), (13.0, 16.0), (11.0, 15.0))):
        _fake_lm_run(runs / f"a{seed}", "fedpft", seed, [20.0, a], [0.3, 0.4])
        _fake_lm_run(runs / f"b{seed}", "fedot", seed, [20.0, b], [0.3, 0.4])
    proc = run_cli("report", str(runs), "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    paired = (tmp_path / "out" / "report.md").read_text().split("## Paired differences (same seeds)\n")[1]
    rows = [line for line in paired.splitlines() if line.startswith("| fedpft")]
    assert rows == ["| fedpft / iid | fedot / iid | fed.method | final perplexity | 3 | 0 | -3.00 | 1.00 "
                    "| [-5.48, -0.52] | yes |",
                    "| fedpft / iid | fedot / iid | fed.method | best perplexity | 3 | 0 | -3.00 | 1.00 "
                    "| [-5.48, -0.52] | yes |"]
    assert "accuracy" not in paired
    with (tmp_path / "out" / "paired.csv").open() as f:
        row = next(csv.DictReader(f))
    assert row["task"] == "causal-lm" and row["metric"] == "final_perplexity"
    assert float(row["ci95_high"]) == pytest.approx(-3.0 + 4.3026527297 / math.sqrt(3), abs=1e-9)


def test_report_pairs_gradient_fidelity_and_counts_one_class_runs(tmp_path):
    runs = tmp_path / "runs"
    # fedpft − fedot final gradient cosine per seed: 0.1, 0.2, 0.3; mean 0.2, sd 0.1,
    # CI 0.2 ± 4.3027 · 0.1 / √3 = [−0.048, 0.448]. fedot's seed 2 ends predicting one class.
    for seed, (a, b) in enumerate(((0.8, 0.7), (0.7, 0.5), (0.9, 0.6))):
        for name, method, cosine, counts in (("a", "fedpft", a, [5, 3, 2]), ("b", "fedot", b, [5, 5, 0])):
            path = runs / f"{name}{seed}"
            _fake_run(path, method, seed, [0.5, 0.6])
            summary = json.loads((path / "summary.json").read_text())
            if method == "fedot" and seed == 2:
                counts = [10, 0, 0]
            summary.update(final_grad_cosine=cosine, final_predicted_per_class=counts)
            (path / "summary.json").write_text(json.dumps(summary))
    proc = run_cli("report", str(runs), "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    main, paired = (tmp_path / "out" / "report.md").read_text().split("## Paired differences (same seeds)\n")
    assert "| final macro-F1 (%) | LoRA gradient cosine with the FM | runs ending at one class | trainable params | client params |" in main
    assert "| fedpft / iid | 3 | 2 | 60.0 ± 0.0 | 60.0 ± 0.0 | 50.0 ± 0.0 | 0.800 ± 0.100 | 0 of 3 | – | 19.0M |" in main
    assert "| fedot / iid | 3 | 2 | 60.0 ± 0.0 | 60.0 ± 0.0 | 50.0 ± 0.0 | 0.600 ± 0.100 | 1 of 3 | – | 19.0M |" in main
    rows = [line for line in paired.splitlines() if "gradient cosine" in line]
    assert rows == ["| fedpft / iid | fedot / iid | fed.method | LoRA gradient cosine with the FM | 3 | 0 | 0.200 "
                    "| 0.100 | [-0.048, 0.448] | no |"]


def test_report_tables_accuracy_and_fidelity_per_round(tmp_path):
    """Per evaluated round, the mean over seeds: accuracy with the FM before training as round 0 (from
    initial_accuracy), and the gradient cosine of the rounds that measured it."""
    runs = tmp_path / "runs"
    for seed, (initial, cosines) in enumerate(((0.2, (0.9, 0.7)), (0.3, (0.8, 0.5)))):
        path = runs / f"a{seed}"
        _fake_run(path, "fedpft", seed, [0.5, 0.6 + 0.2 * seed])
        rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        for row, cosine in zip(rows, cosines):
            row["grad_cosine"] = cosine
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        summary = json.loads((path / "summary.json").read_text())
        summary.update(initial_accuracy=initial, final_grad_cosine=cosines[-1])
        (path / "summary.json").write_text(json.dumps(summary))
    _fake_run(runs / "b0", "fedpetuning", 0, [0.4, 0.5])  # no fidelity: no row in the cosine table
    proc = run_cli("report", str(runs), "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "out" / "report.md").read_text().splitlines()
    at = lines.index("test accuracy of the FM with the global adapter (%), mean over seeds:")
    assert lines[at + 2:at + 6] == ["| group | round 0 | round 1 | round 2 |", "|---|---|---|---|",
                                    "| fedpft / iid | 25.0 | 50.0 | 70.0 |", "| fedpetuning / iid | – | 40.0 | 50.0 |"]
    at = lines.index("cosine of client-model and FM LoRA gradients, mean over seeds:")
    assert lines[at + 2:at + 5] == ["| group | round 1 | round 2 |", "|---|---|---|",
                                    "| fedpft / iid | 0.850 | 0.600 |"]
    assert lines[at + 5] == ""

"""fedpft report: groups runs by method and partition (mean ± std over seeds), writes table and plots."""
import json

from conftest import run_cli


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
    assert "| fedpft / iid | 2 | 2 | 70.0 ± 14.1 | 70.0 ± 14.1 | 60.0 ± 14.1 | 19.0M | 5.00 | 10 |" in table
    assert "| fedot / dirichlet(α=1.0) | 1 | 2 | 50.0 |" in table
    for png in ("accuracy.png", "cost.png"):
        data = (tmp_path / "out" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_report_of_a_missing_run_is_a_user_error(tmp_path):
    proc = run_cli("report", str(tmp_path / "nope"), timeout=60)
    assert proc.returncode == 2 and "run directory not found" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_help_lists_the_commands():
    proc = run_cli("--help", timeout=60)
    for command in ("doctor", "proxy", "distill", "train", "report"):
        assert command in proc.stdout

"""Sweeps: spec validation, index -> overrides and run directories, the Slurm array template, the
report of a sweep, and the local runner on the 2 points of sweeps/tiny.yaml."""
from __future__ import annotations

import csv
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, child_env, run_cli
from fedpft_dist.errors import UserError
from fedpft_dist.commands.sweep import grid_points, index_ranges, load_sweep, point_name, swept_keys

TINY = "sweeps/tiny.yaml"
SPECS = sorted((REPO / "sweeps").glob("*.yaml"))
TEMPLATE = REPO / "slurm" / "sweep-array.sbatch"
PNG = b"\x89PNG\r\n\x1a\n"


def _spec(tmp_path: Path, body: str, base: str = "configs/tiny.yaml") -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(f"base: {REPO / base}\nout: {tmp_path / 'runs'}\n{body}")
    return path


def _one_line_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert fragment in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------------------------------
# Points, order, names
# ----------------------------------------------------------------------------------------------------

def test_grid_is_a_product_with_the_last_key_fastest():
    assert grid_points({"a": [1, 2], "b": ["x", "y", "z"]}) == [
        {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 1, "b": "z"},
        {"a": 2, "b": "x"}, {"a": 2, "b": "y"}, {"a": 2, "b": "z"}]


def test_names_use_swept_keys_only_and_full_keys_where_short_ones_are_ambiguous():
    points = [{"fed.lr": 0.1, "distill.alpha": 0.0, "run.seed": 0},
              {"fed.lr": 0.1, "distill.alpha": 0.01, "run.seed": 1}]
    swept = swept_keys(points)
    assert swept == ["distill.alpha", "run.seed"]
    assert point_name(1, points[1], swept) == "001-distill.alpha=0.01-seed=1"  # fed.alpha exists too
    name = point_name(7, {"proxy.retained_layers": [0, 5], "data.dataset": "a/b c.csv"},
                      ["proxy.retained_layers", "data.dataset"], width=4)
    assert name == "0007-retained_layers=0,5-dataset=a_b_c.csv"


def test_index_ranges():
    assert index_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert index_ranges([3]) == "3"


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_every_shipped_spec_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)
    sweep = load_sweep(path.relative_to(REPO))
    assert sweep.points and len({p.run_dir for p in sweep.points}) == len(sweep.points)


def test_tiny_spec_points(monkeypatch):
    monkeypatch.chdir(REPO)
    sweep = load_sweep(TINY, ["dist.threads_per_rank=1"])
    assert [p.run_dir for p in sweep.points] == ["runs/sweeps/tiny/000-keep_ratio=0.25",
                                                 "runs/sweeps/tiny/001-keep_ratio=0.5"]
    assert sweep.train_args(sweep.points[1]) == [
        "train", "--config", "configs/tiny.yaml", "fed.resume=true", "dist.threads_per_rank=1", "proxy.keep_ratio=0.5",
        "run.dir=runs/sweeps/tiny/001-keep_ratio=0.5"]


def test_ablation_spec_order(monkeypatch):
    """Sub-grids in turn, each a product: the reference seeds, then one factor at a time."""
    monkeypatch.chdir(REPO)
    sweep = load_sweep("sweeps/ablation.yaml")
    assert len(sweep.points) == 45
    assert sweep.points[0].values == {"run.seed": 0}
    assert sweep.points[4].values == {"proxy.keep_ratio": 0.125, "run.seed": 1}
    assert sweep.points[4].run_dir == "runs/sweeps/ablation/004-keep_ratio=0.125-seed=1"
    assert sweep.points[4].overrides == ["fed.partition=dirichlet", "proxy.keep_ratio=0.125", "run.seed=1",
                                         "run.dir=runs/sweeps/ablation/004-keep_ratio=0.125-seed=1"]
    assert sweep.points[32].run_dir == "runs/sweeps/ablation/032-method=fedpft_no_neuron_distill-seed=2"
    assert sweep.points[33].values == {"fed.server_optimizer": "fedavgm", "run.seed": 0}
    assert sweep.points[44].run_dir == "runs/sweeps/ablation/044-server_optimizer=fedadagrad-seed=2"


def test_print_gives_the_train_arguments_of_one_point():
    proc = run_cli("sweep", "--index", "1", "--print", TINY, "dist.timeout_s=60", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout) == ["train", "--config", "configs/tiny.yaml", "fed.resume=true", "dist.timeout_s=60",
                                        "proxy.keep_ratio=0.5", "run.dir=runs/sweeps/tiny/001-keep_ratio=0.5"]


def test_list_marks_done_points(tmp_path):
    done = tmp_path / "runs" / "001-keep_ratio=0.5"
    done.mkdir(parents=True)
    (done / "summary.json").write_text("{}")
    proc = run_cli("sweep", "--list", "--out", str(tmp_path / "runs"), TINY, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"{TINY}: 2 points of configs/tiny.yaml")
    assert lines[2].split()[:2] == ["0", "pending"] and lines[3].split()[:2] == ["1", "done"]
    assert lines[3].split()[-1] == "proxy.keep_ratio=0.5"
    assert lines[-1] == "pending: 0"
    proc = run_cli("sweep", "--index", "1", "--out", str(tmp_path / "runs"), TINY, timeout=60)
    assert proc.returncode == 0 and "point 1: done" in proc.stdout, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------------------
# Validation: one line that names the key
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, fragment", [
    ("gird:\n  fed.align_keep: [0.5]\n", "gird: unknown sweep key (did you mean 'grid'?)"),
    ("", "grid: missing"),
    ("grid:\n  fed.align_kep: [0.5, 0.8]\n",
     "grid: fed.align_kep: unknown config key (did you mean 'fed.align_keep'?)"),
    ("grid:\n  - run.seed: [0]\n  - fedd.alpha: [1.0]\n", "grid[1]: fedd: unknown config key"),
    ("grid:\n  fed.align_keep: [0.5, 1.5]\n", "grid: fed.align_keep: must be <= 1, got 1.5"),
    ("grid:\n  fed.method: [fedpft, fedsgd]\n", "grid: fed.method: must be one of"),
    ("grid:\n  fed.align_keep: 0.5\n", "grid.fed.align_keep: must be a non-empty list of values, got 0.5"),
    ("grid:\n  fed.align_keep: []\n", "grid.fed.align_keep: must be a non-empty list"),
    ("grid:\n  run.seed: [1, 1]\n", "grid.run.seed: value 1 is listed twice"),
    ("grid:\n  - run.seed: [0, 1]\n  - run.seed: [1]\n", "grid[1]: point 2 repeats point 1 (run.seed=1)"),
    ("grid:\n  run.dir: [a, b]\n", "grid.run.dir: set by the sweep"),
    ("fixed:\n  fed.alpha: 0.5\ngrid:\n  fed.alpha: [0.1, 1.0]\n", "grid.fed.alpha: also set in fixed"),
    ("fixed:\n  fed.partiton: dirichlet\ngrid:\n  run.seed: [0]\n",
     "fixed: fed.partiton: unknown config key (did you mean 'fed.partition'?)"),
    ("grid: [0.5, 0.8]\n", "grid[0]: must be a mapping of dotted config keys, got 0.5"),
])
def test_spec_errors_name_the_key(tmp_path, body, fragment):
    path = _spec(tmp_path, body)
    with pytest.raises(UserError) as info:
        load_sweep(path)
    assert str(info.value).startswith(f"{path}: ")
    assert fragment in str(info.value)


def test_base_must_exist(tmp_path):
    path = _spec(tmp_path, "grid:\n  run.seed: [0]\n", base="configs/nope.yaml")
    with pytest.raises(UserError, match=r"base: config file not found: .*configs/nope\.yaml"):
        load_sweep(path)


def test_command_line_overrides_cannot_change_swept_keys_or_run_dir(tmp_path):
    path = _spec(tmp_path, "grid:\n  fed.align_keep: [0.5, 0.8]\n")
    with pytest.raises(UserError, match=r"^fed\.align_keep: swept by "):
        load_sweep(path, ["fed.align_keep=0.3"])
    with pytest.raises(UserError, match=r"^run\.dir: set by the sweep"):
        load_sweep(path, ["run.dir=x"])
    with pytest.raises(UserError, match=r"^fed\.rounds: must be >= 1, got 0"):
        load_sweep(path, ["fed.rounds=0"])


def test_cli_errors_exit_2_with_one_line(tmp_path):
    typo = _spec(tmp_path, "grid:\n  fed.align_kep: [0.5, 0.8]\n")
    _one_line_error(run_cli("sweep", "--list", str(typo), timeout=60),
                    "grid: fed.align_kep: unknown config key (did you mean 'fed.align_keep'?)")
    _one_line_error(run_cli("sweep", "--index", "2", TINY, timeout=60),
                    "--index 2 is out of range: sweeps/tiny.yaml has points 0-1")
    _one_line_error(run_cli("sweep", "--index", "-1", "--print", TINY, timeout=60), "points 0-1")
    _one_line_error(run_cli("sweep", TINY, timeout=60), "needs one of --list, --all or --index N")
    _one_line_error(run_cli("sweep", "--print", TINY, timeout=60), "--print needs --index N")
    _one_line_error(run_cli("sweep", "--list", "--all", TINY, timeout=60), "not allowed with argument")
    _one_line_error(run_cli("sweep", "--list", str(tmp_path / "nope.yaml"), timeout=60), "sweep spec not found")


# ----------------------------------------------------------------------------------------------------
# The Slurm array template
# ----------------------------------------------------------------------------------------------------

def test_template_is_valid_bash_and_prints_usage(tmp_path):
    assert subprocess.run(["bash", "-n", str(TEMPLATE)], capture_output=True).returncode == 0
    proc = subprocess.run(["bash", str(TEMPLATE)], capture_output=True, text=True, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "usage:" in proc.stderr and "--array" in proc.stderr


def test_template_runs_the_array_task_point(tmp_path):
    """Array task 1 hands point 1's train arguments to slurm/single-node.sbatch (a stub here that
    prints them, one per line)."""
    home = tmp_path / "home"
    (home / "slurm").mkdir(parents=True)
    (home / "launcher").symlink_to(REPO / "launcher")
    (home / "slurm" / "single-node.sbatch").write_text('printf "%s\\n" "$@"\n')
    spec = _spec(tmp_path, "grid:\n  fed.align_keep: [0.5, 0.8]\n  data.dataset: [tweets, my data.csv]\n")
    env = child_env(FEDPFT_HOME=str(home), FEDPFT_PYTHON=sys.executable, SLURM_ARRAY_TASK_ID="1",
                    SLURM_JOB_ID="42")
    proc = subprocess.run(["bash", str(TEMPLATE), str(spec), "dist.timeout_s=60"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    run_dir = f"{tmp_path / 'runs'}/001-align_keep=0.5-dataset=my_data.csv"
    assert proc.stdout.splitlines()[1:] == [
        "train", "--config", str(REPO / "configs/tiny.yaml"), "fed.resume=true", "dist.timeout_s=60", "fed.align_keep=0.5",
        "data.dataset=my data.csv", f"run.dir={run_dir}"]
    env.pop("SLURM_ARRAY_TASK_ID")
    proc = subprocess.run(["bash", str(TEMPLATE), str(spec)], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "not an array task" in proc.stderr


# ----------------------------------------------------------------------------------------------------
# The report of a sweep
# ----------------------------------------------------------------------------------------------------

def _fake_run(path: Path, seed: int, acc: float, **config: object) -> None:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text(json.dumps({"round": 1, "accuracy": acc}) + "\n")
    (path / "summary.json").write_text(json.dumps({
        "method": "fedpft", "rounds": 1, "partition": "dirichlet", "final_accuracy": acc, "best_accuracy": acc,
        "final_macro_f1": acc, "client_params": 1e6, "client_train_flops_per_example": 1e9, "wall_seconds": 5.0}))
    tree = {"run": {"dir": str(path), "seed": seed}, "distill": {"proxy": f"shared/seed{seed}/proxy"},
            "proxy": {"keep_ratio": 0.25, "retained_layers": [0, -1]},
            "fed": {"partition": "dirichlet", "alpha": 1.0, "align_keep": 0.5}}
    for key, value in config.items():
        section, name = key.split("__")
        tree[section][name] = value
    (path / "config.yaml").write_text(json.dumps(tree))


def test_report_has_a_column_per_swept_key(tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        _fake_run(runs / f"000-seed={seed}", seed, 0.5 + seed / 10)
        _fake_run(runs / f"001-keep_ratio=0.5-seed={seed}", seed, 0.6, proxy__keep_ratio=0.5)
        _fake_run(runs / f"002-align_keep=0.75-seed={seed}", seed, 0.4, fed__align_keep=0.75)
    _fake_run(runs / "003-alpha=0.1-seed=0", 0, 0.3, fed__alpha=0.1)
    _fake_run(runs / "004-retained_layers=0,5-seed=0", 0, 0.2, proxy__retained_layers=[0, 5])
    proc = run_cli("report", str(runs), timeout=120)
    assert proc.returncode == 0, proc.stderr
    main, paired = (runs / "report.md").read_text().split("## Paired differences")
    rows = [line for line in main.split("\n\n")[1].splitlines() if line.startswith("| ")]  # the first table
    assert rows == [
        "| method / partition | proxy.keep_ratio | proxy.retained_layers | fed.alpha | fed.align_keep | seeds "
        "| rounds | final accuracy (%) | best accuracy (%) | final macro-F1 (%) | trainable params "
        "| client params | client GFLOPs / example | wall s |",
        "| fedpft / dirichlet | 0.25 | [0, -1] | 1.0 | 0.5 | 2 | 1 | 55.0 ± 7.1 | 55.0 ± 7.1 | 55.0 ± 7.1 | – | 1.0M "
        "| 1.00 | 5 |",
        "| fedpft / dirichlet | 0.5 | [0, -1] | 1.0 | 0.5 | 2 | 1 | 60.0 ± 0.0 | 60.0 ± 0.0 | 60.0 ± 0.0 | – | 1.0M "
        "| 1.00 | 5 |",
        "| fedpft / dirichlet | 0.25 | [0, -1] | 1.0 | 0.75 | 2 | 1 | 40.0 ± 0.0 | 40.0 ± 0.0 | 40.0 ± 0.0 | – | 1.0M "
        "| 1.00 | 5 |",
        "| fedpft / dirichlet | 0.25 | [0, -1] | 0.1 | 0.5 | 1 | 1 | 30.0 | 30.0 | 30.0 | – | 1.0M | 1.00 | 5 |",
        "| fedpft / dirichlet | 0.25 | [0, 5] | 1.0 | 0.5 | 1 | 1 | 20.0 | 20.0 | 20.0 | – | 1.0M | 1.00 | 5 |"]
    with (runs / "report.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [(r["dirichlet_alpha"], r["proxy.keep_ratio"], r["proxy.retained_layers"], r["fed.align_keep"],
             r["seeds"]) for r in table] == [
        ("1.0", "0.25", "[0, -1]", "0.5", "2"), ("1.0", "0.5", "[0, -1]", "0.5", "2"),
        ("1.0", "0.25", "[0, -1]", "0.75", "2"), ("0.1", "0.25", "[0, -1]", "0.5", "1"),
        ("1.0", "0.25", "[0, 5]", "0.5", "1")]
    assert float(table[0]["final_accuracy_mean"]) == pytest.approx(0.55)
    # the reference point against each point that changes one key, over their 2 common seeds:
    # keep_ratio 0.25 - 0.5 is -10 and 0 points (seeds 0, 1), align_keep 0.5 - 0.75 is +10 and +20
    paired_rows = [line for line in paired.splitlines() if line.startswith("| fedpft")]
    final = [r for r in paired_rows if "| final accuracy" in r]
    assert len(final) == 2 and "| proxy.keep_ratio |" in final[0] and "| fed.align_keep |" in final[1]
    assert "| 2 | 0 | -5.00 | 7.07 |" in final[0] and "| 2 | 0 | 15.00 | 7.07 |" in final[1]
    for png in ("accuracy.png", "cost.png", "swept.png"):
        assert (runs / png).read_bytes()[:8] == PNG, png
    assert "![final accuracy against the swept keys](swept.png)" in (runs / "report.md").read_text()


# ----------------------------------------------------------------------------------------------------
# End to end: the local runner on sweeps/tiny.yaml
# ----------------------------------------------------------------------------------------------------

def test_ranks_per_point_go_through_the_launcher(tmp_path):
    """--nproc 2 runs the point with FEDPFT_HOME/launcher/torchrun.sh (a stub here that prints its
    interpreter and arguments) and this interpreter as FEDPFT_PYTHON; the launcher's exit code is the
    command's."""
    home = tmp_path / "home"
    (home / "launcher").mkdir(parents=True)
    stub = home / "launcher" / "torchrun.sh"
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$FEDPFT_PYTHON" "$@"\nexit 7\n')
    stub.chmod(0o755)
    proc = run_cli("sweep", "--index", "0", "--nproc", "2", "--out", str(tmp_path / "runs"), TINY,
                   timeout=60, FEDPFT_HOME=str(home), FEDPFT_PYTHON=sys.executable)
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout.splitlines()[1:] == [
        sys.executable, "2", "train", "--config", "configs/tiny.yaml", "fed.resume=true", "proxy.keep_ratio=0.25",
        f"run.dir={tmp_path / 'runs'}/000-keep_ratio=0.25"]


@pytest.mark.slow
@pytest.mark.distributed
def test_local_runner_on_the_tiny_sweep(tmp_path):
    """--all trains the 2 points one after another (1 rank each) and writes the report of both; a
    second --all trains nothing. Cheap points: the runner is under test, not the pipeline."""
    out = tmp_path / "sweep"
    base = ("--out", str(out), TINY, "dist.threads_per_rank=1", "fed.method=fedpft_no_layer_distill",
            "fed.align_every=0", "fed.fidelity_every=0", "fed.rounds=1", "data.max_test=32")
    proc = run_cli("sweep", "--all", *base, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "point 0 of 0-1:" in proc.stdout and "point 1 of 0-1:" in proc.stdout
    lines = (out / "report.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method"))
    header, table = lines[start].split(" | "), lines[start + 2:lines.index("", start)]
    rows = [line for line in table if line.startswith("| fedpft")]
    assert [row.split(" | ")[1:3] for row in rows] == [["0.25", "1"], ["0.5", "1"]], rows
    assert header[1:3] == ["proxy.keep_ratio", "seeds"], header
    # a larger keep ratio is a larger client model
    params = [row.split(" | ")[header.index("client params")] for row in rows]
    assert params[0] != params[1], rows
    for png in ("accuracy.png", "cost.png", "swept.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG and len(data) > 5000, png

    proc = run_cli("sweep", "--all", *base, timeout=120)
    assert proc.returncode == 0 and proc.stdout.count(": done (") == 2, proc.stdout + proc.stderr
    assert (out / "report.csv").read_text().count("\n") == 3

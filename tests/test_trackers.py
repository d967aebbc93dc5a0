"""Experiment trackers (run.report_to): the rows MetricsLog writes reach TensorBoard event files and an
offline W&B run, read back here with TensorBoard's own event reader and W&B's record protobufs; a
missing package is a one-line user error. The end-to-end check trains configs/tiny.yaml (slow)."""
import json
import struct
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from fedpft_dist.config import dump_config, load_config
from fedpft_dist.errors import ConfigError, UserError
from fedpft_dist.federation.recording import MetricsLog
from fedpft_dist.federation.trackers import missing_package, open_trackers, scalars
from fedpft_dist.run_layout import RunLayout

ROWS = [
    {"round": 1, "lr": 0.001, "train_loss": 1.25, "all_updates_finite": True, "accuracy": 0.5, "macro_f1": 0.25,
     "grad_cosine": 0.75, "aggregation_bytes": 1024, "local_seconds_per_rank": [1.0, 2.0], "kind": "text",
     "seconds": {"local_training": 2.5, "evaluation": 0.5}},
    {"round": 2, "lr": 0.0005, "train_loss": 1.0, "all_updates_finite": False, "accuracy": 0.625, "macro_f1": 0.5,
     "grad_cosine": 0.875, "aggregation_bytes": 1024, "local_seconds_per_rank": [1.5, 2.5],
     "seconds": {"local_training": 3.0, "evaluation": 0.25}},
]


def layout(tmp_path: Path, *overrides: str):
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"run.dir={tmp_path / 'run'}", *overrides])
    lay = RunLayout.from_config(cfg)
    lay.run_dir.mkdir(parents=True, exist_ok=True)
    return cfg, lay


def record(cfg, lay, rows, start_round: int = 0, ok: bool = True) -> MetricsLog:
    """What the engine does on rank 0: open the trackers, append each row, close."""
    metrics = MetricsLog(lay.metrics, True, start_round, open_trackers(cfg, lay, start_round))
    for row in rows:
        metrics.append(row)
    metrics.close(ok)
    return metrics


def tensorboard_events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def tb_scalars(acc) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(run_dir: Path) -> list:
    """Every record of the one offline W&B run under ``run_dir``."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return wandb_file(path)


def wandb_file(path: Path) -> list:
    """The records of a .wandb file: a LevelDB-style log (7-byte file header; 32 KiB blocks of chunks with a
    crc32/length/type header) of W&B's protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    records, pos, buf = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:   # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):   # a full record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
            buf = b""
    return records


def wandb_history(records) -> list[dict]:
    return [{"step": r.history.step.num,
             **{(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}}
            for r in records if r.WhichOneof("record_type") == "history"]


def of_kind(records, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


# ----------------------------------------------------------------------------------------------------

def test_report_to_is_checked_by_name():
    assert load_config(None).run.report_to == ["jsonl"] and load_config(None).run.wandb_mode == "offline"
    cfg = load_config(None, ["run.report_to=[tensorboard,wandb]"])
    assert cfg.run.report_to == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match=r"^run\.report_to\[1\]: must be one of 'jsonl', 'tensorboard', 'wandb', "
                                          r"got 'mlflow'"):
        load_config(None, ["run.report_to=[tensorboard,mlflow]"])
    with pytest.raises(ConfigError, match=r"^run\.report_to: must be a list of one of"):
        load_config(None, ["run.report_to=tensorboard"])
    with pytest.raises(ConfigError, match=r"^run\.report_to: names 'wandb' twice"):
        load_config(None, ["run.report_to=[wandb,wandb]"])
    with pytest.raises(ConfigError, match=r"^run\.wandb_mode: must be one of 'offline', 'online', 'disabled'"):
        load_config(None, ["run.wandb_mode=on"])


def test_scalars_flatten_nested_numbers_and_leave_out_lists_and_text():
    assert scalars(ROWS[0]) == {"round": 1.0, "lr": 0.001, "train_loss": 1.25, "all_updates_finite": 1.0,
                                "accuracy": 0.5, "macro_f1": 0.25, "grad_cosine": 0.75, "aggregation_bytes": 1024.0,
                                "seconds/local_training": 2.5, "seconds/evaluation": 0.5}


def test_rows_reach_every_tracker_on_rank_0_only_and_close_once(tmp_path):
    class Fake:
        def __init__(self):
            self.rows, self.closed = [], []

        def log(self, row):
            self.rows.append(row)

        def close(self, ok):
            self.closed.append(ok)

    main, other = Fake(), Fake()
    log = MetricsLog(tmp_path / "metrics.jsonl", True, 0, [main])
    silent = MetricsLog(tmp_path / "other.jsonl", False, 0, [other])
    for row in ROWS:
        log.append(row)
        silent.append(row)
    log.close(False)
    log.close(True)
    silent.close()
    assert main.rows == ROWS and main.closed == [False]
    assert other.rows == [] and other.closed == [] and not (tmp_path / "other.jsonl").exists()


def test_tensorboard_holds_each_rounds_scalars_and_the_config(tmp_path):
    cfg, lay = layout(tmp_path, "run.report_to=[jsonl,tensorboard]")
    record(cfg, lay, ROWS)
    acc = tensorboard_events(lay.run_dir / "tensorboard")
    got = tb_scalars(acc)
    assert set(got) == {"lr", "train_loss", "all_updates_finite", "accuracy", "macro_f1", "grad_cosine",
                        "aggregation_bytes", "seconds/local_training", "seconds/evaluation"}
    for name, value in scalars(ROWS[0]).items():
        if name != "round":
            assert [s for s, _ in got[name]] == [1, 2]
            assert got[name][0][1] == pytest.approx(value) and got[name][1][1] == pytest.approx(scalars(ROWS[1])[name])
    (text,) = acc.Tensors("config/text_summary")
    assert text.step == 0 and text.tensor_proto.string_val[0].decode() == f"```yaml\n{dump_config(cfg)}```"
    assert [json.loads(line) for line in lay.metrics.read_text().splitlines()] == ROWS


def test_tensorboard_on_resume_replaces_the_rounds_redone_and_a_fresh_run_starts_afresh(tmp_path):
    cfg, lay = layout(tmp_path, "run.report_to=[tensorboard]")
    record(cfg, lay, ROWS)
    # resumed after round 1: round 2 again (other values) and round 3
    redo = [{"round": 2, "train_loss": 0.5}, {"round": 3, "train_loss": 0.25}]
    record(cfg, lay, redo, start_round=1)
    got = tb_scalars(tensorboard_events(lay.tensorboard))
    assert got["train_loss"] == [(1, 1.25), (2, 0.5), (3, 0.25)]
    assert [s for s, _ in got["accuracy"]] == [1]   # round 2's earlier accuracy is gone with its row
    assert [json.loads(line)["round"] for line in lay.metrics.read_text().splitlines()] == [1, 2, 3]
    # a fresh run in the same dir: only its own events
    record(cfg, lay, [{"round": 1, "train_loss": 2.0}])
    assert tb_scalars(tensorboard_events(lay.tensorboard)) == {"train_loss": [(1, 2.0)]}


def test_wandb_offline_run_holds_the_history_and_the_config(tmp_path, caplog):
    cfg, lay = layout(tmp_path, "run.report_to=[wandb]", "run.wandb_project=tests")
    with caplog.at_level("INFO", logger="fedpft_dist.federation.trackers"):
        record(cfg, lay, ROWS)
    records = wandb_records(lay.run_dir)
    (run,) = of_kind(records, "run")
    assert run.project == "tests" and run.display_name == "run"
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["fed"]["rounds"] == 2 and config["run"]["report_to"] == ["wandb"]
    history = wandb_history(records)
    assert [h["step"] for h in history] == [1, 2]
    for h, row in zip(history, ROWS):
        assert h["train_loss"] == row["train_loss"] and h["accuracy"] == row["accuracy"]
        assert h["grad_cosine"] == row["grad_cosine"] and h["all_updates_finite"] == row["all_updates_finite"]
        assert h["seconds.local_training"] == row["seconds"]["local_training"]
        assert h["local_seconds_per_rank"] == row["local_seconds_per_rank"]
    assert of_kind(records, "exit")[0].exit_code == 0
    (sync_dir,) = lay.run_dir.glob("wandb/offline-run-*")
    assert f"wandb sync {sync_dir}" in caplog.text


def test_a_resumed_run_is_a_new_wandb_run_from_its_next_round_and_disabled_writes_nothing(tmp_path):
    cfg, lay = layout(tmp_path, "run.report_to=[wandb]")
    record(cfg, lay, ROWS)
    record(cfg, lay, [{"round": 2, "train_loss": 0.5}, {"round": 3, "train_loss": 0.25}], start_round=1)
    runs = [wandb_history(wandb_file(p)) for p in lay.run_dir.glob("wandb/offline-run-*/run-*.wandb")]
    assert sorted([(h["step"], h["train_loss"]) for h in run] for run in runs) == [[(1, 1.25), (2, 1.0)],
                                                                                   [(2, 0.5), (3, 0.25)]]
    cfg, lay = layout(tmp_path / "disabled", "run.report_to=[wandb]", "run.wandb_mode=disabled")
    record(cfg, lay, ROWS)
    assert not (lay.run_dir / "wandb").exists() and len(lay.metrics.read_text().splitlines()) == 2


def test_a_failed_run_marks_its_wandb_run_failed(tmp_path):
    cfg, lay = layout(tmp_path, "run.report_to=[wandb]")
    record(cfg, lay, ROWS[:1], ok=False)
    records = wandb_records(lay.run_dir)
    assert [h["step"] for h in wandb_history(records)] == [1] and of_kind(records, "exit")[0].exit_code == 1


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_a_missing_package_names_the_pip_line_before_anything_is_written(tmp_path, monkeypatch, tracker):
    monkeypatch.setitem(sys.modules, tracker, None)   # `import <tracker>` now raises ImportError
    message = f"run.report_to: {tracker} needs the '{tracker}' package: pip install {tracker}"
    assert missing_package(["jsonl", tracker]) == message and missing_package(["jsonl"]) is None
    cfg, lay = layout(tmp_path, f"run.report_to=[{tracker}]")
    with pytest.raises(UserError) as err:
        open_trackers(cfg, lay, 0)
    assert str(err.value) == message
    assert not lay.tensorboard.exists() and not (lay.run_dir / "wandb").exists()


@pytest.mark.slow
def test_train_without_the_package_is_one_line_and_exit_code_2(tmp_path):
    shadow = tmp_path / "shadow" / "wandb"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no wandb here')\n")
    proc = run_cli("train", "--config", "configs/tiny.yaml", f"run.dir={tmp_path / 'run'}", "run.report_to=[wandb]",
                   timeout=120, PYTHONPATH=f"{shadow.parent}:{Path(__file__).resolve().parents[1]}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fedpft: error:")]
    assert errors == ["fedpft: error: run.report_to: wandb needs the 'wandb' package: pip install wandb"], proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_train_writes_tensorboard_events_and_an_offline_wandb_run(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train", "--config", "configs/tiny.yaml", f"run.dir={run}", "dist.threads_per_rank=1",
                   "fed.method=fedpft_no_layer_distill", "fed.align_every=0", "run.report_to=[tensorboard,wandb]",
                   timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    got = tb_scalars(tensorboard_events(run / "tensorboard"))
    assert got["accuracy"] == [(r["round"], pytest.approx(r["accuracy"])) for r in rows]
    assert [s for s, _ in got["seconds/local_training"]] == [1, 2] and "grad_cosine" in got
    history = wandb_history(wandb_records(run))
    assert [(h["step"], h["accuracy"]) for h in history] == [(r["round"], r["accuracy"]) for r in rows]
    assert "wandb sync" in proc.stderr

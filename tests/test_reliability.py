"""Faults and stale state: fingerprints of reused artifacts, checkpoints that verify, one-line errors
for user and environment faults (file system, model files), runs that diverge, stop signals.

The unit tests run in-process; the end-to-end ones run `fedpft train` on configs/tiny.yaml (marked
slow).
"""
import json
import logging
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from helpers import CONFIG, one_line_error, tail
from helpers import train as run_tiny

from fedpft_dist.checkpoint import (CheckpointInvalid, checkpoint_dirs, load_checkpoint, move_aside,
                                    newest_checkpoint, save_checkpoint, verify_checkpoint)
from fedpft_dist.config import load_config
from fedpft_dist.environment import StopSignals
from fedpft_dist.errors import UserError
from fedpft_dist.fingerprint import (describe_difference, first_difference, proxy_fingerprint, run_fingerprint,
                                     weights_identity)
from fedpft_dist.fsutil import as_os_error, filesystem_error, run_dir_problem
from fedpft_dist.models.loading import resolve_model_dir

CHEAP = ("fed.method=fedpft_no_layer_distill", "fed.align_every=0", "fed.fidelity_every=0")


def train(run_dir: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_tiny(run_dir, *CHEAP, *overrides, timeout=timeout, check=False)


def tiny_bert(path: Path, seed: int, hidden: int = 32) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=4 * hidden)).save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------------
# Checkpoints verify, and resume falls back to the newest one that does
# ----------------------------------------------------------------------------------------------------

def _two_rounds(root: Path) -> None:
    for r in (1, 2):
        save_checkpoint(root, f"round-{r:06d}", {"adapter": {"w": torch.full((64,), float(r))},
                                                 "proxy_ffn": {"f": torch.ones(8) * r}}, {"round": r})


def test_a_checkpoint_records_each_file_size_and_hash(tmp_path):
    _two_rounds(tmp_path)
    meta = verify_checkpoint(tmp_path / "round-000002")
    assert set(meta["files"]) == {"adapter.safetensors", "proxy_ffn.safetensors"}
    for name, rec in meta["files"].items():
        assert rec["bytes"] == (tmp_path / "round-000002" / name).stat().st_size and len(rec["sha256"]) == 64
    tensors, meta = load_checkpoint(tmp_path / "round-000002")
    assert torch.equal(tensors["adapter"]["w"], torch.full((64,), 2.0)) and meta["round"] == 2


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated adapter": (lambda c: _truncate(c / "adapter.safetensors"), "adapter.safetensors has"),
    "truncated ffn": (lambda c: _truncate(c / "proxy_ffn.safetensors"), "proxy_ffn.safetensors has"),
    "changed byte": (lambda c: _flip_a_byte(c / "adapter.safetensors"), "does not match the hash"),
    "missing file": (lambda c: (c / "proxy_ffn.safetensors").unlink(), "proxy_ffn.safetensors is missing"),
    "truncated state.json": (lambda c: _truncate(c / "state.json"), "state.json is unreadable"),
    "missing state.json": (lambda c: (c / "state.json").unlink(), "no state.json"),
}


@pytest.mark.parametrize("fault", sorted(CORRUPTIONS))
def test_resume_skips_a_corrupt_newest_checkpoint_with_a_warning(tmp_path, caplog, fault):
    _two_rounds(tmp_path)
    corrupt, reason = CORRUPTIONS[fault]
    corrupt(tmp_path / "round-000002")
    with pytest.raises(CheckpointInvalid, match=reason):
        verify_checkpoint(tmp_path / "round-000002")
    with caplog.at_level(logging.WARNING):
        path, tensors, meta = newest_checkpoint(tmp_path, "round-", "fed.resume")
    assert path.name == "round-000001" and meta["round"] == 1
    assert torch.equal(tensors["adapter"]["w"], torch.ones(64))
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "skipping checkpoint" in warned and "round-000002" in warned and reason in warned


def test_no_checkpoint_that_verifies_is_one_user_error(tmp_path):
    _two_rounds(tmp_path)
    for r in (1, 2):
        _truncate(tmp_path / f"round-{r:06d}" / "adapter.safetensors")
    with pytest.raises(UserError, match=r"fed.resume: none of the 2 checkpoints in .* verifies \(newest, "
                                        r"round-000002: adapter.safetensors has .*run.rebuild=true"):
        newest_checkpoint(tmp_path, "round-", "fed.resume")
    assert newest_checkpoint(tmp_path / "none", "round-", "fed.resume") is None


def test_a_checkpoint_without_file_records_does_not_verify(tmp_path):
    (tmp_path / "round-000001").mkdir()
    (tmp_path / "round-000001" / "state.json").write_text(json.dumps({"round": 1}))
    with pytest.raises(CheckpointInvalid, match="lists no file sizes and hashes"):
        verify_checkpoint(tmp_path / "round-000001")


def test_stale_checkpoints_move_aside_and_are_kept(tmp_path):
    root = tmp_path / "rounds"
    _two_rounds(root)
    moved = move_aside(root)
    assert not root.exists() and moved.name.startswith("rounds.stale-")
    assert [p.name for p in checkpoint_dirs(moved, "round-")] == ["round-000002", "round-000001"]
    _two_rounds(root)
    assert move_aside(root) != moved


# ----------------------------------------------------------------------------------------------------
# Fingerprints
# ----------------------------------------------------------------------------------------------------

def test_weights_identity_tells_models_with_the_same_shapes_apart(tmp_path):
    a, b, a2 = (tiny_bert(tmp_path / n, s) for n, s in (("a", 0), ("b", 1), ("a2", 0)))
    assert weights_identity(a) == weights_identity(a2)          # same bytes in another directory
    assert weights_identity(a) != weights_identity(b)           # same architecture, other weights
    assert weights_identity(a) != weights_identity(tiny_bert(tmp_path / "wide", 0, hidden=48))


def test_large_weight_files_are_hashed_by_samples(tmp_path, monkeypatch):
    import fedpft_dist.fingerprint as fp

    monkeypatch.setattr(fp, "WHOLE_FILE_BYTES", 1 << 16)
    monkeypatch.setattr(fp, "SAMPLE_BYTES", 1 << 10)
    (tmp_path / "config.json").write_text("{}")
    w = tmp_path / "model.safetensors"
    data = bytearray(os.urandom(1 << 20))
    w.write_bytes(bytes(data))
    first = fp.weights_identity(tmp_path)
    data[-5] ^= 0xFF   # the last sample block covers the end of the file
    w.write_bytes(bytes(data))
    os.utime(w, ns=(1, 1))
    assert fp.weights_identity(tmp_path) != first


def test_the_first_differing_setting_is_named():
    a = {"model.weights": "x", "proxy.keep_ratio": 0.25, "client_model": "d1"}
    assert first_difference(a, dict(a)) is None
    diff = first_difference(a, {**a, "proxy.keep_ratio": 0.5, "client_model": "d2"})
    assert describe_difference(diff) == "proxy.keep_ratio=0.25, this config has 0.5"
    assert "another FM" in describe_difference(first_difference(a, {**a, "model.weights": "y"}))
    assert "older fedpft-dist" in describe_difference(first_difference(None, a))
    # tuples and lists are the same once stored as JSON
    assert first_difference({"proxy.retained_layers": [0, -1]}, {"proxy.retained_layers": (0, -1)}) is None


def test_a_run_fingerprint_leaves_out_what_does_not_change_the_adapter():
    base = load_config(CONFIG)
    fm = resolve_model_dir("minilm")
    fp = run_fingerprint(base, fm, {"proxy.keep_ratio": 0.25})
    same = ["fed.eval_every=2", "fed.checkpoint_every=3", "fed.stop_after=1", "distill.zero_stage=0",
            "run.dir=/elsewhere", "dist.timeout_s=30", "fed.fidelity_every=0", "fed.eval_batch_size=8"]
    assert first_difference(fp, run_fingerprint(load_config(CONFIG, same), fm, {"proxy.keep_ratio": 0.25})) is None
    for override in ("fed.lr=0.002", "fed.rounds=3", "run.seed=1", "data.max_train=100", "fed.partition=dirichlet"):
        diff = first_difference(fp, run_fingerprint(load_config(CONFIG, [override]), fm, {"proxy.keep_ratio": 0.25}))
        assert diff is not None and diff[0] == override.split("=")[0], override
    assert first_difference(fp, run_fingerprint(base, fm, {"proxy.keep_ratio": 0.5}))[0] == "client_model"


def test_a_local_data_file_is_fingerprinted_by_its_contents(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("text,label\na,0\nb,1\n")
    cfg = load_config(CONFIG, [f"data.dataset={data}"])
    fm = resolve_model_dir("minilm")
    before = run_fingerprint(cfg, fm, None)
    assert "data.dataset:content" in before and "data.test_file:content" not in before
    assert "data.dataset:content" not in run_fingerprint(load_config(CONFIG), fm, None)   # built in: 'tweets'
    data.write_text("text,label\na,1\nb,0\n")   # same path and size, other labels
    diff = first_difference(before, run_fingerprint(cfg, fm, None))
    assert diff[0] == "data.dataset:content" and "other contents of the file data.dataset names" in \
        describe_difference(diff)


def test_a_proxy_fingerprint_holds_calibration_settings_only_where_calibration_text_is_used():
    fm = resolve_model_dir("minilm")
    weight = proxy_fingerprint(load_config(CONFIG), fm)
    assert "proxy.calibration_chunks" not in weight and "run.seed" not in weight
    assert first_difference(weight, proxy_fingerprint(load_config(CONFIG, ["run.seed=3"]), fm)) is None
    act = proxy_fingerprint(load_config(CONFIG, ["proxy.saliency=apoz"]), fm)
    assert act["proxy.calibration_chunks"] == 8 and act["public_text.source"] == "austen"
    # compensation fits on calibration text whatever the saliency
    fitted = proxy_fingerprint(load_config(CONFIG, ["proxy.compensate=true"]), fm)
    assert fitted["proxy.compensate"] is True and fitted["proxy.calibration_chunks"] == 8
    assert first_difference(fitted, proxy_fingerprint(load_config(CONFIG, ["proxy.compensate=true",
                                                                             "proxy.compensate_ridge=0.1"]), fm))


# ----------------------------------------------------------------------------------------------------
# Model directories: one line, never a pickle
# ----------------------------------------------------------------------------------------------------

def test_a_model_path_that_is_a_file_says_so(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(UserError, match=r"model.path: .*model.safetensors is a file; it must be a Hugging Face "
                                        r"model directory"):
        resolve_model_dir(str(f))


def test_pickle_only_weights_are_refused_before_anything_loads(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UserError, match=r"only as pickle files \(pytorch_model.bin\); fedpft never unpickles"):
        resolve_model_dir(str(tmp_path))


def test_custom_code_in_a_model_config_is_named_in_a_warning(tmp_path, caplog):
    model = tiny_bert(tmp_path / "m", 0)
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_custom.CustomModel"}
    (model / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING):
        assert resolve_model_dir(str(model)) == model
    assert any("auto_map" in r.getMessage() and "never runs a model's own code" in r.getMessage()
               for r in caplog.records)


# ----------------------------------------------------------------------------------------------------
# File-system faults: one line naming the path and what to do
# ----------------------------------------------------------------------------------------------------

def test_a_run_dir_that_is_a_file_or_under_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert "a file is where a directory should be" in run_dir_problem(f)
    under = run_dir_problem(f / "run")
    assert str(f / "run") in under and "a part of the path is a file" in under
    assert run_dir_problem(tmp_path / "new" / "run") is None and (tmp_path / "new" / "run").is_dir()


@pytest.fixture
def small_fs(tmp_path):
    """A 64 KiB tmpfs (needs root)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount to make a small or read-only file system")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_read_only_run_dir_is_one_line(small_fs):
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    problem = run_dir_problem(small_fs / "run")
    assert problem.startswith(str(small_fs / "run")) and "read-only file system" in problem
    assert "point run.dir at a writable file system" in problem


def test_a_full_disk_during_a_checkpoint_is_one_line_naming_it(small_fs):
    save_checkpoint(small_fs, "round-000001", {"adapter": {"w": torch.zeros(8)}}, {"round": 1})
    with pytest.raises(OSError) as info:
        save_checkpoint(small_fs, "round-000002", {"adapter": {"w": torch.zeros(100_000)}}, {"round": 2})
    message = filesystem_error(info.value)
    assert message.startswith(str(small_fs / "round-000002")) and "no space left on device" in message
    # the complete checkpoint is untouched and nothing half-written is left
    assert verify_checkpoint(small_fs / "round-000001")["round"] == 1
    assert [p.name for p in small_fs.iterdir()] == ["round-000001"]


def test_library_io_errors_become_os_errors_naming_the_path():
    class SafetensorError(Exception):
        pass

    err = as_os_error(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
                      "/run/x")
    assert isinstance(err, OSError) and err.errno == 28 and err.filename == "/run/x"
    assert as_os_error(ValueError("shape mismatch"), "/run/x") is None
    assert filesystem_error(OSError(13, "Permission denied", "/run/x")).startswith("/run/x: permission denied:")
    assert filesystem_error(OSError(22, "Invalid argument", "/run/x")) is None   # not a user's fault: a traceback


def test_the_cli_turns_a_file_system_fault_into_one_line(tmp_path, capsys):
    from fedpft_dist.cli import main

    f = tmp_path / "file"
    f.write_text("x")
    assert main(["proxy", "--config", CONFIG, f"run.dir={f}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fedpft: error: {f}") and "a file is where a directory" in err[0]


# ----------------------------------------------------------------------------------------------------
# Stop signals
# ----------------------------------------------------------------------------------------------------

def test_stop_signals_are_recorded_and_the_old_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert stop.received is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == "SIGUSR1"   # the first one
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_distillation_resumed_with_other_settings_names_the_setting(tmp_path):
    from types import SimpleNamespace

    from fedpft_dist.alignment.job import DistillRun, _resume
    from fedpft_dist.config import DistillConfig

    save_checkpoint(tmp_path, "step-0000002", {"train_state": {"w": torch.zeros(2)}},
                    {"step": 2, "total_steps": 4, "world_size": 1, "zero_stage": 3, "losses": [1.0, 0.9],
                     "fingerprint": {"distill.lr": 6e-4, "run.seed": 0}})
    comm = SimpleNamespace(agree=lambda flag, **kw: flag, barrier=lambda **kw: None)
    rt = SimpleNamespace(comm=comm, world_size=1, is_main=True)
    job = SimpleNamespace(total=4, named={})   # nothing partitioned: whole-state checkpoints
    run = DistillRun(checkpoint_dir=str(tmp_path), resume=True, fingerprint={"distill.lr": 1e-3, "run.seed": 0})
    with pytest.raises(UserError, match=r"distill.resume: .* was written with distill.lr=0.0006, this config has 0.001"):
        _resume(rt, job, DistillConfig(zero_stage=3), run)
    run.fingerprint = {"distill.lr": 6e-4, "run.seed": 0}
    with pytest.raises(UserError, match=r"distill.resume: .* distill.zero_stage 3, this job has 1"):
        _resume(rt, job, DistillConfig(zero_stage=1), run)
    # a fresh job over these checkpoints stops, or with run.rebuild moves them aside
    fresh = DistillRun(checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=1)
    save_checkpoint(tmp_path / "ck", "step-0000001", {"train_state": {"w": torch.zeros(2)}}, {"step": 1})
    with pytest.raises(UserError, match=r"holds checkpoints of an earlier distillation: continue it with "
                                        r"distill.resume=true, or set run.rebuild=true"):
        _resume(rt, job, DistillConfig(), fresh)
    fresh.replace_stale = True
    assert _resume(rt, job, DistillConfig(), fresh) == (0, [])
    assert not (tmp_path / "ck").exists() and list(tmp_path.glob("ck.stale-*"))


# ----------------------------------------------------------------------------------------------------
# End to end: stale artifacts, an earlier run's checkpoints, divergence, a full disk
# ----------------------------------------------------------------------------------------------------

@pytest.fixture
def finished_run(cheap_run, tmp_path) -> Path:
    """A copy of the suite's cheap run (its proxy: keep_ratio 0.25 of MiniLM) without its round
    checkpoints, as a finished run that never checkpointed leaves its directory."""
    import shutil

    run = tmp_path / "finished"
    shutil.copytree(cheap_run, run)
    shutil.rmtree(run / "checkpoints")
    return run


@pytest.mark.slow
def test_a_changed_proxy_setting_or_model_in_an_old_run_dir_is_named_not_reused(finished_run, tmp_path):
    meta = json.loads((finished_run / "proxy" / "fedpft_proxy.json").read_text())
    assert meta["keep_ratio"] == 0.25 and meta["fingerprint"]["proxy.keep_ratio"] == 0.25
    line = one_line_error(train(finished_run, "fed.rounds=1", "proxy.keep_ratio=0.5"))
    assert "proxy.keep_ratio=0.25, this config has 0.5" in line and "run.rebuild=true" in line, line
    # a MiniLM with random weights (same files, same shapes) and another architecture
    from transformers import AutoConfig, AutoModel

    from fedpft_dist.resources import resource_path

    src = resource_path("minilm")
    torch.manual_seed(1)
    AutoModel.from_config(AutoConfig.from_pretrained(src)).save_pretrained(tmp_path / "random-minilm")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (tmp_path / "random-minilm" / name).write_bytes((src / name).read_bytes())
    bert = tiny_bert(tmp_path / "tiny-bert", 0)
    for model in (tmp_path / "random-minilm", bert):
        line = one_line_error(train(finished_run, "fed.rounds=1", f"model.path={model}"))
        assert "the weights of another FM" in line and "run.rebuild=true" in line, line
    # the refused runs left the old run as it was
    assert json.loads((finished_run / "proxy" / "fedpft_proxy.json").read_text()) == meta
    assert json.loads((finished_run / "summary.json").read_text())["rounds"] == 3


@pytest.mark.slow
def test_run_rebuild_makes_a_stale_proxy_again(finished_run):
    run = finished_run
    old = json.loads((run / "summary.json").read_text())
    proc = train(run, "fed.rounds=1", "proxy.keep_ratio=0.5", "run.rebuild=true")
    assert proc.returncode == 0, tail(proc)
    assert "making it again (run.rebuild=true)" in proc.stderr
    meta = json.loads((run / "proxy" / "fedpft_proxy.json").read_text())
    assert meta["keep_ratio"] == 0.5 and meta["fingerprint"]["proxy.keep_ratio"] == 0.5
    assert json.loads((run / "summary.json").read_text())["client_params"] > old["client_params"]


@pytest.mark.slow
def test_a_fresh_run_never_mixes_with_an_earlier_runs_checkpoints(tmp_path):
    run = tmp_path / "run"
    rounds = run / "checkpoints" / "rounds"
    first = train(run, "fed.rounds=2", "fed.checkpoint_every=1", "fed.stop_after=1")
    assert first.returncode == 0 and [p.name for p in checkpoint_dirs(rounds, "round-")] == ["round-000001"], \
        tail(first)
    line = one_line_error(train(run, "fed.rounds=2"))
    assert "holds round checkpoints of an earlier run: continue it with fed.resume=true" in line, line
    # with run.rebuild the old checkpoints move aside (kept) and the new run starts at round 1
    again = train(run, "fed.rounds=2", "fed.checkpoint_every=1", "fed.stop_after=1", "fed.lr=0.002",
                  "run.rebuild=true")
    assert again.returncode == 0 and "moved the earlier run's round checkpoints" in again.stderr, tail(again)
    (stale,) = run.glob("checkpoints/rounds.stale-*")
    assert [p.name for p in checkpoint_dirs(stale, "round-")] == ["round-000001"]
    ours = json.loads((rounds / "round-000001" / "state.json").read_text())
    assert ours["fingerprint"]["fed.lr"] == 0.002
    # resume continues the new run and refuses to continue it with the old settings
    line = one_line_error(train(run, "fed.rounds=2", "fed.resume=true"))
    assert "fed.lr=0.002, this config has 0.001" in line, line
    resumed = train(run, "fed.rounds=2", "fed.lr=0.002", "fed.resume=true")
    assert resumed.returncode == 0 and "continuing at round 2" in resumed.stderr, tail(resumed)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and rows[0]["lr"] == pytest.approx(0.002)  # the new run's rows


@pytest.mark.slow
def test_every_update_non_finite_warns_each_round_and_stops_the_run(tmp_path):
    run = tmp_path / "run"
    proc = train(run, "fed.rounds=5", "fed.lr=1e6", "fed.lr_schedule=constant", "fed.max_excluded_rounds=2")
    line = one_line_error(proc, code=3)
    assert "fed.max_excluded_rounds: every client update was non-finite in 2 consecutive rounds (1-2)" in line, line
    assert "lower fed.lr" in line
    assert proc.stderr.count("every client's update was non-finite and left out (4 of 4)") == 2, tail(proc)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["excluded_clients"] == 4 and r["train_loss"] != r["train_loss"] for r in rows)   # NaN, not 0
    assert not (run / "summary.json").exists()


@pytest.mark.slow
def test_a_full_disk_while_saving_the_proxy_is_one_line(tmp_path, small_fs):
    run = small_fs / "run"
    line = one_line_error(run_cli("proxy", "--config", CONFIG, f"run.dir={run}", timeout=300))
    assert line.startswith(f"fedpft: error: {run / 'proxy'}: no space left on device: free space there"), line
    assert (run / "config.yaml").is_file() and not (run / "proxy").exists()


def test_a_model_directory_is_reused_only_with_its_fingerprint(tmp_path, caplog):
    from fedpft_dist.alignment.stages import reusable
    from fedpft_dist.fingerprint import emulator_fingerprint

    fm = resolve_model_dir("minilm")
    made = emulator_fingerprint(load_config(CONFIG), fm)
    emu = tmp_path / "emulator"
    emu.mkdir()
    (emu / "config.json").write_text("{}")
    (emu / "fedpft_proxy.json").write_text(json.dumps({"fingerprint": made}))
    assert reusable(load_config(CONFIG), emu, made, "the emulator")
    other = load_config(CONFIG, ["fed.fedot_adapter_layers=2+1"])
    with pytest.raises(UserError, match=r'the emulator at .* was made with fed.fedot_adapter_layers="2\+2", '
                                        r'this config has "2\+1": use a new run.dir, or set run.rebuild=true'):
        reusable(other, emu, emulator_fingerprint(other, fm), "the emulator")
    rebuild = load_config(CONFIG, ["fed.fedot_adapter_layers=2+1", "run.rebuild=true"])
    with caplog.at_level(logging.WARNING):
        assert not reusable(rebuild, emu, emulator_fingerprint(rebuild, fm), "the emulator")
    assert any("making it again" in r.getMessage() for r in caplog.records)
    assert not reusable(load_config(CONFIG), tmp_path / "missing", made, "the emulator")
    (emu / "fedpft_proxy.json").write_text(json.dumps({"kind": "emulator"}))   # made before fingerprints
    with pytest.raises(UserError, match="no record of its settings"):
        reusable(load_config(CONFIG), emu, made, "the emulator")


def test_distill_emulator_out_shares_one_distilled_emulator_between_runs(tmp_path):
    """distill.emulator_out: a FedOT run reuses the distilled emulator another run left there when its
    settings match (nothing is distilled: no runtime is needed) and refuses one distilled otherwise."""
    from fedpft_dist.alignment.stages import distilled_proxy
    from fedpft_dist.fingerprint import distilled_fingerprint, emulator_fingerprint
    from fedpft_dist.run_layout import RunLayout

    shared = tmp_path / "shared" / "emulator_distilled"
    cfg = load_config(CONFIG, [f"run.dir={tmp_path / 'a'}", f"distill.emulator_out={shared}", "fed.method=fedot"])
    layout = RunLayout.from_config(cfg)
    assert layout.emulator_distilled == shared and layout.emulator == tmp_path / "a" / "emulator"
    shared.mkdir(parents=True)
    (shared / "config.json").write_text("{}")
    made = distilled_fingerprint(cfg, emulator_fingerprint(cfg, resolve_model_dir("minilm")))
    (shared / "fedpft_proxy.json").write_text(json.dumps({"fingerprint": made}))
    assert distilled_proxy(cfg, None, layout, emulator=True) == shared
    other = load_config(CONFIG, [f"run.dir={tmp_path / 'b'}", f"distill.emulator_out={shared}", "run.seed=1"])
    with pytest.raises(UserError, match=r"the distilled emulator at .* was made with run.seed=0"):
        distilled_proxy(other, None, RunLayout.from_config(other), emulator=True)

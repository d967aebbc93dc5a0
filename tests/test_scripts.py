"""The developer scripts: the GPU check says so cleanly where there is no GPU; the same-outputs check
compares what it should."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import PYTHON, REPO, child_env

sys.path.insert(0, str(REPO / "scripts"))
import adapter_scale  # noqa: E402
import same_outputs  # noqa: E402


def _run(path, adapter: bytes, rows: list[dict]) -> None:
    (path / "adapter").mkdir(parents=True)
    (path / "adapter" / "adapter_model.safetensors").write_bytes(adapter)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_same_outputs_ignores_timings_and_nothing_else(tmp_path):
    row = {"round": 1, "accuracy": 0.5, "seconds": {"round": 1.0}, "local_seconds_per_rank": [1.0]}
    _run(tmp_path / "a", b"weights", [row])
    _run(tmp_path / "b", b"weights", [{**row, "seconds": {"round": 9.0}, "local_seconds_per_rank": [3.0]}])
    assert same_outputs.compare_runs(tmp_path / "a", tmp_path / "b") == []
    _run(tmp_path / "c", b"weightz", [{**row, "accuracy": 0.51}])
    problems = same_outputs.compare_runs(tmp_path / "a", tmp_path / "c")
    assert any("adapter" in p for p in problems) and any("accuracy 0.5 -> 0.51" in p for p in problems)
    _run(tmp_path / "d", b"weights", [row, {**row, "round": 2}])
    assert any("1 rows in the reference, 2 now" in p for p in same_outputs.compare_runs(tmp_path / "a", tmp_path / "d"))


def test_adapter_scale_is_distill_adapter_noise_s_unit(tmp_path):
    """A saved adapter whose B A has entries of std s / sqrt(d_in) reads as s_eff = s, the scale a
    perturbation with distill.adapter_noise = s has."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    d_in, d_out, r, s = 256, 128, 8, 0.3
    a = torch.randn(r, d_in, generator=gen) / d_in ** 0.5
    b = torch.randn(d_out, r, generator=gen) * (s / r ** 0.5) / (16.0 / r)   # lora_alpha 16: scaling 2
    rd = tmp_path / "round-000001"
    rd.mkdir()
    save_file({"m.q.lora_A.weight": a, "m.q.lora_B.weight": b}, str(rd / "adapter.safetensors"))
    (rd / "state.json").write_text(json.dumps({"round": 1, "lora_alpha": 16.0, "lora_r": r}))
    got = adapter_scale.round_scales(rd)
    assert got["weights"] == 1 and got["median"] == pytest.approx(s, rel=0.15)

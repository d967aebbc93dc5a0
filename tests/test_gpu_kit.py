"""What the GPU check needs before it meets a GPU: models built from config with seeded random
weights, the kit that carries what the GPU image lacks, and a rehearsal of the check's set-up with
only torch, the kit and the image's packages.

What the rehearsal cannot reproduce here: the image's Python (3.12; here 3.11, so the kit's one
compiled wheel, pydantic-core for CPython 3.12, is installed for 3.12 and then replaced by this
machine's build of the same version to be imported), the image's versions of the packages both
machines have (transformers 5.17 there; the pinned ones here stand in), CUDA, NCCL and compiled
Triton. scripts/gpu-check.sh itself runs on a GPU machine.
"""
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, REPO, child_env

KIT_LIMIT = 40 * 2**20


def _minilm_spec(dst: Path) -> Path:
    from fedpft_dist.resources import resource_path

    src = resource_path("minilm")
    dst.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copyfile(src / name, dst / name)
    return dst


def test_random_model_paths_are_seeded_cached_and_checked(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from fedpft_dist.errors import UserError
    from fedpft_dist.models.loading import config_path, load_model, load_tokenizer, resolve_model_dir
    from fedpft_dist.models.random_init import random_model

    monkeypatch.setenv("FEDPFT_CACHE", str(tmp_path / "cache"))
    spec = _minilm_spec(tmp_path / "minilm")
    a = resolve_model_dir(f"random:{spec}")
    assert resolve_model_dir(f"random:{spec}@0") == a          # seed 0 is the default; built once
    b = resolve_model_dir(f"random:{spec}@1")
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and any(not torch.equal(wa[k], wb[k]) for k in wa)
    # the same seed builds the same weights, in memory as on disk
    mem = random_model(spec, seed=1)
    assert all(torch.equal(v, wb[k]) for k, v in mem.state_dict().items() if k in wb)
    model = load_model(a, "sequence-classification", num_labels=3)
    assert model.config.num_hidden_layers == 6 and len(load_tokenizer(a)) == 30522
    assert config_path(f"random:{spec}@4") == spec / "config.json"  # a plan reads the shape, builds nothing

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copyfile(spec / "config.json", bare / "config.json")
    with pytest.raises(UserError, match="no tokenizer files"):
        resolve_model_dir(f"random:{bare}")
    (bare / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="not supported"):
        resolve_model_dir(f"random:{bare}")
    with pytest.raises(UserError, match="seed after '@' must be an integer"):
        resolve_model_dir(f"random:{spec}@x")
    with pytest.raises(UserError, match="config.json not found"):
        resolve_model_dir(f"random:{tmp_path / 'nowhere'}")


def test_a_lent_teacher_gets_its_fp32_parameters_back():
    # DeepSpeed's engine casts the modules it wraps to bf16; at ZeRO 0-2 one of them is the caller's FM
    from fedpft_dist.alignment.job import _lent

    fm = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).to(torch.bfloat16)
    fm[1].float()                                              # its LoRA, say: fp32
    fm[1].weight.data.normal_()
    before = {k: v.clone() for k, v in fm.state_dict().items()}
    with _lent(fm, torch.bfloat16):
        fm.bfloat16()
        for p in fm.parameters():
            p.requires_grad_(False)
        fm.train(False)
    assert fm[1].weight.dtype == torch.float32 and fm[0].weight.dtype == torch.bfloat16
    assert all(torch.equal(v, before[k]) for k, v in fm.state_dict().items())
    assert all(p.requires_grad for p in fm.parameters())


def test_gpu_check_without_cuda_says_so(tmp_path):
    env = child_env()
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["FEDPFT_PYTHON"] = PYTHON
    proc = subprocess.run(["bash", "scripts/gpu-check.sh", str(tmp_path / "out")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "out" / "gpu-check.json").read_text()) == {"cuda": False}
    assert "no CUDA device" in proc.stdout
    proc = subprocess.run(["bash", "scripts/gpu-check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _image_packages() -> set[str]:
    lines = (REPO / "scripts" / "gpu-image-packages.txt").read_text().splitlines()
    return {_norm(line.strip()) for line in lines if line.strip() and not line.startswith("#")}


def _with_dependencies(names: set[str]) -> set[str]:
    """``names`` and, transitively, what their versions installed here require: the image's versions
    bring their own dependencies, which may differ from what this environment's versions need (its
    huggingface-hub needs httpx2, the image's does not). Our code's own needs are not added."""
    from packaging.requirements import Requirement

    installed = {_norm(d.metadata["Name"]): d for d in md.distributions()}
    out, todo = set(), [n for n in names if n in installed]
    while todo:
        name = todo.pop()
        if name in out:
            continue
        out.add(name)
        for line in installed[name].requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            if _norm(req.name) in installed:
                todo.append(_norm(req.name))
    return out


def _link_distributions(names: set[str], dst: Path) -> list[str]:
    """This environment's installs of the distributions ``names``: their top-level modules and
    dist-info, linked into ``dst`` (a site directory holding those packages alone)."""
    dst.mkdir(parents=True, exist_ok=True)
    linked = []
    for dist in md.distributions():
        if _norm(dist.metadata["Name"]) not in names or not dist.files:
            continue
        tops = {f.parts[0] for f in dist.files if f.parts and not f.parts[0].startswith("..")}
        for top in tops:
            src = Path(dist.locate_file(top))
            if src.exists() and not (dst / top).exists() and top != "__pycache__" and not top.endswith(".pth"):
                (dst / top).symlink_to(src)
        linked.append(dist.metadata["Name"])
    return linked


@pytest.mark.slow
def test_the_kit_builds_small_and_the_check_sets_up_with_the_image_packages_alone(tmp_path):
    kit = tmp_path / "kit"
    env = child_env()
    env["FEDPFT_PYTHON"] = PYTHON
    proc = subprocess.run(["bash", "scripts/gpu-kit.sh", str(kit)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0 and re.search(r"(?i)could not find a version|connection|network|resolve host",
                                          proc.stderr):
        pytest.skip(f"no package index reachable for the kit's wheels: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = json.loads((kit / "MANIFEST.json").read_text())
    size = sum(p.stat().st_size for p in kit.rglob("*") if p.is_file())
    assert size < KIT_LIMIT and manifest["total_bytes"] <= size, size
    wheels = sorted(p.name for p in (kit / "wheels").glob("*.whl"))
    names = [_norm(w.split("-")[0]) for w in wheels]
    assert len(set(names)) == len(names), wheels           # one version of each: two stop the install
    assert "deepspeed" in names and not set(names) - {"deepspeed", "hjson", "pydantic", "pydantic-core",
                                                       "annotated-types", "typing-inspection", "typing-extensions"}
    for m in ("minilm", "smollm2-135m", "llama2-7b"):
        assert (kit / "models" / m / "config.json").is_file()

    # Installed as on the GPU machine: no index, no dependencies resolved, for CPython 3.12.
    site = tmp_path / "site"
    proc = subprocess.run([PYTHON, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--target", str(site), "--python-version", "3.12", "--implementation", "cp",
                           "--platform", "manylinux2014_x86_64", "--only-binary=:all:",
                           *map(str, (kit / "wheels").glob("*.whl"))], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (site / "deepspeed" / "__init__.py").is_file()
    if sys.version_info[:2] != (3, 12):
        # The image's Python is 3.12: the same version of pydantic-core, built for this Python.
        import pydantic_core

        assert pydantic_core.__version__ == md.version("pydantic-core")
        assert any(_norm(w.split("-")[0]) == "pydantic-core" and f"-{pydantic_core.__version__}-" in w for w in wheels)
        for p in site.glob("pydantic_core*"):
            shutil.rmtree(p)
        shutil.copytree(Path(pydantic_core.__file__).parent, site / "pydantic_core")

    image = tmp_path / "image"
    linked = _link_distributions(_with_dependencies(_image_packages()), image)
    assert {"torch", "transformers", "peft"} <= {_norm(n) for n in linked}
    py = tmp_path / "py"
    py.mkdir()
    (py / "fedpft_kernels").symlink_to(REPO / "kernels")
    iso = {k: v for k, v in env.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    iso.update(PYTHONPATH=os.pathsep.join(map(str, (REPO, py, site, image))), PYTHONNOUSERSITE="1",
               FEDPFT_CACHE=str(tmp_path / "cache"), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    # -S: no site directory of this environment; only the paths above and the standard library.
    script = f"""
import importlib, pkgutil, sys
assert not any('site-packages' in p and '{tmp_path}' not in p for p in sys.path), sys.path
import fedpft_dist, deepspeed, fedpft_kernels
mods = [m.name for m in pkgutil.walk_packages(fedpft_dist.__path__, 'fedpft_dist.')]
mods += [m.name for m in pkgutil.walk_packages(fedpft_kernels.__path__, 'fedpft_kernels.')]
for m in mods:
    importlib.import_module(m)
import deepspeed.runtime.zero, deepspeed.accelerator
from fedpft_dist.models.loading import load_model, load_tokenizer, resolve_model_dir
d = resolve_model_dir('random:{kit}/models/smollm2-135m')
tok = load_tokenizer(d)
m = load_model(d, 'causal-lm')
print('imported', len(mods), 'modules; random decoder', sum(p.numel() for p in m.parameters()), 'params; vocab', len(tok))
"""
    proc = subprocess.run([PYTHON, "-S", "-c", script], cwd=tmp_path, env=iso, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "random decoder 134515008 params; vocab 49152" in proc.stdout, proc.stdout
    # The check's own first phases: the probes and the 7B client step's plan, in that environment.
    proc = subprocess.run([PYTHON, "-S", str(REPO / "scripts" / "gpu_check.py"), "probe", str(tmp_path / "probe.json"),
                           "--device", "cpu"], cwd=tmp_path, env=iso, capture_output=True, text=True, timeout=300)
    probes = json.loads((tmp_path / "probe.json").read_text())["probes"]
    assert proc.returncode == 0, {k: v.get("error") for k, v in probes.items()}
    assert probes["deepspeed"]["ok"] and probes["nccl"]["ok"] is None
    proc = subprocess.run([PYTHON, "-S", "-m", "fedpft_dist", "memory-plan", "--config", "configs/large/llama-7b.yaml",
                           "--model-config", str(kit / "models" / "llama2-7b" / "config.json"), "--world-size", "1"],
                          cwd=REPO, env=iso, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "client_training" in proc.stdout, proc.stdout + proc.stderr[-3000:]


def test_doctor_on_one_rank_says_no_collective_ran(tmp_path):
    # a one-GPU machine: the all-reduce of one rank moves no byte, so no bandwidth is claimed
    from conftest import run_cli

    proc = run_cli("doctor", f"run.dir={tmp_path}", "doctor.local_ranks=1", "doctor.iters=2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 rank, gloo on cpu: no collective ran" in proc.stdout
    res = json.loads((tmp_path / "doctor.json").read_text())["allreduce"]
    assert res["collective_ran"] is False and res["busbw_GBps"] is None and res["sum_ok"] is True
    assert "versions" in proc.stdout

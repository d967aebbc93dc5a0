#!/usr/bin/env bash
# The kit that scripts/gpu-check.sh needs on a GPU machine that reaches no package registry and has
# only its image's packages (Python 3.12, torch, transformers, peft, accelerate, triton, mpi4py, ...;
# the list is scripts/gpu-image-packages.txt). Written into KIT (default .gpu-kit, ignored by git):
#   wheels/      what our imports need there and the image lacks, for CPython 3.12 on x86-64:
#                deepspeed built here with its ops off (they build on first use where CUDA is), and
#                its dependencies the image does not have; the versions are the ones installed here
#   models/      model directories for random:DIR model paths (config.json + tokenizer files):
#                minilm (BERT, 6 layers), smollm2-135m (LLaMA, 30 layers), llama2-7b (config only:
#                the check builds it on the GPU and feeds it token ids, no tokenizer needed)
#   MANIFEST.json  every file with its size, the wheels' versions, the kit's total size
# Needs this repository's environment (make setup) and PyPI (pip download, or pip's cache).
# The kit must stay under 40 MiB: a device call carries the tree and the kit, 64 MiB in all.
#   scripts/gpu-kit.sh [KIT]          FEDPFT_PYTHON picks the interpreter (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${FEDPFT_PYTHON:-.venv/bin/python}
kit=${1:-.gpu-kit}
limit_mib=40
[ -x "$PY" ] || PY=python3

rm -rf "$kit.tmp"
mkdir -p "$kit.tmp/wheels" "$kit.tmp/models"
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

# deepspeed: an sdist on PyPI; built here into a pure-Python wheel with no compiled ops.
ds=$(version deepspeed)
echo "gpu-kit: deepspeed $ds (ops off)"
DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$kit.tmp/wheels" \
  "deepspeed==$ds" >"$kit.tmp/pip-wheel.log" 2>&1 || { cat "$kit.tmp/pip-wheel.log" >&2; exit 1; }

# deepspeed's dependencies that the image lacks (pydantic's compiled core for CPython 3.12), and
# typing-extensions, which pydantic needs at a version newer than an image may have.
wanted=(hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions)
specs=()
for name in "${wanted[@]}"; do specs+=("$name==$(version "$name")"); done
echo "gpu-kit: ${specs[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$kit.tmp/wheels" "${specs[@]}" >"$kit.tmp/pip-download.log" 2>&1 \
  || { cat "$kit.tmp/pip-download.log" >&2; exit 1; }
rm -f "$kit.tmp"/pip-*.log

"$PY" - "$kit.tmp" "$limit_mib" <<'PY'
import json, shutil, sys
from pathlib import Path

from fedpft_dist.models.loading import resolve_model_dir
from fedpft_dist.models.random_init import TOKENIZER_FILES

kit, limit = Path(sys.argv[1]), float(sys.argv[2])
models = kit / "models"
keep = set(TOKENIZER_FILES) | {"chat_template.jinja"}
for name, source in (("minilm", "minilm"), ("smollm2-135m", "smollm2")):
    src, dst = resolve_model_dir(source), models / name
    dst.mkdir(parents=True)
    config = json.loads((src / "config.json").read_text())
    for k in ("_name_or_path", "_model_name_or_path", "transformers_version"):
        config.pop(k, None)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in sorted(src.iterdir()):
        if f.name in keep:
            shutil.copyfile(f, dst / f.name)
(models / "llama2-7b").mkdir()
shutil.copyfile("configs/large/llama-2-7b-config.json", models / "llama2-7b" / "config.json")

files = {str(p.relative_to(kit)): p.stat().st_size for p in sorted(kit.rglob("*")) if p.is_file()}
total = sum(files.values())
wheels = sorted(p.name for p in (kit / "wheels").glob("*.whl"))
(kit / "MANIFEST.json").write_text(json.dumps({"python": "3.12", "wheels": wheels, "files": files,
                                               "total_bytes": total, "limit_mib": limit}, indent=2) + "\n")
print(f"gpu-kit: {len(wheels)} wheels, {len(files)} files, {total / 2**20:.1f} MiB (limit {limit:g} MiB)")
if total > limit * 2**20:
    sys.exit(f"gpu-kit: {total / 2**20:.1f} MiB is over the {limit:g} MiB limit")
PY
rm -rf "$kit"
mv "$kit.tmp" "$kit"
echo "gpu-kit: wrote $kit"

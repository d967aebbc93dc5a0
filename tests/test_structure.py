"""The shape of the code: short functions, layers that point one way, collectives and optional
back-ends each imported in one place, no method names compared inside the federation package."""
import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIB = REPO / "fedpft_dist"
MAX_FUNCTION_LINES = 80

# package -> the fedpft_dist packages it must not import (runtime <- data, models <- alignment <-
# federation <- commands <- cli)
FORBIDDEN = {
    "runtime": ("data", "models", "alignment", "federation", "commands", "benchmarks", "cli"),
    "data": ("models", "alignment", "federation", "commands", "benchmarks", "cli"),
    "models": ("data", "alignment", "federation", "commands", "benchmarks", "cli"),
    "alignment": ("federation", "commands", "benchmarks", "cli"),
    "federation": ("commands", "benchmarks", "cli"),
    "commands": ("cli",),
}


def _modules() -> list[Path]:
    return sorted(p for p in LIB.rglob("*.py"))


def _imports(path: Path) -> list[str]:
    """Absolute names of every module ``path`` imports (top level and inside functions)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append(name)
            out += [f"{name}.{a.name}" for a in node.names]
    return out


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_point_one_way(package):
    bad = []
    for path in sorted((LIB / package).rglob("*.py")) if (LIB / package).is_dir() else []:
        for name in _imports(path):
            for other in FORBIDDEN[package]:
                if name == f"fedpft_dist.{other}" or name.startswith(f"fedpft_dist.{other}."):
                    bad.append(f"{path.relative_to(REPO)} imports {name}")
    assert not bad, bad


def test_the_layer_check_sees_relative_imports():
    names = _imports(LIB / "federation" / "engine.py")
    assert "fedpft_dist.alignment.stages" in names and "fedpft_dist.federation.methods" in names


@pytest.mark.parametrize("module,allowed", [
    ("torch.distributed", ("fedpft_dist/runtime/",)),
    ("deepspeed", ("fedpft_dist/alignment/zero.py",)),
    ("triton", ()),
])
def test_optional_backends_are_imported_in_one_place(module, allowed):
    offenders = []
    for path in _modules():
        rel = str(path.relative_to(REPO))
        if any(rel.startswith(a) for a in allowed):
            continue
        if any(n == module or n.startswith(module + ".") for n in _imports(path)):
            offenders.append(rel)
    assert not offenders, offenders


def test_federation_never_compares_method_names():
    pattern = re.compile(r"method ==|method in|method !=")
    hits = [f"{p.relative_to(REPO)}:{i}" for p in sorted((LIB / "federation").glob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_federation_does_not_know_the_command_layer():
    hits = [str(p.relative_to(REPO)) for p in sorted((LIB / "federation").glob("*.py")) if "commands" in p.read_text()]
    assert not hits, hits


def test_library_never_reads_the_rank_from_the_environment():
    # who prints is the runtime's answer (Runtime.is_main), not os.environ["RANK"]
    hits = [str(p.relative_to(REPO)) for p in _modules() if p.parent.name != "runtime"
            and re.search(r"environ(\.get)?\[?\(?[\"']RANK[\"']", p.read_text())]
    assert not hits, hits

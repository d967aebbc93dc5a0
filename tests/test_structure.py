"""The shape of the code: short functions, layers that point one way and no import circles, every
subcommand's handler in fedpft_dist/commands, collectives and optional back-ends each imported in one
place, no method names compared inside the federation package."""
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

# Every top-level module and package of fedpft_dist by layer: a module imports only from its own layer
# and the ones below (within a layer the import graph has no circles, and the packages of one layer
# keep apart as FORBIDDEN says). The bottom holds what every part needs: errors, files, the config and
# what is derived from it alone, the distributed runtime.
LAYERS = {
    "__init__": 0, "errors": 0, "fsutil": 0, "environment": 0, "resources": 0, "run_layout": 0, "config": 0,
    "checkpoint": 0, "fingerprint": 0, "runtime": 0,
    "data": 1, "models": 1,
    "alignment": 2,
    "federation": 3,
    "benchmarks": 4,
    "commands": 5,
    "cli": 6,
    "__main__": 7,
}


def _modules() -> list[Path]:
    return sorted(p for p in LIB.rglob("*.py"))


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _walk(tree: ast.AST, executed_only: bool) -> list[ast.AST]:
    """``ast.walk``, leaving out the bodies of ``if TYPE_CHECKING:`` with ``executed_only``."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        children = list(ast.iter_child_nodes(node))
        if executed_only and _is_type_checking(node):
            children = [node.test, *node.orelse]
        todo.extend(children)
    return out


def _imports(path: Path, executed_only: bool = False) -> list[str]:
    """Absolute names of every module ``path`` imports (top level and inside functions; with
    ``executed_only``, not those only type checkers see)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out = []
    for node in _walk(tree, executed_only):
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


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top(path: Path) -> str:
    """The top-level module or package of fedpft_dist that ``path`` belongs to."""
    return path.relative_to(LIB).with_suffix("").parts[0]


def _import_graph() -> dict[str, set[str]]:
    """Module -> the modules of fedpft_dist it imports when it runs (at the top or inside functions;
    an import under ``if TYPE_CHECKING:`` names a type for the checker and never runs)."""
    paths = {_module_name(p): p for p in _modules()}
    return {name: {n for n in _imports(path, executed_only=True) if n in paths and n != name}
            for name, path in paths.items()}


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


def test_every_top_level_module_has_a_layer():
    tops = {_top(p) for p in _modules()}
    assert tops <= set(LAYERS), f"give these a layer in LAYERS: {sorted(tops - set(LAYERS))}"


def test_top_level_modules_import_only_their_layer_and_below():
    bad = []
    for path in _modules():
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] != "fedpft_dist" or len(parts) < 2 or parts[1] not in LAYERS:
                continue
            if LAYERS[parts[1]] > LAYERS[_top(path)]:
                bad.append(f"{path.relative_to(REPO)} (layer {LAYERS[_top(path)]}) imports {name} "
                           f"(layer {LAYERS[parts[1]]})")
    assert not bad, bad


def _circle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of ``graph`` as the modules along it (the first one repeated at the end), or []."""
    state: dict[str, str] = {}

    def walk(node: str, path: list[str]) -> list[str]:
        state[node] = "open"
        path = path + [node]
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            found = walk(nxt, path) if nxt not in state else []
            if found:
                return found
        state[node] = "done"
        return []

    for node in sorted(graph):
        found = walk(node, []) if node not in state else []
        if found:
            return found
    return []


def test_no_import_circles():
    circle = _circle(_import_graph())
    assert not circle, " -> ".join(circle)


def test_the_circle_check_finds_circles_and_sees_function_level_imports():
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert not _circle({"a": {"b"}, "b": set(), "c": {"a", "b"}})
    # doctor imports the DeepSpeed report inside the function that uses it
    assert "fedpft_dist.alignment.zero" in _import_graph()["fedpft_dist.commands.doctor"]
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\nelse:\n    import b\n")
    names = [n.names[0].name for n in _walk(tree, executed_only=True) if isinstance(n, ast.Import)]
    assert names == ["b"]


def _subcommands() -> dict:
    import argparse

    from fedpft_dist.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_subcommand_dispatches_to_a_function_in_commands():
    from fedpft_dist.cli import Handler

    bad = []
    for name, parser in _subcommands().items():
        handler = parser.get_default("handler")
        if not isinstance(handler, Handler):
            bad.append(f"{name}: no Handler, got {handler!r}")
            continue
        path = LIB / "commands" / f"{handler.module}.py"
        defs = {n.name: n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)} \
            if path.is_file() else {}
        func = defs.get(handler.function)
        if func is None:
            bad.append(f"{name}: {handler.function} is not defined in {path.relative_to(REPO)}")
            continue
        params = {a.arg for a in func.args.args + func.args.kwonlyargs}
        dests = {a.dest for a in parser._actions}
        for param, source in handler.arguments:
            if param not in params:
                bad.append(f"{name}: {handler.function} has no parameter {param}")
            if source != "cfg" and source not in dests:
                bad.append(f"{name}: the parser has no argument {source} (for {param})")
    assert not bad, bad


def test_cli_reaches_the_commands_only_through_their_handlers():
    allowed = {"fedpft_dist", "fedpft_dist.errors", "fedpft_dist.fsutil", "fedpft_dist.config",
               "fedpft_dist.environment"}
    names = {n for n in _imports(LIB / "cli.py") if n.startswith("fedpft_dist")}
    modules = {n for n in names if n in {_module_name(p) for p in _modules()}}
    assert modules <= allowed, sorted(modules - allowed)


def test_one_source_for_every_default():
    """Code that takes a setting as a parameter defaults it to the config's default, not a copy of it."""
    import inspect

    from fedpft_dist.alignment.job import DistillRun
    from fedpft_dist.config import DistConfig, DistillConfig, FedConfig, ProxyConfig, RunConfig
    from fedpft_dist.data.partition import partition
    from fedpft_dist.runtime import init_runtime

    job, distill = DistillRun(), DistillConfig()
    shared = set(DistillRun.__dataclass_fields__) & set(DistillConfig.__dataclass_fields__)
    assert shared >= {"lr", "alpha", "steps", "epoch_fraction", "checkpoint_every", "resume"}
    differ = {n: (getattr(job, n), getattr(distill, n)) for n in shared if getattr(job, n) != getattr(distill, n)}
    assert not differ, f"DistillRun defaults (first) that differ from DistillConfig's: {differ}"
    assert (job.seed, job.eval_batch) == (RunConfig().seed, ProxyConfig().batch_size)

    fed, params = FedConfig(), inspect.signature(partition).parameters
    assert (params["alpha"].default, params["k"].default, params["size_sigma"].default) == (
        fed.alpha, fed.labels_per_client, fed.size_sigma)

    dist, params = DistConfig(), inspect.signature(init_runtime).parameters
    for name in ("backend", "timeout_s", "threads_per_rank", "log_all_ranks"):
        assert params[name].default == getattr(dist, name), name
    assert params["log_level"].default == RunConfig().log_level


def test_the_config_reference_page_is_up_to_date():
    from fedpft_dist.commands.config import REGENERATE, config_markdown

    page = REPO / "docs" / "config.md"
    assert page.is_file() and page.read_text() == config_markdown(), (
        f"docs/config.md is not what the config's fields give now: regenerate it with `{REGENERATE}`")


def test_the_layer_check_sees_relative_imports():
    names = _imports(LIB / "commands" / "sweep.py")
    assert "fedpft_dist.config" in names and "fedpft_dist.commands.report" in names


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

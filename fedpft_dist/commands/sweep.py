"""``fedpft sweep SPEC``: a grid of config overrides, one training run per point.

A spec is a YAML file (``sweeps/tiny.yaml``, ``sweeps/ablation.yaml``)::

    base: configs/tiny.yaml        # config file every point starts from (required)
    out: runs/sweeps/tiny          # run directories go under here (default: runs/sweeps/<spec name>)
    fixed:                         # overrides for every point (optional)
      fed.partition: dirichlet
    grid:                          # dotted config key -> list of values (required)
      fed.align_keep: [0.5, 0.8]
      run.seed: [0, 1]

``grid`` is one mapping or a list of mappings. The points are those of each mapping in turn; within a
mapping they are the Cartesian product in the order of nested loops over the keys as written, the last
key varying fastest. Point ``i`` trains in ``out/<i>-<key=value>-...``, named by the keys of its grid
that take more than one value in the sweep (the last part of the key where no other config key ends
in it). Paths are relative to the working directory, as for every other command.

Every point is resolved against the base config before anything runs, so a misspelt key or a value out
of range stops the command with one line that names it.
"""
from __future__ import annotations

import difflib
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..config import load_config, read_yaml, short_names
from ..errors import UserError
from .report import run_report

SPEC_KEYS = ("base", "out", "fixed", "grid")
# The sweep names each point's run directory itself; --out moves them all.
OWN_KEY = "run.dir"


@dataclass(frozen=True)
class Point:
    index: int
    values: dict[str, Any]   # this point's grid values, in the spec's key order
    run_dir: str
    overrides: list[str]     # fixed, command-line and grid overrides, then run.dir


@dataclass
class Sweep:
    path: Path
    base: str
    out: str
    fixed: dict[str, Any]
    extra: list[str]
    points: list[Point] = field(default_factory=list)

    def train_args(self, point: Point) -> list[str]:
        """The arguments of ``fedpft`` (after the program name) that train ``point``. Points always
        resume: one that was interrupted continues from its newest round checkpoint, one that never
        ran starts at round 1 (the spec or the command line may still say fed.resume=false)."""
        return ["train", "--config", self.base, "fed.resume=true", *point.overrides]


# ----------------------------------------------------------------------------------------------------
# Points, names, override text: pure functions
# ----------------------------------------------------------------------------------------------------

def grid_points(grid: dict[str, list]) -> list[dict[str, Any]]:
    """The Cartesian product of one grid mapping, last key varying fastest."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def override_text(value: Any) -> str:
    """``value`` as the right-hand side of a ``key=value`` override (parsed as YAML by the config)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def swept_keys(points: Sequence[dict[str, Any]]) -> list[str]:
    """Grid keys that take more than one value over the points (absent counts as a value)."""
    keys: list[str] = []
    for p in points:
        keys.extend(k for k in p if k not in keys)
    return [k for k in keys if len({override_text(p[k]) if k in p else None for p in points}) > 1]


def point_name(index: int, values: dict[str, Any], swept: Sequence[str], width: int = 3) -> str:
    """``003-keep_ratio=0.25-seed=1``: the index, then the swept keys this point sets, in its grid's order."""
    names = short_names(swept)
    parts = [f"{index:0{width}d}"]
    for key, value in values.items():
        if key in names:
            text = ",".join(override_text(v) for v in value) if isinstance(value, list) else override_text(value)
            parts.append(f"{names[key]}={re.sub(r'[^A-Za-z0-9._,+-]', '_', text)}")
    return "-".join(parts)


def index_ranges(indices: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``0-2,5,7-8`` (the form of ``sbatch --array``)."""
    out, start = [], None
    for i, n in enumerate(indices):
        if start is None:
            start = n
        if i + 1 == len(indices) or indices[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(out)


# ----------------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------------

def _overrides(values: dict[str, Any]) -> list[str]:
    return [f"{k}={override_text(v)}" for k, v in values.items()]


def _check_keys(where: str, mapping: Any, allow_empty: bool) -> dict:
    if not isinstance(mapping, dict) or (not mapping and not allow_empty):
        raise UserError(f"{where}: must be a mapping of dotted config keys, got {mapping!r}")
    for key in mapping:
        if not isinstance(key, str) or not key:
            raise UserError(f"{where}: keys must be dotted config keys, got {key!r}")
        if key == OWN_KEY:
            raise UserError(f"{where}.{key}: set by the sweep (out + the point's name); use out or --out")
    return mapping


def _grids(where: str, raw: Any) -> list[tuple[str, dict[str, list]]]:
    """``grid`` as a list of (its location in the spec, mapping of key -> non-empty list)."""
    if raw is None:
        raise UserError(f"{where}: missing (a mapping of dotted config keys to lists of values)")
    if isinstance(raw, list):
        if not raw:
            raise UserError(f"{where}: an empty list; give at least one mapping")
        located = [(f"{where}[{i}]", g) for i, g in enumerate(raw)]
    else:
        located = [(where, raw)]
    for loc, grid in located:
        _check_keys(loc, grid, allow_empty=False)
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise UserError(f"{loc}.{key}: must be a non-empty list of values, got {values!r}")
            texts = [override_text(v) for v in values]
            for v in texts:
                if texts.count(v) > 1:
                    raise UserError(f"{loc}.{key}: value {v} is listed twice")
    return located


def load_sweep(path: str | os.PathLike, extra: Sequence[str] = (), out: Optional[str] = None) -> Sweep:
    """Read and validate a spec; ``extra`` overrides apply to every point, ``out`` replaces the spec's."""
    p = Path(path)
    spec = read_yaml(p, "sweep spec")
    if not isinstance(spec, dict):
        raise UserError(f"{p}: the top level must be a mapping with the keys {', '.join(SPEC_KEYS)}")
    for key in spec:
        if key not in SPEC_KEYS:
            near = difflib.get_close_matches(str(key), SPEC_KEYS, n=1, cutoff=0.6)
            hint = f" (did you mean '{near[0]}'?)" if near else f" (expected one of {', '.join(SPEC_KEYS)})"
            raise UserError(f"{p}: {key}: unknown sweep key{hint}")
    base = spec.get("base")
    if not isinstance(base, str) or not base:
        raise UserError(f"{p}: base: must be the path of a config file, got {base!r}")
    out_dir = out if out is not None else spec.get("out", f"runs/sweeps/{p.stem}")
    if not isinstance(out_dir, str) or not out_dir:
        raise UserError(f"{p}: out: must be a directory path, got {out_dir!r}")
    fixed = _check_keys(f"{p}: fixed", spec.get("fixed") or {}, allow_empty=True)
    grids = _grids(f"{p}: grid", spec.get("grid"))

    located = [(loc, values) for loc, grid in grids for values in grid_points(grid)]
    grid_keys = {k for _, values in located for k in values}
    for loc, grid in grids:
        for key in grid:
            if key in fixed:
                raise UserError(f"{loc}.{key}: also set in fixed; keep it in one of them")
    for item in extra:
        key = item.split("=", 1)[0].strip()
        if key == OWN_KEY:
            raise UserError(f"{OWN_KEY}: set by the sweep (out + the point's name); use --out to move the runs")
        if key in grid_keys:
            raise UserError(f"{key}: swept by {p}; it cannot also be overridden on the command line")

    # Resolve the base, then the fixed and command-line overrides, then every point, so that an error
    # says which part of the spec it comes from.
    for where, overrides in ((f"{p}: base", []), (f"{p}: fixed", _overrides(fixed))):
        try:
            load_config(base, overrides)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    common = [*_overrides(fixed), *extra]
    load_config(base, common)

    sweep = Sweep(path=p, base=base, out=out_dir, fixed=fixed, extra=list(extra))
    swept = swept_keys([values for _, values in located])
    width = max(3, len(str(len(located) - 1)))
    seen: dict[tuple, int] = {}
    for index, (loc, values) in enumerate(located):
        try:
            load_config(base, [*common, *_overrides(values)])
        except UserError as exc:
            raise UserError(f"{loc}: {exc}") from None
        signature = tuple(sorted(_overrides(values)))
        if signature in seen:
            raise UserError(f"{loc}: point {index} repeats point {seen[signature]} ({' '.join(signature)})")
        seen[signature] = index
        run_dir = f"{out_dir.rstrip('/')}/{point_name(index, values, swept, width)}"
        sweep.points.append(Point(index, values, run_dir, [*common, *_overrides(values), f"{OWN_KEY}={run_dir}"]))
    return sweep


# ----------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------

def is_done(point: Point) -> bool:
    return (Path(point.run_dir) / "summary.json").is_file()


def _point(sweep: Sweep, index: int) -> Point:
    if not 0 <= index < len(sweep.points):
        raise UserError(f"--index {index} is out of range: {sweep.path} has points 0-{len(sweep.points) - 1}")
    return sweep.points[index]


def _launch_command(sweep: Sweep, point: Point, nproc: int) -> list[str]:
    args = sweep.train_args(point)
    if nproc == 1:
        return [sys.executable, "-m", "fedpft_dist", *args]
    home = Path(os.environ.get("FEDPFT_HOME") or Path(__file__).resolve().parents[2])
    launcher = home / "launcher" / "torchrun.sh"
    if not launcher.is_file():
        raise UserError(f"{launcher} not found: run from a fedpft-dist checkout or set FEDPFT_HOME")
    return [str(launcher), str(nproc), *args]


def _run_point(sweep: Sweep, point: Point, nproc: int) -> int:
    if is_done(point):
        print(f"point {point.index}: done ({point.run_dir}/summary.json), skipped", flush=True)
        return 0
    cmd = _launch_command(sweep, point, nproc)
    print(f"point {point.index} of 0-{len(sweep.points) - 1}: {shlex.join(cmd)}", flush=True)
    # The launcher picks its interpreter from FEDPFT_PYTHON: make it this one.
    env = dict(os.environ, FEDPFT_PYTHON=os.environ.get("FEDPFT_PYTHON", sys.executable))
    return subprocess.run(cmd, env=env).returncode


def list_points(sweep: Sweep) -> str:
    """The table of ``fedpft sweep SPEC --list``."""
    lines = [f"{sweep.path}: {len(sweep.points)} points of {sweep.base}, runs in {sweep.out}"]
    common = [*_overrides(sweep.fixed), *sweep.extra]
    if common:
        lines.append(f"every point: {' '.join(common)}")
    width = max(len(pt.run_dir) for pt in sweep.points)
    lines.append(f"{'index':>5}  {'status':<7}  {'run dir':<{width}}  overrides")
    for pt in sweep.points:
        status = "done" if is_done(pt) else "pending"
        lines.append(f"{pt.index:>5}  {status:<7}  {pt.run_dir:<{width}}  {' '.join(_overrides(pt.values))}")
    pending = [pt.index for pt in sweep.points if not is_done(pt)]
    lines.append(f"pending: {index_ranges(pending)}" if pending else "all points are done")
    return "\n".join(lines)


def run_sweep(spec: str, *, index: Optional[int] = None, list_only: bool = False, print_only: bool = False,
              run_all: bool = False, nproc: int = 1, out: Optional[str] = None, extra: Sequence[str] = ()) -> int:
    """List the points, print one point's ``fedpft`` arguments, or train one point or all of them."""
    if print_only and index is None:
        raise UserError("--print needs --index N")
    if sum([list_only, run_all, index is not None]) != 1:
        raise UserError("fedpft sweep needs one of --list, --all or --index N")
    if nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {nproc}")
    sweep = load_sweep(spec, extra, out)
    if list_only:
        print(list_points(sweep))
        return 0
    if print_only:
        print(shlex.join(sweep.train_args(_point(sweep, index))))
        return 0
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        raise UserError("fedpft sweep starts the runs itself: start it as one process, not under a launcher")
    if index is not None:
        return _run_point(sweep, _point(sweep, index), nproc)
    for point in sweep.points:
        rc = _run_point(sweep, point, nproc)
        if rc != 0:
            sys.stderr.write(f"fedpft: error: point {point.index} ({point.run_dir}) failed with exit code {rc}; "
                             f"rerun the sweep to continue (finished points are skipped)\n")
            return rc
    return run_report([sweep.out])

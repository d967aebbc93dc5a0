"""``fedpft config``: every config key with its type, default, range and help, from the fields of
:mod:`fedpft_dist.config`.

With ``--config FILE`` or overrides it also shows the resolved value of every key (and marks the ones
that differ from their default); ``--markdown`` prints the reference page docs/config.md, which is
this output kept in the repository (a test fails when it is stale).
"""
from __future__ import annotations

import dataclasses
import json
import textwrap
import types
import typing
from typing import Any, Literal, Optional, Sequence, Union

from ..config import Config, ConfigKey, config_keys, config_to_dict
from ..errors import UserError

REGENERATE = ".venv/bin/python -m fedpft_dist config --markdown > docs/config.md"
ARTIFACT_NAMES = {"proxy": "proxy", "proxy_activation": "proxy (activation saliency)",
                  "emulator": "emulator", "distill": "distilled model"}


def type_name(tp: Any) -> str:
    """``int``, ``list[float]``, ``'auto' | 'nccl' | 'gloo'``: a field's type as a config file writes it."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def value_text(value: Any) -> str:
    """A value as YAML reads it back (JSON is valid YAML): ``0.0006``, ``"runs/default"``, ``[0, -1]``."""
    return json.dumps(value)


def range_text(bounds: dict[str, float]) -> str:
    """``[0, 1)``, ``> 0``, or '' for an unbounded key."""
    lower = [(b, v) for b, v in bounds.items() if b in ("ge", "gt")]
    upper = [(b, v) for b, v in bounds.items() if b in ("le", "lt")]
    if lower and upper:
        (lb, lv), (ub, uv) = lower[0], upper[0]
        return f"{'[' if lb == 'ge' else '('}{lv:g}, {uv:g}{']' if ub == 'le' else ')'}"
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return ", ".join(f"{signs[b]} {v:g}" for b, v in bounds.items())


def shapes_text(key: ConfigKey) -> str:
    """The artifacts a change of ``key`` makes stale: what must be rebuilt (or run.rebuild=true)."""
    parts = [ARTIFACT_NAMES[a] for a in key.shapes]
    if key.run:
        parts.append("run checkpoints")
    return ", ".join(parts)


def _sections() -> list[tuple[str, str]]:
    """(name, description) of every section of :class:`Config`, in order."""
    hints = typing.get_type_hints(Config)
    return [(f.name, (hints[f.name].__doc__ or "").strip()) for f in dataclasses.fields(Config)]


def _resolved(cfg: Config) -> dict[str, Any]:
    tree = config_to_dict(cfg)
    return {f"{s}.{k}": v for s, keys in tree.items() for k, v in keys.items()}


def format_keys(cfg: Optional[Config] = None, width: int = 100) -> str:
    """The terminal listing: one block per key; with ``cfg``, its value there (``*`` where it is not
    the default)."""
    values = _resolved(cfg) if cfg is not None else {}
    keys = config_keys()
    lines: list[str] = []
    for section, about in _sections():
        lines += ["", f"[{section}]  {about}"]
        for k in (k for k in keys if k.section == section):
            head = f"{k.key}  ({type_name(k.type)}"
            head += f", {range_text(k.bounds)})" if k.bounds else ")"
            if cfg is None:
                head += f"  default {value_text(k.default)}"
            else:
                changed = values[k.key] != k.default
                head += f"  = {value_text(values[k.key])}"
                head += f"  * default {value_text(k.default)}" if changed else ""
            lines.append(head)
            lines += textwrap.wrap(k.help, width, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines[1:])


def _cell(text: str) -> str:
    """``text`` in a Markdown table cell: a ``|`` would end the cell, and outside code spans ``<dir>``
    would be read as an HTML tag and ``*`` as emphasis."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace("*", "\\*")
    return "`".join(parts).replace("|", "\\|")


def config_markdown() -> str:
    """docs/config.md: the reference of every key, generated from the config's fields."""
    out = [
        "# Config reference",
        "",
        f"<!-- Generated from the fields of fedpft_dist/config.py by `{REGENERATE}`; edit the fields, "
        "not this page. -->",
        "",
        "Every setting of fedpft-dist, by section. A config file (YAML) sets some of them; it may start "
        "from another file with `extends: <path relative to the file>` (that file is read first, then the "
        "file's keys replace its keys one by one; the base may extend another), and `dotted.key=value` "
        "overrides on the command line come last. A key set nowhere keeps its default. "
        "`fedpft config` prints this list; `fedpft config --config FILE [KEY=VALUE ...]` shows a config's "
        "resolved values.",
        "",
        "*Stale when changed*: the reused artifacts a change of the key makes stale (they are rebuilt only "
        "with `run.rebuild=true`; otherwise the run stops naming the key): the proxy, the FedOT emulator, "
        "the distilled model, and the round checkpoints of a federated run (`fed.resume`).",
    ]
    keys = config_keys()
    for section, about in _sections():
        out += ["", f"## {section}", "", about, "",
                "| key | type | default | range | stale when changed | help |", "|---|---|---|---|---|---|"]
        for k in (k for k in keys if k.section == section):
            cells = [f"`{k.key}`", f"`{type_name(k.type)}`", f"`{value_text(k.default)}`", range_text(k.bounds),
                     shapes_text(k), k.help]
            out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(out) + "\n"


def run_config(cfg: Config, config_file: Optional[str], overrides: Sequence[str], markdown: bool) -> int:
    """Print every key (``markdown``: the reference page); with a config file or overrides, their values."""
    given = config_file is not None or bool(overrides)
    if markdown and given:
        raise UserError("--markdown prints the reference of every key and its default: leave out --config "
                        "and the overrides")
    if markdown:
        print(config_markdown(), end="")
    else:
        print(format_keys(cfg if given else None))
    return 0

"""What differs between the transformers versions we run on (pinned here; the GPU image's older one).

Supported: transformers 5.17 to 5.24. Each difference is guarded here, by feature, not by version
number, so that a version in between works too.
"""
from __future__ import annotations

import torch.nn as nn


def activation_checkpointing(model: nn.Module, on: bool) -> None:
    """Per-layer, non-reentrant activation checkpointing on (or off). transformers 5.24 names it
    ``activation_checkpointing_enable`` and deprecates ``gradient_checkpointing_enable``, which is all
    5.17 has."""
    if on:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def quiet_transformers() -> None:
    """No per-load weight reports or progress bars from transformers."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


# The versions our code runs with: (lowest, highest) tested, by distribution name. The lowest are the
# GPU image's, the highest the pinned ones (requirements/); requirements/supported.txt says which
# were run where.
SUPPORTED = {"torch": ("2.11", "2.13"), "transformers": ("5.17", "5.24"), "peft": ("0.21", "0.21"),
             "accelerate": ("1.15", "1.15"), "deepspeed": ("0.19.8", "0.19.8"), "triton": ("3.6", "3.7")}


def _release(version: str) -> tuple[int, ...]:
    out = []
    for part in version.split("+")[0].split("."):
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def version_report() -> dict[str, dict]:
    """Each supported distribution: its installed version (None if missing), the supported range and
    whether the version falls inside it (compared on as many release numbers as the bound gives)."""
    import importlib.metadata as md

    out = {}
    for name, (low, high) in SUPPORTED.items():
        try:
            v = md.version(name)
        except md.PackageNotFoundError:
            out[name] = {"version": None, "supported": f"{low} to {high}", "inside": None}
            continue
        r = _release(v)
        lo, hi = _release(low), _release(high)
        out[name] = {"version": v, "supported": f"{low} to {high}", "inside": lo <= r[:len(lo)] and r[:len(hi)] <= hi}
    return out

"""Which implementation of the neuron-importance kernels runs here: Triton or the PyTorch reference.

The choice is made once per process: Triton when it imports and has an active GPU driver (or when
``TRITON_INTERPRET=1`` asks for its CPU interpreter, which tests use), otherwise the reference.
``FEDPFT_KERNELS=triton|reference`` overrides it; tests may also call :func:`set_backend`.
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Optional

_override: Optional[str] = None


@lru_cache(maxsize=1)
def triton_status() -> dict:
    """Facts about Triton here: version, interpreter mode, active driver and target (or why not)."""
    info: dict = {"installed": False, "version": None, "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
                  "driver": None, "target": None, "error": None}
    try:
        import triton
    except Exception as exc:  # ImportError, or a broken install
        info["error"] = f"{exc.__class__.__name__}: {exc}"
        return info
    info["installed"] = True
    info["version"] = triton.__version__
    try:
        from triton.runtime import driver

        target = driver.active.get_current_target()
        info["driver"] = getattr(target, "backend", None)
        info["target"] = str(getattr(target, "arch", target))
    except Exception as exc:  # "0 active drivers" on a machine without a GPU
        info["error"] = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    return info


def select_backend() -> str:
    """'triton' or 'reference', decided once (see module docstring)."""
    if _override is not None:
        return _override
    forced = os.environ.get("FEDPFT_KERNELS", "").strip().lower()
    if forced:
        if forced not in ("triton", "reference"):
            raise ValueError(f"FEDPFT_KERNELS must be 'triton' or 'reference', got {forced!r}")
        return forced
    status = triton_status()
    if status["installed"] and (status["driver"] is not None or status["interpreter"]):
        return "triton"
    return "reference"


def set_backend(name: Optional[str]) -> None:
    """Force 'triton' or 'reference' (tests); None returns to automatic selection."""
    global _override
    if name not in (None, "triton", "reference"):
        raise ValueError(f"backend must be 'triton', 'reference' or None, got {name!r}")
    _override = name

"""Which implementation of the neuron-importance kernels runs: Triton or the PyTorch reference.

Automatic choice: Triton only when it imports, a GPU driver is active and the tensors are on CUDA;
otherwise the reference. The Triton CPU interpreter is never chosen automatically (it is many times
slower than torch on CPU); it runs only when asked for, by ``FEDPFT_KERNELS=triton`` or
``set_backend("triton")``, with ``TRITON_INTERPRET=1`` set before triton is first imported, which is
what the tests do. ``FEDPFT_KERNELS=reference`` forces the reference.

The machine-level decision is made once per process and cached; :func:`set_backend` overrides it,
and ``set_backend(None)`` returns to the automatic choice (re-reading ``FEDPFT_KERNELS``).
The Triton module is imported on first use, so this package imports on machines without Triton.
"""
from __future__ import annotations

import importlib
import os
from functools import lru_cache
from types import ModuleType
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import reference

BACKENDS = ("triton", "reference")
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


@lru_cache(maxsize=1)
def _env_choice() -> Optional[str]:
    """The backend forced by FEDPFT_KERNELS, or None; cached until set_backend(None)."""
    forced = os.environ.get("FEDPFT_KERNELS", "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"FEDPFT_KERNELS must be 'triton' or 'reference', got {forced!r}")
    return forced or None


@lru_cache(maxsize=1)
def _machine_choice() -> str:
    """The automatic backend for this machine: 'triton' only with an active GPU driver."""
    status = triton_status()
    # The interpreter flag excludes a GPU machine where TRITON_INTERPRET=1 happens to be exported:
    # kernels decorated there would run interpreted, far slower than the reference.
    gpu_triton = status["installed"] and status["driver"] is not None and not status["interpreter"]
    return "triton" if gpu_triton else "reference"


def select_backend(device: Union[str, torch.device, None] = None) -> str:
    """'triton' or 'reference'. Without ``device``: the choice for this machine. With a device (or
    its type string): the choice for tensors there, i.e. automatic Triton only for CUDA tensors."""
    if _override is not None:
        return _override
    forced = _env_choice()
    if forced is not None:
        return forced
    if device is not None and getattr(device, "type", str(device).split(":")[0]) != "cuda":
        return "reference"  # decided without importing triton: CPU runs never pay for it
    return _machine_choice()


def set_backend(name: Optional[str]) -> None:
    """Force 'triton' or 'reference' (tests); None returns to the automatic choice."""
    global _override
    if name not in (None, *BACKENDS):
        raise ValueError(f"backend must be 'triton', 'reference' or None, got {name!r}")
    _override = name
    if name is None:
        _env_choice.cache_clear()


def implementation(device: Union[str, torch.device, None] = None) -> ModuleType:
    """The module (``reference`` or ``triton_kernels``) that runs for tensors on ``device``."""
    if select_backend(device) == "triton":
        return importlib.import_module(".triton_kernels", __package__)
    return reference


def weight_saliency(rows: Sequence[Tensor], cols: Sequence[Tensor]) -> Tensor:
    """Per-neuron L2 norm over row ``j`` of each matrix in ``rows`` (``[d_ff, *]``: ``W_in`` or
    ``W_gate``/``W_up``) and column ``j`` of each matrix in ``cols`` (``[*, d_ff]``: ``W_out``);
    float32 ``[d_ff]`` accumulated in fp32, with no concatenation materialised."""
    mats = [*rows, *cols]
    return implementation(mats[0].device if mats else None).weight_saliency(list(rows), list(cols))


def activation_stats_update(act: Tensor, mask: Optional[Tensor], eps: float, sum_abs: Tensor,
                            zero_count: Tensor, token_count: Tensor) -> None:
    """In place: ``sum_abs += sum |a|``, ``zero_count += #(|a| <= eps)`` per neuron and
    ``token_count += #tokens``, over the tokens of ``act`` ``[..., n]`` where ``mask`` (broadcastable
    to ``act.shape[:-1]``, non-zero = real token; None = all) is set."""
    implementation(act.device).activation_stats_update(act, mask, eps, sum_abs, zero_count, token_count)

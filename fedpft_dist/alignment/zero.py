"""DeepSpeed ZeRO integration: the only module of fedpft-dist that imports ``deepspeed``."""
from __future__ import annotations

import os

from ..environment import prepare_library_env


def deepspeed_status() -> dict:
    """Version, accelerator, communication backend and which C++/CUDA ops are pre-built.

    Ops that are not pre-built compile on first use (JIT), which costs time at the first run of a
    job; ``DS_BUILD_OPS=1`` at install time builds them ahead.
    """
    prepare_library_env()
    info: dict = {"installed": False, "version": None, "accelerator": None, "comm_backend": None,
                  "ds_accelerator_env": os.environ.get("DS_ACCELERATOR"), "prebuilt_ops": [],
                  "jit_ops": [], "error": None}
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops
    except Exception as exc:
        info["error"] = f"{exc.__class__.__name__}: {exc}"
        return info
    info["installed"] = True
    info["version"] = deepspeed.__version__
    acc = get_accelerator()
    info["accelerator"] = acc.device_name()
    info["comm_backend"] = acc.communication_backend_name()
    info["prebuilt_ops"] = sorted(k for k, v in installed_ops.items() if v)
    info["jit_ops"] = sorted(k for k, v in installed_ops.items() if not v)
    return info

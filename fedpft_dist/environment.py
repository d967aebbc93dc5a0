"""Process-wide settings for the libraries we drive. ``fedpft`` applies them once, in ``cli.main``,
before any of those libraries is imported; a program that uses fedpft_dist as a library calls
:func:`prepare_process` itself."""
from __future__ import annotations

import os
import warnings


def prepare_process() -> None:
    """Offline Hugging Face; DeepSpeed's CPU accelerator where there is no CUDA (transformers and peft
    import DeepSpeed when it is installed, and without this it guesses and warns); and silence for
    two deprecations that are known to be harmless."""
    # peft 0.21 calls a transformers property that transformers 5.24 has renamed.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # DeepSpeed 0.19 calls collectives that torch 2.13 has renamed; the old names still work.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def return_freed_memory() -> None:
    """Hand memory that Python and torch have freed back to the operating system.

    glibc keeps freed heap pages of large, short-lived phases (a distillation's teacher and optimizer,
    the activations of a backward pass) mapped in the process, so the resident set of a long run only
    grows; ``malloc_trim`` releases them. A no-op where the C library is not glibc."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)

"""Process-wide settings for the libraries we drive, applied before they are imported."""
from __future__ import annotations

import os
import warnings


def prepare_library_env() -> None:
    """Offline Hugging Face, and DeepSpeed's CPU accelerator where there is no CUDA (transformers
    and peft import DeepSpeed when it is installed; without this it guesses and warns)."""
    # peft 0.21 calls a transformers property that transformers 5.24 has renamed; harmless.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"

"""Text that the federation uses besides the clients' private data.

:mod:`fedpft_dist.data.public` loads public unlabelled text (the built-in Jane Austen corpus or a
local file) for calibration and distillation, and cuts it into token chunks.
"""
from fedpft_dist.data.public import load_public_text, shard, split_held_out, token_chunks

__all__ = ["load_public_text", "shard", "split_held_out", "token_chunks"]

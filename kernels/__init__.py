"""Neuron-importance kernels (Triton) with their PyTorch references; installed as ``fedpft_kernels``.

Triton is imported only inside this package.
"""
from .backend import select_backend, set_backend, triton_status

__all__ = ["select_backend", "set_backend", "triton_status"]

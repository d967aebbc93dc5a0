"""Neuron-importance kernels (Triton) with their PyTorch references; installed as ``fedpft_kernels``.

``weight_saliency`` and ``activation_stats_update`` dispatch to the Triton kernels for CUDA tensors
on a machine where Triton has a GPU driver, and to the PyTorch reference otherwise (see
:mod:`fedpft_kernels.backend`). Triton is imported only inside this package, and only when used.
"""
from .backend import activation_stats_update, select_backend, set_backend, triton_status, weight_saliency
from .reference import ActivationStats

__all__ = ["ActivationStats", "activation_stats_update", "select_backend", "set_backend", "triton_status",
           "weight_saliency"]

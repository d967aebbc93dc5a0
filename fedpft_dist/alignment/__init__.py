"""Distillation of the proxy against the foundation model (layer-level and neuron-level).

``deepspeed`` is imported only in :mod:`fedpft_dist.alignment.zero`.
"""

"""Distillation of the proxy against the foundation model (layer-level and neuron-level), and the
pipeline stages around it (:mod:`.stages`): the proxy built once, Stage 2, alignment rounds.

``deepspeed`` is imported only in :mod:`fedpft_dist.alignment.zero`.
"""

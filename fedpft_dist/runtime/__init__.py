"""Distributed runtime: launch detection, process group, the communicator.

This package is the only place in fedpft-dist that calls ``torch.distributed``.
"""
from .comm import Communicator, current_phase, peer_failure, phase
from .dist import ONCE, ClientGroups, Runtime, backends_available, cpu_budget, free_port, init_from_config, init_runtime, spawn_local
from .launch import LaunchInfo, detect_launch, expand_nodelist, expand_tasks_per_node, slurm_port

__all__ = ["ONCE", "ClientGroups", "Communicator", "current_phase", "peer_failure", "phase", "Runtime", "backends_available", "LaunchInfo", "init_runtime", "init_from_config", "spawn_local",
           "detect_launch", "expand_nodelist", "expand_tasks_per_node", "slurm_port", "cpu_budget",
           "free_port"]

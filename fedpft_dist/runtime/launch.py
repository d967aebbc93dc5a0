"""How was this process started? Pure functions of the environment, so they test without a cluster.

Order of precedence (the first that matches wins):

1. ``torchrun`` (or any launcher that exports RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT);
2. a Slurm job step started by ``srun`` (SLURM_PROCID, SLURM_STEP_ID, ...);
3. an MPI job (Open MPI, MPICH/Hydra or Intel MPI variables); the master address and port are
   agreed on later through mpi4py, see :mod:`fedpft_dist.runtime.dist`;
4. a single process.

torchrun inside an sbatch allocation sets RANK itself, so it wins over the Slurm variables it inherits.
The batch step of an sbatch script (not started by srun) has SLURM_PROCID and SLURM_NTASKS but no
SLURM_STEP_ID: it is treated as a single process rather than as rank 0 of a job that never starts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional

from ..errors import UserError

# Ports derived from the Slurm job id fall in [SLURM_PORT_BASE, SLURM_PORT_BASE + SLURM_PORT_SPAN).
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 20000

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "GROUP_RANK")
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
              "SLURM_LOCALID", "SLURM_NODEID", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST",
              "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_CPUS_PER_TASK",
              "SLURM_CPUS_ON_NODE", "SLURM_GPUS_ON_NODE", "SLURM_JOB_PARTITION")
MPI_VARS = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
            "OMPI_COMM_WORLD_LOCAL_SIZE", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS",
            "PMI_LOCAL_RANK", "PMI_LOCAL_SIZE")


@dataclass(frozen=True)
class LaunchInfo:
    """Where this rank sits in the job. ``master_addr``/``master_port`` are None for MPI until the
    rendezvous through mpi4py fills them in."""

    kind: str  # "torchrun" | "slurm" | "mpi" | "single"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: Optional[str]
    master_port: Optional[int]
    node_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(env: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise UserError(f"environment variable {name} is required for this launch but not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name} must be an integer, got {raw!r}") from None


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list: ``node[01-03,07],gpu-a[1-2]`` → ``node01 ... gpu-a2``.

    Zero padding of a range is kept (``[08-10]`` → 08, 09, 10); several bracket groups in one name
    (``rack[1-2]-n[1-2]``) expand to their product, in Slurm's order.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        if item:
            hosts.extend(_expand_host(item))
    return hosts


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise UserError(f"malformed Slurm nodelist {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise UserError(f"malformed Slurm nodelist {text!r}")
    parts.append(text[start:])
    return parts


def _expand_host(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if m is None:
        return [item]
    head, tail = item[: m.start()], item[m.end():]
    out = []
    for rng in m.group(1).split(","):
        rng = rng.strip()
        if "-" in rng:
            lo, hi = rng.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise UserError(f"malformed range {rng!r} in Slurm nodelist {item!r}")
            width = len(lo)
            values = [str(v).zfill(width) for v in range(int(lo), int(hi) + 1)]
        else:
            if not rng.isdigit():
                raise UserError(f"malformed index {rng!r} in Slurm nodelist {item!r}")
            values = [rng]
        for v in values:
            out.extend(_expand_host(f"{head}{v}{tail}"))
    return out


def expand_tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM_TASKS_PER_NODE syntax: ``2(x3),1`` → [2, 2, 2, 1]."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if m is None:
            raise UserError(f"malformed Slurm tasks-per-node value {spec!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def slurm_port(job_id: int) -> int:
    """A port every task of a job derives alike from the job id, spread so that jobs sharing a
    head node rarely collide."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def detect_launch(env: Mapping[str, str]) -> LaunchInfo:
    """Work out rank, world size and rendezvous point from the environment (see module docstring)."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return _from_torchrun(env)
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and "SLURM_JOB_ID" in env:
        return _from_slurm(env)
    mpi = _from_mpi(env)
    if mpi is not None:
        return mpi
    return LaunchInfo("single", 0, 1, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"),
                      _int(env, "MASTER_PORT", 0) or None)


def _check_rank(kind: str, rank: int, world: int, local_rank: int, local_world: int) -> None:
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"{kind} launch: rank {rank} is outside world size {world}")
    if local_world < 1 or not 0 <= local_rank < local_world:
        raise UserError(f"{kind} launch: local rank {local_rank} is outside local world size {local_world}")


def _from_torchrun(env: Mapping[str, str]) -> LaunchInfo:
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    local_rank = _int(env, "LOCAL_RANK", 0)
    local_world = _int(env, "LOCAL_WORLD_SIZE", world if "LOCAL_RANK" not in env else local_rank + 1)
    _check_rank("torchrun", rank, world, local_rank, local_world)
    if world > 1 and ("MASTER_ADDR" not in env or "MASTER_PORT" not in env):
        raise UserError("RANK and WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not")
    return LaunchInfo("torchrun", rank, world, local_rank, local_world, env.get("MASTER_ADDR", "127.0.0.1"),
                      _int(env, "MASTER_PORT", 0) or None, node_rank=_int(env, "GROUP_RANK", 0))


def _from_slurm(env: Mapping[str, str]) -> LaunchInfo:
    rank = _int(env, "SLURM_PROCID")
    world = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1))
    local_rank = _int(env, "SLURM_LOCALID", 0)
    node_id = _int(env, "SLURM_NODEID", 0)
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if spec:
        per_node = expand_tasks_per_node(spec)
        local_world = per_node[node_id] if node_id < len(per_node) else per_node[-1]
    else:
        local_world = world
    _check_rank("Slurm", rank, world, local_rank, local_world)
    if env.get("MASTER_ADDR"):
        addr = env["MASTER_ADDR"]
    else:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise UserError("Slurm launch: SLURM_JOB_NODELIST is not set, cannot find the head node")
        hosts = expand_nodelist(nodelist)
        if not hosts:
            raise UserError(f"Slurm launch: empty nodelist {nodelist!r}")
        addr = hosts[0]
    port = _int(env, "MASTER_PORT", 0) or slurm_port(_int(env, "SLURM_JOB_ID"))
    return LaunchInfo("slurm", rank, world, local_rank, local_world, addr, port, node_rank=node_id)


def _from_mpi(env: Mapping[str, str]) -> Optional[LaunchInfo]:
    if "OMPI_COMM_WORLD_RANK" in env:  # Open MPI
        rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0)
        local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", world)
    elif "PMI_RANK" in env and "PMI_SIZE" in env:  # MPICH / Hydra, Intel MPI
        rank, world = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
        local_rank = _int(env, "MPI_LOCALRANKID", _int(env, "PMI_LOCAL_RANK", 0))
        local_world = _int(env, "MPI_LOCALNRANKS", _int(env, "PMI_LOCAL_SIZE", world))
    else:
        return None
    _check_rank("MPI", rank, world, local_rank, local_world)
    return LaunchInfo("mpi", rank, world, local_rank, local_world, None, None)

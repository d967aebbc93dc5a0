"""Process-group set-up: one call turns the launch environment into a ready :class:`Runtime`."""
from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
import torch.distributed as dist

from ..config import Config, DistConfig, RunConfig
from ..errors import CollectiveError, UserError
from .comm import WATCHDOG_GRACE_S, Communicator, forget_subgroups, make_subgroups, peer_failure
from .launch import LaunchInfo, detect_launch

log = logging.getLogger(__name__)
# init_runtime's defaults are the config's: one source for every default.
_DIST, _RUN = DistConfig(), RunConfig()


@dataclass(frozen=True)
class ClientGroups:
    """The world's ranks in blocks of ``size`` consecutive ranks; each block trains one client at a
    time, its batch split over the block's ranks. ``comm`` is this rank's block; ``leader`` (the
    block's first rank) is the one that contributes the block's client sums to the aggregation."""
    size: int
    count: int
    index: int
    comm: Communicator

    @property
    def leader(self) -> bool:
        return self.comm.rank == 0


@dataclass
class Runtime:
    launch: LaunchInfo
    device: torch.device
    backend: str
    threads: int
    comm: Communicator

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    @property
    def local_rank(self) -> int:
        return self.launch.local_rank

    @property
    def is_main(self) -> bool:
        return self.launch.rank == 0

    def client_groups(self, size: int) -> ClientGroups:
        """Blocks of ``size`` consecutive ranks (``size`` must divide the world size), their process
        groups made once. A collective: every rank calls it with the same size."""
        if size < 1 or self.world_size % size:
            raise UserError(f"dist.ranks_per_client: {size} does not divide the world size {self.world_size} "
                            f"(use a divisor, e.g. 1)")
        blocks = [list(range(start, start + size)) for start in range(0, self.world_size, size)]
        make_subgroups(blocks)
        index = self.rank // size
        return ClientGroups(size, len(blocks), index,
                            self.comm.subgroup(blocks[index], f"client group {index}" if size > 1 else ""))

    def shutdown(self) -> None:
        if dist.is_available() and dist.is_initialized():
            forget_subgroups()
            dist.destroy_process_group()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        # A collective a library called itself failed because a peer is gone: say so as our own
        # collectives do (CollectiveError: one line, exit 3), and leave the broken group as it is
        # (destroying it could wait on the dead peer).
        if isinstance(exc, CollectiveError):
            return
        message = peer_failure(exc) if exc is not None else None
        if message is not None:
            raise CollectiveError(message) from exc
        self.shutdown()


# ----------------------------------------------------------------------------------------------------
# Pieces, each a small pure-ish function
# ----------------------------------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cpu_budget(local_world_size: int, env: Mapping[str, str] = os.environ) -> int:
    """Cores this rank may use: Slurm's --cpus-per-task if given; else the CPUs this process is
    bound to when a launcher bound it (fewer than the node has); else the node's cores divided by
    the ranks on this node."""
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, int(env["SLURM_CPUS_PER_TASK"]))
    node = os.cpu_count() or 1
    try:
        bound = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        bound = node
    if bound < node:
        return max(1, bound)
    return max(1, node // max(1, local_world_size))


def backends_available() -> dict[str, bool]:
    """Which collective back-ends this torch build has (no process group needed)."""
    ok = dist.is_available()
    return {"distributed_available": ok, "gloo": ok and dist.is_gloo_available(),
            "nccl": ok and dist.is_nccl_available()}


def pick_device(local_rank: int) -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available (modulo the visible devices, for one-GPU-per-task
    Slurm binding where every task sees device 0), otherwise the CPU."""
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def pick_backend(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise UserError("dist.backend: 'nccl' needs CUDA devices, none is available (use 'gloo' or 'auto')")
    if requested == "nccl" and not dist.is_nccl_available():
        raise UserError("dist.backend: 'nccl' requested but this torch build has no NCCL")
    return requested


# ``log.warning(..., extra={ONCE: True})``: a warning every rank reaches alike (about input data they all
# read) is printed by rank 0 only.
ONCE = "fedpft_once"


class _RankFilter(logging.Filter):
    def __init__(self, prefix: str, rank: int):
        super().__init__()
        self.prefix, self.rank = prefix, rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank_prefix = self.prefix
        return self.rank == 0 or not getattr(record, ONCE, False)


def setup_logging(rank: int, world_size: int, level: str = "info", all_ranks: bool = False) -> None:
    """Rank-prefixed logging, set once per process. Ranks other than 0 log warnings and errors only,
    unless ``all_ranks``."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_fedpft", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._fedpft = True  # type: ignore[attr-defined]
    handler.addFilter(_RankFilter(f"[rank {rank}/{world_size}]" if world_size > 1 else "", rank))
    handler.setFormatter(logging.Formatter("%(asctime)s %(rank_prefix)s %(levelname)s %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    root.addHandler(handler)
    lvl = getattr(logging, level.upper())
    root.setLevel(lvl if (rank == 0 or all_ranks) else max(lvl, logging.WARNING))


def _mpi_rendezvous(launch: LaunchInfo, env: Mapping[str, str]) -> tuple[str, int]:
    """MPI launches carry no rendezvous point: rank 0 picks a free port and shares it (and an address
    every rank can reach) through mpi4py. MASTER_ADDR/MASTER_PORT from the environment win."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise UserError("launched under MPI but mpi4py is not installed (pip install mpi4py mpich)") from None
    world = MPI.COMM_WORLD
    if world.Get_size() != launch.world_size or world.Get_rank() != launch.rank:
        raise UserError(f"MPI reports rank {world.Get_rank()}/{world.Get_size()} but the environment says "
                        f"{launch.rank}/{launch.world_size}")
    hosts = world.allgather(socket.gethostname())
    choice = None
    if launch.rank == 0:
        addr = env.get("MASTER_ADDR") or ("127.0.0.1" if len(set(hosts)) == 1 else hosts[0])
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else free_port("" if addr != "127.0.0.1" else addr)
        choice = (addr, port)
    addr, port = world.bcast(choice, root=0)
    return addr, port


# ----------------------------------------------------------------------------------------------------
# The one entry point
# ----------------------------------------------------------------------------------------------------

def init_runtime(backend: str = _DIST.backend, timeout_s: float = _DIST.timeout_s,
                 threads_per_rank: int = _DIST.threads_per_rank, log_level: str = _RUN.log_level,
                 log_all_ranks: bool = _DIST.log_all_ranks, env: Optional[Mapping[str, str]] = None) -> Runtime:
    """Detect the launch, choose device/backend/threads, set up logging and the process group. The
    defaults are those of the config's ``dist`` section and ``run.log_level``.

    A process group is created for every launch, a single process included (a 1-rank gloo/NCCL group
    on a free local port), so DeepSpeed and the collectives take one code path at every world size.
    """
    env = dict(os.environ if env is None else env)
    launch = detect_launch(env)
    setup_logging(launch.rank, launch.world_size, log_level, log_all_ranks)

    addr, port = launch.master_addr, launch.master_port
    if launch.kind == "mpi":
        addr, port = _mpi_rendezvous(launch, env)
    if launch.kind == "single":
        addr = "127.0.0.1"
        port = port or free_port(addr)
    launch = LaunchInfo(launch.kind, launch.rank, launch.world_size, launch.local_rank,
                        launch.local_world_size, addr, port, launch.node_rank)

    device = pick_device(launch.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    chosen = pick_backend(backend, device)
    threads = threads_per_rank or cpu_budget(launch.local_world_size, env)
    torch.set_num_threads(threads)

    # The process group (env://, which also joins torchrun's agent store) and DeepSpeed read these:
    # set them consistently for every launch kind.
    os.environ.update({"RANK": str(launch.rank), "WORLD_SIZE": str(launch.world_size),
                       "LOCAL_RANK": str(launch.local_rank), "LOCAL_WORLD_SIZE": str(launch.local_world_size),
                       "MASTER_ADDR": str(addr), "MASTER_PORT": str(port)})
    if chosen == "nccl":
        # Let NCCL's own watchdog abort a timed-out collective instead of hanging the process.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")

    if not dist.is_initialized():
        kwargs = {}
        if chosen == "nccl":
            kwargs["device_id"] = device
        # On NCCL our collectives wait for completion on the device themselves, bounded by
        # timeout_s (Communicator); NCCL's own timeout, which aborts the process, comes later so that
        # ours is the one that names the collective. The libraries' collectives have NCCL's.
        group_timeout = timeout_s + (WATCHDOG_GRACE_S if chosen == "nccl" else 0.0)
        try:
            dist.init_process_group(backend=chosen, init_method="env://",
                                    rank=launch.rank, world_size=launch.world_size,
                                    timeout=datetime.timedelta(seconds=group_timeout), **kwargs)
        except (RuntimeError, dist.DistError) as exc:
            raise CollectiveError(f"collective 'init_process_group' failed on rank {launch.rank}/"
                                  f"{launch.world_size} ({addr}:{port}, timeout {timeout_s:g} s): "
                                  f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc}") from exc
    comm = Communicator(launch.rank, launch.world_size,
                        device if chosen == "nccl" else torch.device("cpu"), timeout_s)
    log.info("runtime: %s launch, world size %d, device %s, backend %s, %d threads per rank",
             launch.kind, launch.world_size, device, chosen, threads)
    return Runtime(launch, device, chosen, threads, comm)


def init_from_config(cfg: Config) -> Runtime:
    """``init_runtime`` with the ``dist`` and ``run`` sections of a :class:`~fedpft_dist.config.Config`."""
    return init_runtime(backend=cfg.dist.backend, timeout_s=cfg.dist.timeout_s,
                        threads_per_rank=cfg.dist.threads_per_rank, log_level=cfg.run.log_level,
                        log_all_ranks=cfg.dist.log_all_ranks)


# ----------------------------------------------------------------------------------------------------
# Local multi-process jobs (doctor's self-test, tests)
# ----------------------------------------------------------------------------------------------------

def _spawn_entry(local_rank: int, nprocs: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update({"RANK": str(local_rank), "WORLD_SIZE": str(nprocs), "LOCAL_RANK": str(local_rank),
                       "LOCAL_WORLD_SIZE": str(nprocs), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    fn(local_rank, *args)


def spawn_local(fn: Callable, nprocs: int, args: tuple = ()) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` fresh processes on this machine with a torchrun-style
    environment; ``fn`` calls :func:`init_runtime` itself. Raises if any process fails."""
    import torch.multiprocessing as mp

    port = free_port()
    mp.start_processes(_spawn_entry, args=(nprocs, port, fn, args), nprocs=nprocs, join=True,
                       start_method="spawn")

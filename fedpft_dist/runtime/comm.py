"""The communicator: every collective the engine uses, behind one small object.

Algorithm code never imports ``torch.distributed``; it calls these methods. Every rank must call
the same methods in the same order with tensors of the same names, shapes and dtypes (a rank with
nothing to contribute passes zeros). Each call is named; a collective that fails or outlives
``dist.timeout_s`` raises :class:`CollectiveError` naming it, and a watchdog ends the process if the
backend itself never returns.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from typing import Iterator, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from ..errors import EXIT_COLLECTIVE_ERROR, CollectiveError

log = logging.getLogger(__name__)

# The backend raises at the timeout; the watchdog only steps in if it does not.
WATCHDOG_GRACE_S = 15.0


def await_completion(done, timeout_s: float, sleep=time.sleep, clock=time.monotonic) -> None:
    """Poll ``done()`` until it is true; raise RuntimeError once ``timeout_s`` has passed.

    NCCL returns from a collective as soon as it is queued on the GPU, so a peer that hangs shows
    only later, in whatever next waits for the device (usually outside any collective). Polling a
    CUDA event recorded after the collective keeps the wait inside the collective's bounds, where
    the timeout names it; sleeping between polls (from 50 us, doubling to 10 ms) leaves the GIL to
    the watchdog and costs at most 10 ms on a long collective."""
    deadline = clock() + timeout_s
    pause = 5e-5
    while not done():
        if clock() > deadline:
            raise RuntimeError(f"not complete on the device after {timeout_s:g} s (the backend had queued it)")
        sleep(pause)
        pause = min(2 * pause, 0.01)


class _Watchdog:
    """Ends the process when one collective has been running for longer than timeout + grace.

    gloo and NCCL (with async error handling) raise at the timeout themselves; this covers the
    cases where they do not (a peer that hangs inside a rendezvous, a wedged transport), so that no
    rank waits forever for one that died.
    """

    def __init__(self, timeout_s: float, rank: int):
        self.limit = timeout_s + WATCHDOG_GRACE_S
        self.timeout_s = timeout_s
        self.rank = rank
        self._current: tuple[str, float] | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def track(self, name: str) -> Iterator[None]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fedpft-collective-watchdog", daemon=True)
            self._thread.start()
        with self._lock:
            self._current = (name, time.monotonic())
        try:
            yield
        finally:
            with self._lock:
                self._current = None

    def _run(self) -> None:
        while True:
            time.sleep(1.0)
            with self._lock:
                current = self._current
            if current is not None and time.monotonic() - current[1] > self.limit:
                sys.stderr.write(
                    f"fedpft: error: collective '{current[0]}' did not finish within "
                    f"{self.timeout_s:g} s during {current_phase()} on rank {self.rank} (a peer rank died or "
                    f"hangs); exiting\n")
                sys.stderr.flush()
                os._exit(EXIT_COLLECTIVE_ERROR)


# Subgroups by their global ranks, made once per process by make_subgroups.
_SUBGROUPS: dict[tuple[int, ...], object] = {}


def make_subgroups(partition: Sequence[Sequence[int]]) -> None:
    """Create a process group for each block of global ranks (blocks of one rank need none). A
    collective itself: every rank calls it with the same partition, and every rank creates every
    group in the same order, as ``new_group`` requires."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for ranks in partition:
        key = tuple(ranks)
        if len(key) > 1 and key not in _SUBGROUPS:
            _SUBGROUPS[key] = dist.new_group(list(key))


def forget_subgroups() -> None:
    """Drop the subgroups of a process group that is being destroyed."""
    _SUBGROUPS.clear()


# The phase of the job this process is in (nested: the innermost last), for the one line a lost peer
# ends the job with.
_PHASES: list[str] = []


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Mark the block as the job's phase ``name`` (local training, alignment, ...)."""
    _PHASES.append(name)
    try:
        yield
    except BaseException as exc:
        if not hasattr(exc, "fedpft_phase"):   # the innermost phase, for the line the job ends with
            exc.fedpft_phase = name
        raise
    finally:
        _PHASES.pop()


def current_phase() -> str:
    return _PHASES[-1] if _PHASES else "start-up"


def _library_collective(tb) -> Optional[tuple[str, str]]:
    """(the torch.distributed collective, the package that called it) of a traceback that ends in
    one, else None."""
    import traceback

    frames = traceback.extract_tb(tb)
    inner = [i for i, f in enumerate(frames) if f.filename.endswith("distributed_c10d.py") and f.name != "wrapper"]
    if not inner:
        return None
    first = min(i for i, f in enumerate(frames) if "/torch/distributed/" in f.filename and i <= inner[-1])
    caller = frames[first - 1].filename if first > 0 else "?"
    package = caller.split("site-packages/", 1)[1].split("/", 1)[0] if "site-packages/" in caller else "fedpft_dist"
    return frames[inner[-1]].name, package


def peer_failure(exc: BaseException) -> Optional[str]:
    """One line for an error that a collective called by a library (DeepSpeed's ZeRO gathers and
    broadcasts, FSDP's) raised because a peer rank died or did not answer within the process group's
    timeout (``dist.timeout_s``): the phase, the collective and its caller, the backend's first line.
    None for any other error, or outside a distributed job."""
    if not dist.is_available() or not isinstance(exc, RuntimeError):
        return None
    found = _library_collective(exc.__traceback__)
    if found is None and not isinstance(exc, getattr(dist, "DistBackendError", ())):
        return None
    what = f"torch.distributed.{found[0]} (called by {found[1]})" if found else "a collective"
    where = getattr(exc, "fedpft_phase", current_phase())
    rank = f" on rank {dist.get_rank()}" if dist.is_initialized() else ""
    return f"{what} failed during {where}{rank} (a peer rank died or hangs): {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


class Communicator:
    """Collectives over the default process group (or a single process, where they are identities),
    or over one subgroup of it (:meth:`subgroup`).

    ``device`` is where buffers live for the backend: a CUDA device for NCCL, the CPU for gloo.
    Results come back on the device of the inputs. ``rank`` and ``world_size`` are this process's
    place in the communicator's group (for the default group: the global ones).
    """

    def __init__(self, rank: int, world_size: int, device: torch.device, timeout_s: float,
                 group: Optional[object] = None, label: str = "", watchdog: Optional[_Watchdog] = None):
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.group = group       # None: the default (world) group
        self.label = label       # prefixed to collective names in errors, e.g. "client group 1"
        self._watchdog = watchdog or _Watchdog(timeout_s, rank)

    def subgroup(self, ranks: Sequence[int], label: str) -> "Communicator":
        """A communicator over the global ``ranks``, which must include this process. The process
        group itself is made by the runtime (every rank creates every subgroup, in the same order);
        this binds one of them. It shares this communicator's watchdog: a process runs one
        collective at a time."""
        ranks = list(ranks)
        me = dist.get_rank() if self.active else self.rank
        if me not in ranks:
            raise ValueError(f"rank {me} is not in the subgroup {ranks}")
        group = _SUBGROUPS.get(tuple(ranks)) if self.active and len(ranks) > 1 else None
        if self.active and len(ranks) > 1 and group is None:
            raise ValueError(f"no process group for ranks {ranks}: create it with make_subgroups first")
        return Communicator(ranks.index(me), len(ranks), self.device, self.timeout_s, group, label, self._watchdog)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when a process group is up; False for a single process without one."""
        return dist.is_available() and dist.is_initialized()

    @property
    def _parallel(self) -> bool:
        return self.active and self.world_size > 1

    @contextlib.contextmanager
    def _collective(self, name: str, wait: bool = True) -> Iterator[None]:
        """Run one collective under the watchdog; on a GPU, unless ``wait`` is False, also wait (at
        most ``dist.timeout_s``) until the device has completed it (:func:`await_completion`). A
        collective inside a training step passes ``wait=False``: the step must not wait for the
        device, and the round's next waited collective, queued behind it, bounds it instead."""
        where = f"{self.label} " if self.label else ""
        with self._watchdog.track(f"{where}{name}"):
            try:
                yield
                if wait and self.device.type == "cuda":
                    event = torch.cuda.Event()
                    event.record(torch.cuda.current_stream(self.device))
                    await_completion(event.query, self.timeout_s)
            except (RuntimeError, dist.DistError) as exc:  # DistBackendError, gloo/NCCL timeouts
                raise CollectiveError(
                    f"collective '{name}' failed during {getattr(exc, 'fedpft_phase', current_phase())} on {where}rank {self.rank}/"
                    f"{self.world_size} (timeout {self.timeout_s:g} s): {_first_line(exc)}") from exc

    # -- sums --------------------------------------------------------------------------------------

    def all_reduce_sum(self, tensors: Mapping[str, torch.Tensor], name: str = "all_reduce_sum"
                       ) -> dict[str, torch.Tensor]:
        """Sum a dict of tensors over ranks. Tensors are flattened into one buffer per dtype and each
        buffer is all-reduced once (a single collective when all share a dtype, as adapters do).
        Keys are visited in sorted order, so ranks agree on the layout."""
        keys = sorted(tensors)
        by_dtype: dict[torch.dtype, list[str]] = {}
        for k in keys:
            t = tensors[k]
            if t.dtype == torch.bool:
                raise TypeError(f"all_reduce_sum: tensor {k!r} is bool; send it as an integer tensor")
            by_dtype.setdefault(t.dtype, []).append(k)
        out: dict[str, torch.Tensor] = {}
        buffers = []
        for dtype in sorted(by_dtype, key=str):
            group = by_dtype[dtype]
            flat = torch.cat([tensors[k].detach().reshape(-1).to(self.device) for k in group]) \
                if group else torch.empty(0, dtype=dtype, device=self.device)
            buffers.append((group, flat))
        if self._parallel:
            with self._collective(name):
                works = [dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True) for _, flat in buffers]
                for w in works:
                    w.wait()
        for group, flat in buffers:
            offset = 0
            for k in group:
                src = tensors[k]
                n = src.numel()
                out[k] = flat[offset: offset + n].view(src.shape).to(src.device)
                offset += n
        return out

    def all_reduce_(self, buffer: torch.Tensor, name: str = "all_reduce", wait: bool = True) -> torch.Tensor:
        """In-place sum of one contiguous buffer on ``self.device``: the bare collective, without
        the packing of :meth:`all_reduce_sum` (benchmarks compare the two). ``wait=False`` inside a
        training step (see :meth:`_collective`)."""
        if self._parallel:
            with self._collective(name, wait=wait):
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)
        return buffer

    def all_reduce_metrics(self, metrics: Mapping[str, float], op: str = "sum",
                           name: str = "all_reduce_metrics") -> dict[str, float]:
        """Reduce scalar metrics (sum, max or min) in float64: one collective for the whole dict."""
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        if op not in ops:
            raise ValueError(f"op must be one of {sorted(ops)}, got {op!r}")
        keys = sorted(metrics)
        if not self._parallel:
            return {k: float(metrics[k]) for k in keys}
        buf = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device)
        with self._collective(name):
            dist.all_reduce(buf, op=ops[op], group=self.group)
        return dict(zip(keys, buf.cpu().tolist()))

    def agree(self, flag: bool, op: str = "min", name: str = "agree") -> bool:
        """Shared decision: ``min`` = true only if true on every rank, ``max`` = true on any rank."""
        if op not in ("min", "max"):
            raise ValueError(f"op must be 'min' or 'max', got {op!r}")
        if not self._parallel:
            return bool(flag)
        buf = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        with self._collective(name):
            dist.all_reduce(buf, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX, group=self.group)
        return bool(buf.item())

    # -- broadcast ---------------------------------------------------------------------------------

    def broadcast_state(self, state: Mapping[str, torch.Tensor] | None, src: int = 0,
                        name: str = "broadcast_state") -> dict[str, torch.Tensor]:
        """Send a state dict from rank ``src`` to every rank. Other ranks pass None (or anything);
        they receive names, shapes and dtypes first (one small object broadcast), then one flat
        buffer per dtype. Returned tensors are on ``self.device``."""
        if not self._parallel:
            if state is None:
                raise ValueError("broadcast_state on a single process needs the state")
            return {k: v.detach().to(self.device) for k, v in state.items()}
        if self.rank == src:
            if state is None:
                raise ValueError(f"broadcast_state: the source rank {src} must pass a state")
            meta = [(k, tuple(state[k].shape), str(state[k].dtype).removeprefix("torch."))
                    for k in sorted(state)]
        else:
            meta = None
        holder = [meta]
        with self._collective(f"{name}/meta"):
            dist.broadcast_object_list(holder, group=self.group, device=self.device, group_src=src)
        meta = holder[0]
        by_dtype: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
        for k, shape, dt in meta:
            by_dtype.setdefault(dt, []).append((k, shape))
        out: dict[str, torch.Tensor] = {}
        with self._collective(name):
            for dt in sorted(by_dtype):
                dtype = getattr(torch, dt)
                group = by_dtype[dt]
                if self.rank == src:
                    flat = torch.cat([state[k].detach().reshape(-1).to(self.device, dtype) for k, _ in group])
                else:
                    total = sum(int(torch.Size(s).numel()) for _, s in group)
                    flat = torch.empty(total, dtype=dtype, device=self.device)
                dist.broadcast(flat, group=self.group, group_src=src)
                offset = 0
                for k, shape in group:
                    n = int(torch.Size(shape).numel())
                    out[k] = flat[offset: offset + n].view(shape).clone()
                    offset += n
        return out

    def barrier(self, name: str = "barrier") -> None:
        """All ranks reach this point; implemented as a tiny all-reduce so the timeout applies."""
        if self._parallel:
            buf = torch.zeros(1, dtype=torch.int32, device=self.device)
            with self._collective(name):
                dist.all_reduce(buf, group=self.group)

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
from typing import Iterator, Mapping

import torch
import torch.distributed as dist

from ..errors import EXIT_COLLECTIVE_ERROR, CollectiveError

log = logging.getLogger(__name__)

# The backend raises at the timeout; the watchdog only steps in if it does not.
WATCHDOG_GRACE_S = 15.0


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
                    f"{self.timeout_s:g} s on rank {self.rank} (a peer rank died or hangs); exiting\n")
                sys.stderr.flush()
                os._exit(EXIT_COLLECTIVE_ERROR)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


class Communicator:
    """Collectives over the default process group (or a single process, where they are identities).

    ``device`` is where buffers live for the backend: a CUDA device for NCCL, the CPU for gloo.
    Results come back on the device of the inputs.
    """

    def __init__(self, rank: int, world_size: int, device: torch.device, timeout_s: float):
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self._watchdog = _Watchdog(timeout_s, rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when a process group is up; False for a single process without one."""
        return dist.is_available() and dist.is_initialized()

    @contextlib.contextmanager
    def _collective(self, name: str) -> Iterator[None]:
        with self._watchdog.track(name):
            try:
                yield
            except (RuntimeError, dist.DistError) as exc:  # DistBackendError, gloo/NCCL timeouts
                raise CollectiveError(
                    f"collective '{name}' failed on rank {self.rank}/{self.world_size} "
                    f"(timeout {self.timeout_s:g} s): {_first_line(exc)}") from exc

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
        if self.active and self.world_size > 1:
            with self._collective(name):
                works = [dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True) for _, flat in buffers]
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

    def all_reduce_(self, buffer: torch.Tensor, name: str = "all_reduce") -> torch.Tensor:
        """In-place sum of one contiguous buffer on ``self.device``: the bare collective, without
        the packing of :meth:`all_reduce_sum` (benchmarks compare the two)."""
        if self.active and self.world_size > 1:
            with self._collective(name):
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        return buffer

    def all_reduce_metrics(self, metrics: Mapping[str, float], op: str = "sum",
                           name: str = "all_reduce_metrics") -> dict[str, float]:
        """Reduce scalar metrics (sum, max or min) in float64: one collective for the whole dict."""
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        if op not in ops:
            raise ValueError(f"op must be one of {sorted(ops)}, got {op!r}")
        keys = sorted(metrics)
        if not (self.active and self.world_size > 1):
            return {k: float(metrics[k]) for k in keys}
        buf = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device)
        with self._collective(name):
            dist.all_reduce(buf, op=ops[op])
        return dict(zip(keys, buf.cpu().tolist()))

    def agree(self, flag: bool, op: str = "min", name: str = "agree") -> bool:
        """Shared decision: ``min`` = true only if true on every rank, ``max`` = true on any rank."""
        if op not in ("min", "max"):
            raise ValueError(f"op must be 'min' or 'max', got {op!r}")
        if not (self.active and self.world_size > 1):
            return bool(flag)
        buf = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        with self._collective(name):
            dist.all_reduce(buf, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
        return bool(buf.item())

    # -- broadcast ---------------------------------------------------------------------------------

    def broadcast_state(self, state: Mapping[str, torch.Tensor] | None, src: int = 0,
                        name: str = "broadcast_state") -> dict[str, torch.Tensor]:
        """Send a state dict from rank ``src`` to every rank. Other ranks pass None (or anything);
        they receive names, shapes and dtypes first (one small object broadcast), then one flat
        buffer per dtype. Returned tensors are on ``self.device``."""
        if not (self.active and self.world_size > 1):
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
            dist.broadcast_object_list(holder, src=src, device=self.device)
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
                dist.broadcast(flat, src=src)
                offset = 0
                for k, shape in group:
                    n = int(torch.Size(shape).numel())
                    out[k] = flat[offset: offset + n].view(shape).clone()
                    offset += n
        return out

    def barrier(self, name: str = "barrier") -> None:
        """All ranks reach this point; implemented as a tiny all-reduce so the timeout applies."""
        if self.active and self.world_size > 1:
            buf = torch.zeros(1, dtype=torch.int32, device=self.device)
            with self._collective(name):
                dist.all_reduce(buf)

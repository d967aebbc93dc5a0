"""Process-wide settings for the libraries we drive. ``fedpft`` applies them once, in ``cli.main``,
before any of those libraries is imported; a program that uses fedpft_dist as a library calls
:func:`prepare_process` itself."""
from __future__ import annotations

import functools
import os
import signal
import threading
import warnings
from typing import Optional


def prepare_process() -> None:
    """Offline Hugging Face; DeepSpeed's CPU accelerator where there is no CUDA (transformers and peft
    import DeepSpeed when it is installed, and without this it guesses and warns); and silence for
    two deprecations that are known to be harmless."""
    # peft 0.21 calls a transformers property that transformers 5.24 has renamed.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # DeepSpeed 0.19 calls collectives that torch 2.13 has renamed; the old names still work.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def _status_bytes(key: str) -> Optional[int]:
    """A ``/proc/self/status`` figure (``VmRSS``, ``VmHWM``) in bytes; None where there is none."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def resident_bytes() -> Optional[int]:
    """This process's resident set now (Linux); None elsewhere."""
    return _status_bytes("VmRSS")


def reset_peak_memory(device) -> None:
    """Start a new peak: CUDA's allocator statistics on a GPU; on the CPU the resident set's high-water
    mark (VmHWM), which ``/proc/self/clear_refs`` sets back to the current resident set (Linux)."""
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_memory_bytes(device) -> Optional[int]:
    """The peak since :func:`reset_peak_memory`: bytes CUDA's allocator handed out on a GPU (tensors
    only), the process's resident set on the CPU (everything: the interpreter, libraries and data
    too). None where the CPU figure cannot be read."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated(device))
    return _status_bytes("VmHWM")


def resident_tensor_bytes(modules) -> int:
    """The bytes of the CPU tensors (parameters and buffers; a sharded one's local shard) that
    ``modules`` hold, each storage once, after reading one byte of each of its pages, so that
    weights mapped from their files lazily are resident when the resident set is read next."""
    import torch

    seen: dict[int, int] = {}
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            local = t.to_local() if hasattr(t, "to_local") else t
            if local.device.type != "cpu" or local.is_meta:
                continue
            storage = local.untyped_storage()
            if storage.data_ptr() in seen or storage.nbytes() == 0:
                continue
            seen[storage.data_ptr()] = storage.nbytes()
            pages = torch.empty(0, dtype=torch.uint8).set_(storage)
            int(pages[::4096].sum())
    return sum(seen.values())


def return_freed_memory(collect: bool = False) -> None:
    """Hand memory that Python and torch have freed back to the operating system.

    glibc keeps freed heap pages of large, short-lived phases (a distillation's teacher and optimizer,
    the activations of a backward pass) mapped in the process, so the resident set of a long run only
    grows; ``malloc_trim`` releases them (about a millisecond). ``collect`` first frees objects kept
    alive only by reference cycles (a DeepSpeed engine and its optimizer): a full garbage collection,
    about 0.2 s with transformers loaded, so only after phases that leave such cycles. A no-op where
    the C library is not glibc."""
    import gc

    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# glibc's mallopt parameter for the mmap threshold, and the threshold exact_memory fixes (glibc's own
# starting value: it rises up to 32 MiB as large blocks are freed, which keeps later frees resident)
M_MMAP_THRESHOLD = -3
FIXED_MMAP_THRESHOLD = 128 * 1024


def fix_mmap_threshold(size: int = FIXED_MMAP_THRESHOLD) -> bool:
    """Have glibc serve every allocation of ``size`` bytes or more by its own mapping, returned to the
    system when freed: the resident set then follows live memory (tensors) rather than what the heap
    kept. False where the C library is not glibc (nothing changes)."""
    lib = _libc()
    if lib is None or not hasattr(lib, "mallopt"):
        return False
    return bool(lib.mallopt(M_MMAP_THRESHOLD, size))


@functools.lru_cache(maxsize=1)
def _libc():
    """The C library, looked up once (``find_library`` runs ``ldconfig``); None where it is not found."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def _malloc_trim():
    """glibc's ``malloc_trim``; None elsewhere."""
    return getattr(_libc(), "malloc_trim", None)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


_ACTIVE: list["StopSignals"] = []


def stop_received() -> Optional[str]:
    """The first stop signal that an active :class:`StopSignals` of this process has recorded (its name),
    None when there is none: long jobs inside a command (a distillation) check it between steps."""
    for signals in _ACTIVE:
        if signals.received is not None:
            return signals.received
    return None


class StopSignals:
    """While active, SIGTERM and SIGUSR1 (what Slurm sends before a time limit or a preemption, see
    ``sbatch --signal``) do not kill the process: they are recorded in :attr:`received` (the first
    one's name) for the round loop to act on at the end of the round. The previous handlers come back
    on exit. Outside the main thread, where Python cannot install handlers, it does nothing."""

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        if self in _ACTIVE:
            _ACTIVE.remove(self)


# ----------------------------------------------------------------------------------------------------
# Fault injection, for the tests of failure handling
# ----------------------------------------------------------------------------------------------------

FAULT_ACTIONS = ("sigterm", "die", "hang")


def fault_point(site: str, index: int, rank: int) -> None:
    """A place where the tests make a process fail on purpose: with ``FEDPFT_FAULT=SITE@INDEX:ACTION``
    (and ``FEDPFT_FAULT_RANK=R``, default 0) the rank ``R`` process reaching ``site`` for the
    ``index``-th time (as the caller counts: a step, a round) sends itself SIGTERM (``sigterm``), dies
    at once without cleaning up (``die``, exit 137 as after SIGKILL) or stops making progress
    (``hang``). Unset, it does nothing."""
    spec = os.environ.get("FEDPFT_FAULT")
    if not spec:
        return
    where, _, action = spec.partition(":")
    name, _, at = where.partition("@")
    if name != site or int(at or 0) != index or rank != int(os.environ.get("FEDPFT_FAULT_RANK", "0")):
        return
    if action == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    elif action == "die":
        os._exit(137)
    elif action == "hang":
        import time

        while True:
            time.sleep(60)
    else:
        raise ValueError(f"FEDPFT_FAULT: unknown action {action!r} (one of {', '.join(FAULT_ACTIONS)})")

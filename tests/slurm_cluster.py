"""A real Slurm cluster for tests (a helper, not a test module): one node on this machine, or
several nodes given as :class:`Node` (e.g. the network namespaces of tests/netns_nodes.py).

    with slurm_cluster(install=False) as cluster:
        cluster.run(["sbatch", "--wait", ...], timeout=90)
    with two_nodes() as nodes, slurm_cluster(nodes=nodes) as cluster:
        ...

What it does (see "A real one-node Slurm for tests" in the shared ENVIRONMENT.md):

* needs root and the binaries slurmctld, slurmd, sbatch, srun, scontrol, sinfo, squeue, scancel,
  munged and munge; with ``install=True`` missing ones are installed with
  ``apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge``;
* makes sure the short hostname resolves (adds ``127.0.0.1 <host>`` to /etc/hosts for the duration
  if ``getent hosts`` does not know it: it becomes MASTER_ADDR through SLURM_JOB_NODELIST);
* writes slurm.conf into a temporary directory (state, spool, pid and log files there too; free
  ports for slurmctld/slurmd) and passes it to daemons and clients through SLURM_CONF;
* reuses a running munged, otherwise creates /etc/munge/munge.key if missing and starts munged as
  user munge;
* starts ``slurmctld -D -i`` and ``slurmd -D -N <node>`` and waits until ``sinfo`` shows the node idle;
* with ``nodes``: slurmctld runs on the first node (which is also where clients such as sbatch run,
  through :meth:`SlurmCluster.run`), one slurmd per node with spool, pid and log file per node name;
  /etc/hosts is left alone: every node name must already resolve on every node;
* on exit, even after a failure: cancels the jobs, SIGTERMs slurmd and slurmctld (SIGKILL after a
  grace period), kills every process still carrying this cluster's SLURM_CONF in its environment
  (slurmstepd and job processes outlive slurmd otherwise), stops munged if it started it, and
  undoes the /etc/hosts change.

Failures to start raise :class:`SlurmUnavailable` whose message says why (tests skip with it).
"""
from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel", "munged",
            "munge")
APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
APT_COMMAND = ("apt-get", "install", "-y", "--no-install-recommends", *APT_PACKAGES)
# Daemons live in /usr/sbin, which is not always on a test runner's PATH.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN_DIR = Path("/run/munge")
ETC_HOSTS = Path("/etc/hosts")
HOSTS_MARK = "# added by fedpft-dist tests/slurm_cluster.py"
PARTITION = "debug"


@dataclass(frozen=True)
class Node:
    """One Slurm node: its NodeName (also the host name its processes see), its NodeAddr, and the
    command prefix that runs a program on it (empty: on this machine as it is)."""

    name: str
    addr: str
    prefix: tuple[str, ...] = ()


class SlurmUnavailable(RuntimeError):
    """The cluster cannot be had here; the message says why."""


def which(name: str) -> Optional[str]:
    return shutil.which(name, path=SEARCH_PATH)


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if which(b) is None]


def install_slurm(timeout: float = 300) -> None:
    """apt-get install the Slurm and munge packages (root only). Raises SlurmUnavailable on failure."""
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("Slurm not installed and apt-get is not available to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = subprocess.run(list(APT_COMMAND), env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:  # no package lists yet on a fresh machine: update once and retry
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=timeout)
        proc = subprocess.run(list(APT_COMMAND), env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SlurmUnavailable(f"`{' '.join(APT_COMMAND)}` failed ({proc.returncode}): "
                               f"{(proc.stdout + proc.stderr)[-1000:]}")


def short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def _resolves(host: str) -> bool:
    return subprocess.run(["getent", "hosts", host], capture_output=True).returncode == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _pids_with_env(key: str, value: str) -> list[int]:
    """Processes whose environment has key=value (how this cluster's leftovers are recognised)."""
    needle = f"{key}={value}".encode()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            out.append(int(entry.name))
    return out


def _pids_named(comm: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == comm:
                out.append(int(entry.name))
        except OSError:
            continue
    return out


def _children_of(parents: set[int]) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid in parents:
            out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def signal_until_gone(find_pids, waits=((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0))) -> None:
    """Send each signal of ``waits`` to the processes ``find_pids()`` names, waiting up to its seconds
    for them to go before the next, harder one."""
    for sig, wait in waits:
        pids = [p for p in find_pids() if _alive(p)]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_alive(p) for p in find_pids()):
            time.sleep(0.1)


def _terminate(proc: subprocess.Popen, grace: float) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@dataclass
class SlurmCluster:
    """A running cluster. ``env`` carries SLURM_CONF: use it for every Slurm client. ``nodes[0]``
    runs slurmctld and the clients; ``cpus`` is what each node offers."""

    root: Path
    conf: Path
    hostname: str
    cpus: int
    env: dict[str, str]
    nodes: list[Node] = field(default_factory=list)
    partition: str = PARTITION
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _munged: Optional[subprocess.Popen] = None
    _hosts_added: Optional[str] = None
    _stepd_before: set[int] = field(default_factory=set)  # slurmstepd pids that are not ours

    def run(self, args: Sequence[str], timeout: float = 60, env: Optional[Mapping[str, str]] = None,
            cwd: Optional[str] = None) -> subprocess.CompletedProcess:
        """Run a command (e.g. sbatch) against this cluster on its first node, with ``timeout``
        around it."""
        full_env = dict(self.env if env is None else env)
        full_env["SLURM_CONF"] = str(self.conf)
        cmd = ["timeout", "-k", "5", str(int(timeout)), *self.nodes[0].prefix, *args]
        return subprocess.run(cmd, env=full_env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout + 15)

    def _client(self, args: Sequence[str]) -> subprocess.CompletedProcess:
        """A quick Slurm client call of the harness itself (sinfo, squeue, scancel) on the first node."""
        return subprocess.run([*self.nodes[0].prefix, which(args[0]), *args[1:]], env=self.env,
                              capture_output=True, text=True, timeout=15)

    def diagnostics(self) -> str:
        parts = []
        names = ["slurmctld.log", *(f"slurmd-{n.name}.log" for n in self.nodes), "slurmctld.stderr",
                 *(f"slurmd-{n.name}.stderr" for n in self.nodes)]
        for name in names:
            text = _tail(self.root / name)
            if text.strip():
                parts.append(f"--- {name} (tail) ---\n{text}")
        return "\n".join(parts)

    # -- start ----------------------------------------------------------------------------------
    def _start(self, timeout: float) -> None:
        self._stepd_before = set(_pids_named("slurmstepd"))
        self._start_munge()
        daemons = [("slurmctld", [*self.nodes[0].prefix, which("slurmctld"), "-D", "-i"])]
        daemons += [(f"slurmd-{n.name}", [*n.prefix, which("slurmd"), "-D", "-N", n.name]) for n in self.nodes]
        for name, args in daemons:
            err = open(self.root / f"{name}.stderr", "wb")
            self._procs[name] = subprocess.Popen(args, env=self.env, stdin=subprocess.DEVNULL,
                                                 stdout=err, stderr=subprocess.STDOUT,
                                                 start_new_session=True)
            err.close()
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with {proc.returncode} at start-up:\n"
                                           f"{self.diagnostics()}")
            out = self._client(["sinfo", "-h", "-N", "-o", "%t"])
            state = out.stdout.strip()
            if out.returncode == 0 and state.split() == ["idle"] * len(self.nodes):
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"nodes not idle after {timeout:.0f} s (sinfo states {state!r}):\n"
                               f"{self.diagnostics()}")

    def _start_munge(self) -> None:
        if subprocess.run([which("munge"), "-n"], capture_output=True).returncode == 0:
            return  # a munged is already running: use it, leave it be
        try:
            munge_user = pwd.getpwnam("munge")
        except KeyError:
            raise SlurmUnavailable("user 'munge' does not exist (is the munge package installed?)") from None
        uid, gid = munge_user.pw_uid, munge_user.pw_gid
        if not MUNGE_KEY.exists():
            MUNGE_KEY.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chown(MUNGE_KEY.parent, uid, gid)
            fd = os.open(MUNGE_KEY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(128))
            os.chown(MUNGE_KEY, uid, gid)
        for d in (MUNGE_RUN_DIR, Path("/var/lib/munge"), Path("/var/log/munge")):
            d.mkdir(mode=0o755 if d == MUNGE_RUN_DIR else 0o700, parents=True, exist_ok=True)
            os.chown(d, uid, gid)
        log = open(self.root / "munged.stderr", "wb")
        self._munged = subprocess.Popen([which("munged"), "-F", "--force"], user=uid, group=gid,
                                             stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._munged.poll() is not None:
                raise SlurmUnavailable(f"munged exited with {self._munged.returncode}: "
                                       f"{_tail(self.root / 'munged.stderr')}")
            if subprocess.run([which("munge"), "-n"], capture_output=True).returncode == 0:
                return
            time.sleep(0.2)
        raise SlurmUnavailable(f"munged not answering after 10 s: {_tail(self.root / 'munged.stderr')}")

    # -- stop -----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop everything this cluster started; safe to call more than once, never raises."""
        # Remember what to wait for at the end: the daemons' children (slurmstepd, possibly already
        # zombies) and every process carrying this SLURM_CONF.
        ours: set[int] = set()
        with contextlib.suppress(Exception):
            daemons = {p.pid for p in self._procs.values()}
            ours = set(_pids_with_env("SLURM_CONF", str(self.conf))) | set(_children_of(daemons))
            ours |= set(_pids_named("slurmstepd")) - self._stepd_before
        with contextlib.suppress(Exception):
            if self._procs.get("slurmctld") is not None and self._procs["slurmctld"].poll() is None:
                self._client(["scancel", "--user", pwd.getpwuid(os.getuid()).pw_name])
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    q = self._client(["squeue", "-h", "-o", "%i"])
                    if q.returncode != 0 or not q.stdout.strip():
                        break
                    time.sleep(0.3)
        # The slurmds first: a slurmd that outlives slurmctld keeps retrying to register.
        for name in [n for n in self._procs if n != "slurmctld"] + ["slurmctld"]:
            proc = self._procs.pop(name, None)
            if proc is not None:
                with contextlib.suppress(Exception):
                    _terminate(proc, grace=10)
        # slurmstepd and job processes outlive slurmd: every process with this SLURM_CONF is ours.
        with contextlib.suppress(Exception):
            signal_until_gone(lambda: _pids_with_env("SLURM_CONF", str(self.conf)))
        # Zombies left by slurmd are reaped by init once slurmd is gone: wait, so that a caller
        # checking `pgrep slurm` right after sees nothing.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in ours):
            time.sleep(0.1)
        if self._munged is not None:
            with contextlib.suppress(Exception):
                _terminate(self._munged, grace=5)
            self._munged = None
        if self._hosts_added is not None:
            with contextlib.suppress(Exception):
                lines = ETC_HOSTS.read_text().splitlines(keepends=True)
                kept = [ln for ln in lines if ln != self._hosts_added]
                # Rewrite in place: /etc/hosts is often a bind mount that cannot be replaced.
                with open(ETC_HOSTS, "w") as f:
                    f.writelines(kept)
            self._hosts_added = None


def _slurm_conf(root: Path, controller: Node, node_lines: Sequence[str], ctld_port: int,
                slurmd_port: int) -> str:
    return "\n".join([
        "# test cluster written by fedpft-dist tests/slurm_cluster.py",
        "ClusterName=fedpft-test",
        f"SlurmctldHost={controller.name}({controller.addr})",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        f"StateSaveLocation={root}/state",
        # %n: the node name, so that several slurmd on one machine keep apart.
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/slurmctld.log",
        f"SlurmdLogFile={root}/slurmd-%n.log",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "ReturnToService=2",
        # A job asking for more than the node has is rejected instead of pending forever.
        "EnforcePartLimits=ALL",
        # Finished jobs leave the controller quickly, so `sbatch --wait` notices within seconds.
        "MinJobAge=5",
        "KillWait=5",
        # `scontrol requeue` (the templates' answer to a stop signal) works on any batch job, and the
        # requeued job may start again after cred_expire + 1 s instead of the default 121 s; the
        # scheduler then starts it within 2 s, not at its next 60 s pass.
        "JobRequeue=1",
        "AuthInfo=cred_expire=10",
        "SchedulerParameters=sched_interval=2",
        *node_lines,
        f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def _resolve_nodes(cluster: SlurmCluster) -> None:
    """One node: make the short hostname resolve (it becomes MASTER_ADDR through SLURM_JOB_NODELIST).
    Several: check that every node name resolves on every node (they are the caller's to set up)."""
    if len(cluster.nodes) > 1:
        for node in cluster.nodes:
            for other in cluster.nodes:
                proc = subprocess.run([*node.prefix, "getent", "hosts", other.name], capture_output=True,
                                      text=True, timeout=15)
                if proc.returncode != 0:
                    raise SlurmUnavailable(f"node name {other.name!r} does not resolve on {node.name}")
        return
    hostname = cluster.hostname
    if not _resolves(hostname):
        line = f"127.0.0.1 {hostname} {HOSTS_MARK}\n"
        current = ETC_HOSTS.read_text() if ETC_HOSTS.exists() else ""
        with open(ETC_HOSTS, "a") as f:
            f.write(("\n" if current and not current.endswith("\n") else "") + line)
        cluster._hosts_added = line
        if not _resolves(hostname):
            raise SlurmUnavailable(f"short hostname {hostname!r} does not resolve, even after adding "
                                   f"it to {ETC_HOSTS}")


def _node_lines(cluster: SlurmCluster) -> list[str]:
    """slurm.conf node lines: what `slurmd -C` finds on this machine, for every node (the nodes of a
    multi-node test cluster share this machine's CPUs and memory). Sets ``cluster.cpus``."""
    probe = subprocess.run([which("slurmd"), "-C"], capture_output=True, text=True, timeout=30)
    node_line = next((ln.strip() for ln in probe.stdout.splitlines() if ln.startswith("NodeName=")), None)
    if probe.returncode != 0 or node_line is None:
        raise SlurmUnavailable(f"`slurmd -C` failed ({probe.returncode}): {probe.stderr[-500:]}")
    fields = dict(item.split("=", 1) for item in node_line.split() if "=" in item)
    cluster.cpus = int(fields.get("CPUs", "1"))
    rest = node_line.split(None, 1)[1] if " " in node_line else ""
    return [f"NodeName={n.name} {rest} NodeAddr={n.addr} State=UNKNOWN" for n in cluster.nodes]


@contextlib.contextmanager
def slurm_cluster(install: bool = False, start_timeout: float = 30,
                  nodes: Optional[Sequence[Node]] = None) -> Iterator[SlurmCluster]:
    """Start a Slurm cluster, yield it, stop it (also when the body fails).

    ``install``: apt-get install missing Slurm/munge packages first (root only).
    ``nodes``: the cluster's nodes (default: this machine, named by its short hostname, at 127.0.0.1).
    Raises SlurmUnavailable (before yielding) when it cannot run here.
    """
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"Slurm test cluster needs root (running as uid {os.geteuid()})")
    missing = missing_binaries()
    if missing and install:
        install_slurm()
        missing = missing_binaries()
    if missing:
        raise SlurmUnavailable(f"Slurm not installed: missing {', '.join(missing)} "
                               f"(`{' '.join(APT_COMMAND)}`, or set FEDPFT_TEST_INSTALL_SLURM=1)")
    node_list = list(nodes) if nodes else [Node(short_hostname(), "127.0.0.1")]
    root = Path(tempfile.mkdtemp(prefix="fedpft-slurm-"))
    os.chmod(root, 0o755)
    for sub in ("state", "spool", *(f"spool/{n.name}" for n in node_list)):
        (root / sub).mkdir()
    conf = root / "slurm.conf"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SLURM_CONF"] = str(conf)
    env["PATH"] = SEARCH_PATH
    cluster = SlurmCluster(root=root, conf=conf, hostname=node_list[0].name, cpus=1, env=env, nodes=node_list)
    try:
        _resolve_nodes(cluster)
        node_lines = _node_lines(cluster)
        ctld_port = _free_port()
        slurmd_port = _free_port()
        while slurmd_port == ctld_port:
            slurmd_port = _free_port()
        conf.write_text(_slurm_conf(root, node_list[0], node_lines, ctld_port, slurmd_port))
        if any(n.prefix for n in node_list):
            # slurmd 22.05 starts its cgroup plugin even with proctrack/linuxproc and task/none, and
            # "autodetect" fails where no cgroup file system is mounted, as in the fresh /sys that
            # `ip netns exec` mounts; the v1 plugin touches no file system until a cgroup plugin uses it.
            (root / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")
        cluster._start(start_timeout)
    except BaseException as exc:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        if isinstance(exc, (SlurmUnavailable, OSError, subprocess.SubprocessError)):
            raise SlurmUnavailable(f"Slurm cluster failed to start: {exc}") from exc
        raise
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)

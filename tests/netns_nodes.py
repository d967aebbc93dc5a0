"""Two "nodes" on one machine for tests (a helper, not a test module).

    with two_nodes() as nodes:
        subprocess.run([*nodes[1].prefix, "hostname"], timeout=10)   # prints node2

What it does (root only):

* two network namespaces ``fedpft<pid>-1`` and ``fedpft<pid>-2`` joined by a veth pair
  ``fpv<pid>a``/``fpv<pid>b``, addresses 10.237.0.1/24 and 10.237.0.2/24 and lo up in each; the
  addresses exist only inside the namespaces, and the pid keeps concurrent runs apart;
* ``/etc/netns/<namespace>/hosts`` naming both nodes: ``ip netns exec`` bind-mounts it over /etc/hosts
  for everything started in the namespace (the real /etc/hosts is never touched);
* a node's ``prefix`` runs a command in its namespace and in a new UTS namespace whose host name is
  the node's name (node1, node2), so that each node sees itself as a separate host: torchrun's
  rendezvous and MASTER_ADDR, gloo's choice of interface and Slurm's node names all go by the host
  name, which the two namespaces would otherwise share with this machine;
* on exit, even after a failure: kills every process still in the namespaces, deletes the
  namespaces (the veth pair goes with them) and the /etc/netns entries.

The file system is shared, as on a cluster with a shared file system. Failures to set up raise
:class:`NetnsUnavailable` whose message says why (tests skip with it).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Iterator

try:
    from .slurm_cluster import SEARCH_PATH, Node, signal_until_gone
except ImportError:
    from slurm_cluster import SEARCH_PATH, Node, signal_until_gone

SUBNET = "10.237.0"
NETNS_ETC = Path("/etc/netns")
TOOLS = ("ip", "unshare", "hostname", "getent")


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be had here; the message says why."""


def _tool(name: str) -> str:
    path = shutil.which(name, path=SEARCH_PATH)
    if path is None:
        raise NetnsUnavailable(f"{name!r} not found (iproute2 / util-linux / hostname)")
    return path


def _ip(*args: str) -> None:
    proc = subprocess.run([_tool("ip"), *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise NetnsUnavailable(f"network namespaces: `ip {' '.join(args)}` failed ({proc.returncode}): "
                               f"{proc.stderr.strip()}")


def _namespace_pids(ns: str) -> list[int]:
    proc = subprocess.run([_tool("ip"), "netns", "pids", ns], capture_output=True, text=True, timeout=30)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def _kill_namespace(ns: str) -> None:
    """SIGTERM, then SIGKILL, whatever still runs in the namespace (a namespace with processes in it
    outlives `ip netns del`, and so would its veth end)."""
    signal_until_gone(lambda: _namespace_pids(ns), ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)))


@contextlib.contextmanager
def two_nodes(names: tuple[str, str] = ("node1", "node2")) -> Iterator[list[Node]]:
    """Set up the two namespaces, yield their :class:`Node` (name, address, command prefix), remove
    everything on exit. Raises NetnsUnavailable (before yielding) when it cannot be done here."""
    if os.geteuid() != 0:
        raise NetnsUnavailable(f"network namespaces need root (running as uid {os.geteuid()})")
    ip, unshare, hostname = _tool("ip"), _tool("unshare"), _tool("hostname")
    _tool("getent")
    pid = os.getpid()
    namespaces = [f"fedpft{pid}-{i}" for i in (1, 2)]
    veths = [f"fpv{pid}a", f"fpv{pid}b"]  # interface names are at most 15 characters
    addrs = [f"{SUBNET}.{i}" for i in (1, 2)]
    hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for a, n in zip(addrs, names))
    made_etc = not NETNS_ETC.exists()
    made: list[str] = []
    nodes: list[Node] = []

    def teardown() -> None:
        for ns in made:
            with contextlib.suppress(Exception):
                _kill_namespace(ns)
            subprocess.run([ip, "netns", "del", ns], capture_output=True, timeout=30)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        # Only there when the pair was made but not yet moved into the namespaces.
        subprocess.run([ip, "link", "del", veths[0]], capture_output=True, timeout=30)
        if made_etc:
            with contextlib.suppress(OSError):
                NETNS_ETC.rmdir()  # left alone when other namespaces still use it

    try:
        for ns in namespaces:
            _ip("netns", "add", ns)
            made.append(ns)
            (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / ns / "hosts").write_text(hosts)
        _ip("link", "add", veths[0], "type", "veth", "peer", "name", veths[1])
        for ns, veth, addr, name in zip(namespaces, veths, addrs, names):
            _ip("link", "set", veth, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", veth)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", veth, "up")
            # sh sets the host name inside the new UTS namespace, then becomes the command.
            prefix = (ip, "netns", "exec", ns, unshare, "--uts", "--", "sh", "-c",
                      f'{hostname} "$0" && exec "$@"', name)
            nodes.append(Node(name, addr, prefix))
        for node in nodes:
            probe = subprocess.run([*node.prefix, "sh", "-c", f"hostname && getent hosts {names[0]} {names[1]}"],
                                   capture_output=True, text=True, timeout=30)
            if probe.returncode != 0 or probe.stdout.split()[:1] != [node.name]:
                raise NetnsUnavailable(f"a command in {node.name}'s namespace did not run as expected "
                                       f"({probe.returncode}): {(probe.stdout + probe.stderr).strip()[-500:]}")
    except BaseException as exc:
        teardown()
        if isinstance(exc, (OSError, subprocess.SubprocessError)):
            raise NetnsUnavailable(f"network namespaces failed: {exc}") from exc
        raise
    try:
        yield nodes
    finally:
        teardown()

"""Run `fedpft` commands for the tests in processes forked from one that has already imported
everything a run needs.

Every end-to-end test runs the real command line, and each of its processes first spends about
4 CPU-seconds importing torch, transformers and peft: on a 2-core machine that is a third of the
suite. A server process (one per pytest process) imports them once; each command is then a fork of
it that sets the command's environment, working directory and ``sys.argv``, calls
``fedpft_dist.cli.main`` as ``python -m fedpft_dist`` would, runs the interpreter's exit handlers
and exits with the command's code. Two forks with torchrun's variables (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, ...) make a 2-rank run: what ``fedpft_dist.runtime.launch`` treats as a
torchrun launch, so the ranks meet through the same env:// rendezvous.

Only commands whose environment is the server's own (``conftest.child_env()``) plus rank variables
and variables only our code reads when a command runs (``conftest.FORK_SAFE_ENV``) go through it,
because some modules read the environment when they are imported; anything else, and
every test of a launcher itself (torchrun, srun, mpirun, signals sent to a rank), starts real
processes. ``FEDPFT_TEST_FORK=0`` turns the server off and every command starts a fresh interpreter.

Protocol (one request per connection on a Unix socket): the client sends one JSON line
``{"argv", "env", "cwd", "stdout", "stderr"}``; the server forks a handler, which forks the command
(its own process group), answers ``{"pid": ...}`` and, once the command ends, ``{"status": ...}``
(``os.waitpid``'s status). The handler owns the command so that its exit code reaches the client
whatever way the command ends.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import traceback

# What `fedpft train`, `distill`, `bench` and `proxy` import on their way: importing it here, once,
# is the point of the server.
PRELOAD = ("torch", "transformers", "transformers.models.bert.modeling_bert",
           "transformers.models.llama.modeling_llama", "peft", "safetensors.torch", "deepspeed",
           "fedpft_dist.cli", "fedpft_dist.commands.train", "fedpft_dist.commands.distill",
           "fedpft_dist.commands.bench", "fedpft_dist.commands.proxy", "fedpft_dist.federation.engine")


def _run_command(request: dict) -> int:
    """In the command's process: what `python -m fedpft_dist ARGV` does, then the interpreter's exit."""
    os.setpgid(0, 0)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    import fedpft_dist
    from fedpft_dist.cli import main

    sys.path[0] = request["cwd"]   # where `python -m` puts the working directory
    sys.argv = [os.path.join(os.path.dirname(fedpft_dist.__file__), "__main__.py"), *request["argv"]]
    try:
        code = main(request["argv"])
    except SystemExit as stop:
        code = stop.code
    except BaseException:
        traceback.print_exc()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    import atexit
    import threading

    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _handle(conn: socket.socket) -> None:
    """In the handler: start the command, report its pid, wait for it, report its status."""
    request = json.loads(conn.makefile("r").readline())
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        conn.close()
        code = 1
        try:
            code = _run_command(request)
        finally:
            os._exit(code)
    conn.sendall((json.dumps({"pid": pid}) + "\n").encode())
    _, status = os.waitpid(pid, 0)
    conn.sendall((json.dumps({"status": status}) + "\n").encode())


def serve(path: str) -> None:
    for name in PRELOAD:
        __import__(name)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path + ".tmp")
    os.rename(path + ".tmp", path)   # the socket appears, whole, once the imports are done
    server.listen(16)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # handlers are reaped by the kernel
    while True:
        conn, _ = server.accept()
        if os.fork() == 0:
            server.close()
            try:
                _handle(conn)
            finally:
                os._exit(0)
        conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])

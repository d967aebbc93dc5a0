"""A rank that dies or hangs must not leave the others waiting past the configured timeout."""
import subprocess
import time

import pytest

from conftest import PYTHON, REPO, child_env
from fedpft_dist.runtime import free_port

pytestmark = [pytest.mark.distributed]

TIMEOUT_S = 5.0


def _start_pair(mode: str):
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = child_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        env["PYTHONPATH"] = f"{REPO}:{REPO / 'tests'}"
        procs.append(subprocess.Popen([PYTHON, str(REPO / "tests" / "dist_workers.py"), mode, str(TIMEOUT_S)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_survivor_exits_nonzero_naming_the_collective(mode):
    procs = _start_pair(mode)
    start = time.monotonic()
    try:
        _, err = procs[0].communicate(timeout=TIMEOUT_S + 30 + 20)  # +20: interpreter start-up
        elapsed = time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[0].returncode == 3, (procs[0].returncode, err)
    assert "aggregate/adapter" in err, err
    # Start-up of two interpreters with torch takes a few seconds; the wait itself is bounded by
    # the timeout (plus the watchdog's grace where the backend does not raise by itself).
    assert elapsed < TIMEOUT_S + 30 + 15, elapsed

"""Error types that the CLI turns into exit codes.

``UserError`` (exit 2) is something the person running the job can fix: a bad config key, a missing
file, a read-only or full disk. Exit 3 means the job cannot go on: ``CollectiveError``, the ranks of
a job lost each other (a peer died or a collective did not finish within ``dist.timeout_s``), or
``TrainingDiverged``. ``Preempted`` (exit 75, EX_TEMPFAIL) is a run that stopped on SIGTERM or SIGUSR1
with a checkpoint: the sbatch templates requeue the job on this code.
"""
from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_COLLECTIVE_ERROR = 3
EXIT_RUN_FAILED = 3
EXIT_PREEMPTED = 75


class UserError(Exception):
    """A mistake in the command line, the config or the inputs. Reported as one line, exit code 2."""


class ConfigError(UserError):
    """A config value or key that fails validation; the message names the dotted key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names the collective."""


class TrainingDiverged(RuntimeError):
    """Training cannot make progress (every client update non-finite, round after round)."""


class Preempted(Exception):
    """A stop signal ended the run at a round boundary, after a checkpoint; resume continues it."""

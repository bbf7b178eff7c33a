"""The errors a run can end with, their exit codes, and the CLI wrapper that turns them into a clean exit.

Exit codes (the README's "Exit codes" table):
    0   done
    1   an unexpected error (a traceback: a bug, please report it)
    2   bad input (`UserError`): one `error:` line naming the flag, key or file and the fix
    3   a peer process died or hung past --dist-timeout (`PeerFailure`)
    4   a write failed (disk full, quota, I/O error) (`StorageFailure`); earlier checkpoints are intact
    5   a data-loader worker died (`DataWorkerFailure`), often for lack of memory
    75  preempted (`Preempted`, EX_TEMPFAIL): a recovery checkpoint was written; requeue the same command
        line with --resume auto
    128+N  a second signal N (e.g. 143 for SIGTERM) stopped the run at once
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, TypeVar

_Result = TypeVar("_Result")

EXIT_USER_ERROR = 2
EXIT_PEER_FAILED = 3
EXIT_STORAGE = 4
EXIT_DATA_WORKER = 5
EXIT_PREEMPTED = 75


class UserError(Exception):
    """An input the user can fix: the message names the input and the fix."""

    exit_code = EXIT_USER_ERROR


class UnreadableFile(UserError):
    """A file that cannot be read at all (empty, truncated, not a checkpoint), as opposed to one that is read and
    refused; `--resume auto` skips the former and stops at the latter."""


class RunFault(Exception):
    """A fault of the machine, not of the input: the message names the rank, where the run stood and what to do.
    Leaves the checkpoints already written intact."""

    exit_code = 1


class PeerFailure(RunFault):
    exit_code = EXIT_PEER_FAILED


class StorageFailure(RunFault):
    exit_code = EXIT_STORAGE


class DataWorkerFailure(RunFault):
    exit_code = EXIT_DATA_WORKER


class Preempted(RunFault):
    """Not a failure: a stop asked for by a signal, with a recovery checkpoint written."""

    exit_code = EXIT_PREEMPTED


def user_message(exc: BaseException) -> str:
    """The message of a UserError; one re-raised by a DataLoader worker carries the worker's traceback
    text around it, so only the original message (its last 'UserError: ...' part) is kept."""
    text = str(exc)
    marker = f"{UserError.__name__}: "
    if "Original Traceback" in text and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text


def warn(message: str) -> None:
    """One `warning:` line on stderr, for what the user should know but need not fix before the run goes on."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _process_group_alive() -> bool:
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def exit_cleanly_on_error(main: Callable[..., _Result]) -> Callable[..., _Result]:
    """Print a UserError or a RunFault as one `error:` line (a preemption as a `stopped:` line) on stderr and exit
    with its code (no traceback).

    A process still in a process group after a fault leaves with os._exit: tearing the group down would wait on
    the peer that failed (or abort in gloo's threads), and its exit code must be the fault's.

    Args:
        main: a CLI entry point.

    Returns:
        `main` wrapped: it returns what `main` returns, and exits with the error's `exit_code` on one.
    """

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> _Result:
        try:
            return main(*args, **kwargs)
        except (UserError, RunFault) as exc:
            label = "stopped" if isinstance(exc, Preempted) else "error"
            print(f"{label}: {user_message(exc)}", file=sys.stderr, flush=True)
            if isinstance(exc, RunFault) and _process_group_alive():
                sys.stdout.flush()
                os._exit(exc.exit_code)
            sys.exit(exc.exit_code)

    return wrapper

"""Preemption: a signal asks every process to stop at the same optimizer update, after a recovery checkpoint.

SLURM sends SIGTERM before it preempts or cancels a job (SIGUSR1 too with `--signal=USR1@90`), to every process
of the job; torchrun forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT to its workers. The first signal only sets a
flag. After each optimizer update the processes agree (`any_process`) whether any of them got one, so all stop
at the same update: they write a recovery checkpoint there, then the PREEMPTED marker, and exit with
EXIT_PREEMPTED. A second signal, more than `DUPLICATE_S` after the first, exits at once with 128 + its number;
one sooner is the same stop delivered twice (by SLURM to the worker and by torchrun forwarding it).
"""
import contextlib
import json
import os
import signal
import sys
import threading
import time

from kdcore.distributed import any_process
from kdcore.errors import EXIT_PREEMPTED, Preempted, UserError
from kdcore.io import atomic_write_text

from .checkpoint import recovery_path, save_recovery

PREEMPTED_MARKER = "PREEMPTED"
DUPLICATE_S = 1.0
DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


def signal_numbers(names):
    """The signal numbers of names such as SIGTERM or USR1 (an unknown name is an error naming it)."""
    numbers = []
    for name in names:
        full = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
        if not isinstance(getattr(signal, full, None), signal.Signals) or full in ("SIGKILL", "SIGSTOP"):
            raise UserError(f"--stop-signals {name}: not a signal that can be handled; use names such as SIGTERM "
                            f"SIGUSR1 SIGINT")
        numbers.append(getattr(signal, full))
    return numbers


class StopRequests:
    """The stop flag the signal handlers set; `requested` is the name of the first signal, or None."""

    def __init__(self):
        self.requested, self._first_at = None, None

    def handle(self, signum, frame):
        now = time.monotonic()
        if self._first_at is not None and now - self._first_at > DUPLICATE_S:
            print(f"stopped at once by a second {signal.Signals(signum).name}: continue the run from its last "
                  f"checkpoint with --resume auto", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        if self._first_at is None:
            self.requested, self._first_at = signal.Signals(signum).name, now


@contextlib.contextmanager
def stop_on_signals(names):
    """Handlers for the signals `names` (--stop-signals) while the block runs, the previous ones restored after.
    Yields the `StopRequests` they set. Outside the main thread (no handlers can be set there) nothing is installed."""
    requests = StopRequests()
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return
    previous = {number: signal.signal(number, requests.handle) for number in signal_numbers(names)}
    try:
        yield requests
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def write_preempted_marker(folder, signal_name, epoch, step, checkpoint):
    """The PREEMPTED file: which signal stopped the run, where, and the checkpoint that continues it."""
    atomic_write_text(json.dumps({"signal": signal_name, "epoch": epoch, "step": step, "checkpoint": checkpoint,
                                  "time": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n",
                      os.path.join(folder, PREEMPTED_MARKER))


def remove_preempted_marker(folder):
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(folder, PREEMPTED_MARKER))


def stop_if_requested(run, epoch, step=None, epoch_losses=None, saved=False):
    """Stop every process here if any got a stop signal (a collective: all call it at the same point).

    Mid-epoch (`step` updates of `epoch` done) a recovery checkpoint is written there unless one just was
    (`saved`); between epochs the epoch checkpoint just written continues the run. Then the PREEMPTED marker,
    and `Preempted` (exit code 75)."""
    if not any_process(run.stops.requested is not None, run.env):
        return
    if step is None:
        path = os.path.join(run.folder, "last.pth.tar")
    elif saved:
        path = recovery_path(run.folder, epoch, step)
    else:
        path = save_recovery(run, epoch, step, epoch_losses())
    where = f"epoch {epoch} step {step}" if step is not None else f"the end of epoch {epoch - 1}"
    signal_name = run.stops.requested or "a stop request (of another process)"
    if run.env.is_main:
        write_preempted_marker(run.folder, run.stops.requested, epoch, step, path)
        if run.writer is not None:
            run.writer.close()
        run.log.info(f"Stopped by {signal_name} at {where}: {path} continues the run")
    raise Preempted(f"rank {run.env.rank}: {signal_name} at {where}; {path} holds the run: requeue the same command "
                    f"line with --resume auto (exit code {EXIT_PREEMPTED})")

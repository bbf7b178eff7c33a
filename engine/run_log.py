"""The run's log (console, and log.txt on rank 0) and its TensorBoard scalars. Neither stops a run when its
file cannot be written (a full disk, a quota): each warns once on stderr and goes on, the console log intact;
the checkpoint writes are what stop it (exit code 4)."""
import logging
import os
import sys

from kdcore.errors import warn


class LogFileHandler(logging.FileHandler):
    """log.txt; a failed write warns once (instead of a traceback per line) and turns the file off."""

    def handleError(self, record):
        if not getattr(self, "failed", False):
            self.failed = True
            warn(f"cannot write {self.baseFilename} ({sys.exc_info()[1]}); the run goes on, logging to the "
                 f"console only")
        self.setLevel(logging.CRITICAL + 1)


def close_log():
    """Close and drop the run log's handlers (its log.txt), e.g. those of an earlier run in this process."""
    log = logging.getLogger("train")
    for handler in list(log.handlers):
        handler.close()
        log.removeHandler(handler)


def make_logger(folder, is_main):
    close_log()  # a previous run's in this process (a test, a sweep)
    log = logging.getLogger("train")
    log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if is_main:
        handlers.append(LogFileHandler(os.path.join(folder, "log.txt")))
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)
    return log


class Scalars:
    """TensorBoard's SummaryWriter on rank 0 (add_scalar, close); a failing write warns once and turns it off."""

    def __init__(self, folder):
        from torch.utils.tensorboard import SummaryWriter
        self.folder, self.writer = folder, SummaryWriter(log_dir=folder)

    def _call(self, method, *args):
        if self.writer is None:
            return
        try:
            getattr(self.writer, method)(*args)
        except Exception as exc:  # tensorboard's writer thread re-raises its OSError here, in its own types
            self.writer = None
            warn(f"cannot write TensorBoard events in {self.folder} ({exc}); the run goes on without them")

    def add_scalar(self, tag, value, step):
        self._call("add_scalar", tag, value, step)

    def close(self):
        self._call("close")
        self.writer = None

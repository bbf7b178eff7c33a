"""Faults of the machine during a run, turned into one line that names the rank, where the run stood and the
fix, and an exit code of their own (kdcore.errors): a peer that died or hung, a failed write, a dead loader
worker. The checkpoints already written stay intact, so each ends with "requeue with --resume auto"."""
import os
import re
import traceback

import torch.distributed as dist

from kdcore.distributed import from_main_process
from kdcore.errors import DataWorkerFailure, PeerFailure, StorageFailure

COLLECTIVE_ERROR = re.compile(r"gloo|nccl|Connection (closed|reset) by peer|Timed out waiting|ProcessGroup|"
                              r"watchdog|DistBackendError|pair closure", re.IGNORECASE)
COLLECTIVE_CODE = (f"{os.sep}torch{os.sep}distributed{os.sep}", f"{os.sep}torch{os.sep}nn{os.sep}parallel{os.sep}")


def raised_in_a_collective(exc):
    """Whether torch.distributed (or DDP) raised `exc`, or its message is one of a failed collective's."""
    frames = traceback.extract_tb(exc.__traceback__)
    return (any(part in frame.filename for frame in frames[-3:] for part in COLLECTIVE_CODE)
            or COLLECTIVE_ERROR.search(str(exc)) is not None)


def _first_line(exc):
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def lost_a_loader_worker(exc):
    """Whether `exc` is the DataLoader's report of a dead worker, or came from the worker's half-sent batch (its
    shared-memory handle or queue closed under the reader)."""
    frames = traceback.extract_tb(exc.__traceback__)
    in_data_queue = any(f"{os.sep}multiprocessing{os.sep}" in frame.filename for frame in frames) and any(
        frame.name == "_try_get_data" for frame in frames)
    return "DataLoader worker" in str(exc) or (isinstance(exc, OSError) and in_data_queue)


def as_fault(exc, run):
    """The RunFault `exc` (raised by torch) stands for, or None when it is not a fault of the machine."""
    rank, where = run.env.rank, run.where
    if run.args.workers > 0 and lost_a_loader_worker(exc):
        return DataWorkerFailure(
            f"rank {rank}: a data-loader worker died at {where} ({_first_line(exc)}); most often it ran out of "
            f"memory (RAM, or shared memory in /dev/shm): lower --workers (now {run.args.workers}) or "
            f"--batch-size, then requeue with --resume auto (the checkpoints written so far are intact)")
    if isinstance(exc, dist.DistError) or (run.env.distributed and raised_in_a_collective(exc)):
        return PeerFailure(
            f"rank {rank}: a collective at {where} failed ({_first_line(exc)}): another process died, or hung past "
            f"--dist-timeout {run.args.dist_timeout:g} s (its own output names the cause); the checkpoints written "
            f"so far are intact: requeue with --resume auto")
    return None


def share_write_outcome(run, error, name):
    """After rank 0's writes: every rank learns whether they failed (a collective), and all stop together with
    the same message if they did. `error` is rank 0's OSError (or None); others pass None."""
    message = from_main_process(None if error is None else str(error), run.env)
    if message is not None:
        raise StorageFailure(
            f"rank {run.env.rank}: writing {name} in {run.folder} failed on rank 0 at {run.where} ({message}); the "
            f"earlier checkpoints and summary.csv are intact and no partial file is left: free space (or raise "
            f"the quota) and requeue with --resume auto")

"""The fidelity study's jobs, each forked from one server that imported the job scripts once.

A job run as `python train.py ...` pays about 7 CPU-seconds of imports (torch, torchvision's pull of
torch._dynamo, timm) before its first step; the tiny study's runs take not much more than that. The study
instead starts multiprocessing's fork server with this module preloaded, so it imports the scripts once, and
each job is a fresh process forked from it, running the script's `main(argv)` on one thread (as
`OMP_NUM_THREADS=1` ran each process) with its output going to the job's log. A job is still its own process:
a kill or a SIGTERM reaches it alone, and its exit code is the script's.
"""
import importlib
import multiprocessing
import os
import sys

import torch

import train  # noqa: F401  (what the server preloads: the point of this module)
from tools import build_cache  # noqa: F401


def job_context():
    """The multiprocessing context whose processes are forked from the server with this module imported (the
    server starts at the first job). The server imports the study's main script too: each process multiprocessing
    starts imports its parent's, unless the process it is forked from already has."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", __name__])
    return context


def run_script(script, argv, log_path, cwd):
    """In the job's process: `script`'s main(argv) from `cwd`, stdout and stderr (Python's and the C libraries')
    appended to `log_path`. A SystemExit's code becomes the process's exit code, as for the script itself."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.chdir(cwd)
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # for any process the job starts
    torch.set_num_threads(1)
    sys.argv = [script, *argv]
    module = os.path.relpath(script, cwd).removesuffix(".py").replace(os.sep, ".")  # tools/x.py -> tools.x
    importlib.import_module(module).main(argv)

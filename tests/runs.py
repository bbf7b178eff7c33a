"""Real training processes for the fault tests: the uninterrupted reference runs (one and two processes) that
conftest.py trains once per session, and the means to SIGKILL a run mid-epoch and resume it.

Each reference turns on every RNG stream and counter a resume must restore: augmentation in a loader worker
(RandAugment and random erasing included), timm's batch mixup (numpy's RNG) on one process and sample-paired
Mixup/CutMix on two, stochastic depth (torch's), an EMA, a per-update lr schedule, the teacher's evaluation at
start-up, and recovery checkpoints (--recovery-interval) to resume from mid-epoch. The one-process run
distils a token student (test_vit) with CRD (memory banks, normaliser and a step counter that seeds its
negatives); the two-process run a BatchNorm CNN student (test_resnet) with RSD over the gathered global batch
(its AAD has BatchNorm), two accumulated micro-batches per update (DDP's no_sync), through tests/ddp_states.py
so that every rank saves what it holds.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import torch

from engine.checkpoint import recovery_position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
COMMON = ["--dataset", "synthetic", "--img-size", "32", "--workers", "1", "--synthetic-val-size", "16",
          "--log-interval", "1", "--epochs", "3", "--aa", "rand-m7-mstd0.5", "--reprob", "0.25",
          "--teacher-precision", "fp32", "--drop-path", "0.1", "--mixup", "0.5", "--model-ema", "--model-ema-decay",
          "0.9", "--sched-on-updates", "--warmup-epochs", "0", "--lr", "0.02", "--seed", "3", "--checkpoint-hist", "2"]
# A token student (stochastic depth per block) with CRD; 64 images / batch 8: 8 updates an epoch; recovery
# checkpoints every 3 updates.
ONE_PROCESS = [*COMMON, "--model", "test_vit", "--teacher", "test_resnet", "-b", "8", "--synthetic-train-size", "64",
               "--distiller", "crd", "--crd-k", "32", "--recovery-interval", "3"]
# A BatchNorm CNN student with RSD; 96 images / (2 processes x 4) = 12 micro-batches, 6 updates an epoch; recovery
# checkpoints every 2 updates.
TWO_PROCESSES = [*COMMON, "--model", "test_resnet", "--teacher", "test_vit", "-b", "4", "--grad-accum-steps", "2",
                 "--synthetic-train-size", "96", "--distiller", "rsd", "--recovery-interval", "2",
                 "--mixup-pairing", "sample", "--cutmix", "1.0"]
# torchrun (torch 2.14) exits 1 with a SignalException traceback after it forwarded a SIGTERM, whatever its
# workers' exit codes; the run's PREEMPTED marker says that the stop was a preemption
TORCHRUN_SIGTERM_EXIT = 1
TEACHERS = {1: "test_resnet", 2: "test_vit"}
STEPS_PER_EPOCH = {1: 8, 2: 6}
RECOVERY_INTERVAL = {1: 3, 2: 2}


def _env():
    return dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")


def _command(nproc, script, args):
    return [sys.executable, *(TORCHRUN if nproc == 2 else []), script, *map(str, args)]


def train(nproc, *args, script="train.py", timeout=600):
    """A whole run in its own process(es); returns its stdout, or fails the test with its output (after killing
    every process of a run that took longer than `timeout` s)."""
    proc = subprocess.Popen(_command(nproc, script, args), cwd=REPO, env=_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise AssertionError(f"the run did not end in {timeout} s: {args}") from None
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout


# PAT on the one-process reference's data and schedule: prompts inside the teacher, beta, the aligners' and feedback
# projections' BatchNorms; the feedback is the current batch's, so nothing else must come back on resume.
PAT_ONE_PROCESS = [*ONE_PROCESS[:ONE_PROCESS.index("--distiller")], "--distiller", "pat", "--recovery-interval", "3"]


def reference_args(nproc, teachers, output, method=None):
    """The reference run's train.py arguments: one or two processes, {teacher name: checkpoint}, the output folder;
    `method` "pat": PAT on the one-process reference's data and schedule."""
    base = PAT_ONE_PROCESS if method == "pat" else ONE_PROCESS if nproc == 1 else TWO_PROCESSES
    return [*base, "--teacher-pretrained", teachers[TEACHERS[nproc]], "--output", output]


def process_tree(pid):
    """`pid` and every process under it, found by the parent ids in /proc (torchrun starts its workers in
    sessions of their own, so a process group would miss them)."""
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
    tree = [pid]
    for member in tree:  # grows while walking: children, then theirs
        tree.extend(child for child, parent in parents.items() if parent == member)
    return tree


def kill_tree(proc):
    """SIGKILL `proc` and every process under it, as a crashed node or the OOM killer would."""
    for pid in process_tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def train_and_kill(nproc, args, folder, mark):
    """Start a run writing to `folder` and SIGKILL all its processes once its log shows `mark`."""
    output = folder.parent / f"{folder.name}.out"  # beside the run folder: what the process printed
    with open(output, "w") as out:
        proc = subprocess.Popen(_command(nproc, "train.py", args), cwd=REPO, env=_env(), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT)
        log = folder / "log.txt"
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and not (log.exists() and mark in log.read_text()):
            time.sleep(0.01)
        kill_tree(proc)
    text = log.read_text() if log.exists() else ""
    assert mark in text and "Done:" not in text, ("the kill must land before the run ends, after "
                                                  f"{mark!r}:\n{output.read_text()[-3000:]}")


def copy_run(folder, destination):
    """A copy of a run folder to resume from, leaving the original for other tests."""
    shutil.copytree(folder, destination)
    return destination


def recovery_positions(folder):
    """{(epoch, step): path} of the recovery checkpoints in `folder`."""
    positions = {name: recovery_position(name) for name in os.listdir(folder)}
    return {position: folder / name for name, position in positions.items() if position is not None}


def expected_recovery_positions(nproc, keep=2):
    """Every --recovery-interval-th update of the reference run, except those that end an epoch; the last `keep`."""
    steps, interval = STEPS_PER_EPOCH[nproc], RECOVERY_INTERVAL[nproc]
    updates = range(1, steps * 3 + 1)
    return [divmod(u, steps) for u in updates if u % interval == 0 and u % steps][-keep:]


def last_state(folder):
    return torch.load(folder / "last.pth.tar", weights_only=True)


def assert_same_training_state(reference, resumed, nproc):
    """Weights, EMA and distiller state (banks, AAD statistics) equal tensor for tensor, both at the run's end."""
    end = (2, 3 * STEPS_PER_EPOCH[nproc])
    assert (resumed["epoch"], resumed["global_step"]) == (reference["epoch"], reference["global_step"]) == end
    for key in ("state_dict", "state_dict_ema", "distiller_extra"):
        assert reference[key].keys() == resumed[key].keys(), key
        for name, tensor in reference[key].items():
            assert torch.equal(tensor, resumed[key][name]), f"{key}.{name}"


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """train.py started in the background: 'direct' (one process per rank with MASTER_ADDR/PORT, RANK and
    WORLD_SIZE set, as srun starts them) or 'torchrun' (the launcher, in a session of its own, so that its
    process group is the launcher's alone). Output goes to `log`."""

    def __init__(self, nproc, args, log, launcher="direct", env=None, torchrun_args=()):
        self.launcher, self.log = launcher, open(log, "w")
        base = dict(_env(), **(env or {}))
        if launcher == "torchrun":
            command = [sys.executable, *TORCHRUN[:2], *torchrun_args, *TORCHRUN[2:], "train.py", *map(str, args)]
            self.procs = [subprocess.Popen(command, cwd=REPO, env=base, stdin=subprocess.DEVNULL, stdout=self.log,
                                           stderr=subprocess.STDOUT, start_new_session=True)]
        else:
            port = free_port()
            self.procs = [subprocess.Popen(
                [sys.executable, "train.py", *map(str, args)], cwd=REPO, stdin=subprocess.DEVNULL, stdout=self.log,
                stderr=subprocess.STDOUT, start_new_session=True,
                env=dict(base, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                         WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank))) for rank in range(nproc)]

    def workers(self):
        """{rank: pid} of the training processes."""
        if self.launcher == "direct":
            return {rank: proc.pid for rank, proc in enumerate(self.procs)}
        found = {}
        for pid in process_tree(self.procs[0].pid)[1:]:
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            launcher_or_helper = b"torch.distributed.run" in cmdline or b"multiprocessing" in cmdline
            if b"train.py" in cmdline and b"RANK" in env and not launcher_or_helper:
                found[int(env[b"RANK"])] = pid
        return found

    def every_process(self):
        """The launcher or ranks and everything under them (fork servers, loader workers)."""
        return [pid for proc in self.procs for pid in process_tree(proc.pid)]

    def signal_all(self, sig):
        """`sig` to every process of the run, as SLURM signals every process of a job."""
        for pid in self.every_process():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout):
        """The exit codes, or None for each process still running after `timeout` s."""
        deadline = time.time() + timeout
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(max(deadline - time.time(), 0.1)))
            except subprocess.TimeoutExpired:
                codes.append(None)
        return codes

    def kill(self):
        for proc in self.procs:
            kill_tree(proc)
        self.log.close()


def wait_for(path, text, timeout=300, after=0, procs=()):
    """Wait until `path` holds `text` past its first `after` characters; fails if `procs` all end first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and text in open(path).read()[after:]:
            return
        if procs and all(p.poll() is not None for p in procs):
            raise AssertionError(f"the run ended before {text!r} appeared in {path}")
        time.sleep(0.01)
    raise AssertionError(f"{text!r} did not appear in {path} within {timeout} s")


def alive(pids):
    """Those of `pids` still running (zombies count as gone)."""
    running = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    running.append(pid)
        except OSError:
            pass
    return running

"""Faults of the machine with real processes (gloo on CPU): a hung peer, a full disk during a checkpoint, a
killed loader worker, and a second stop signal. Each ends every process with its documented exit code
(kdcore/errors.py) and one `error:` line naming the rank, and leaves the checkpoints already written intact."""
import os
import re
import signal
import subprocess
import time

import pytest
import runs
import torch

from kdcore.errors import EXIT_DATA_WORKER, EXIT_PEER_FAILED, EXIT_STORAGE

# A vanilla BatchNorm CNN on 96 images, 2 processes x 4: 12 updates an epoch, far more epochs than a test waits for;
# data loaded in the training process (no fork server to start) except where the loader's workers are under test
FAULT_RUN = ["--dataset", "synthetic", "--img-size", "32", "--workers", "0", "--synthetic-train-size", "96",
             "--synthetic-val-size", "16", "--log-interval", "1", "--model", "test_resnet", "-b", "4",
             "--epochs", "40", "--warmup-epochs", "0", "--lr", "0.01"]


def _fault_args(output, name, *extra):
    return [*FAULT_RUN, "--output", output, "--experiment", name, *extra]


def _forkserver_children(pid):
    """The loader workers of training process `pid`: the children of its fork server."""
    servers = [p for p in runs.process_tree(pid)[1:] if b"forkserver" in open(f"/proc/{p}/cmdline", "rb").read()]
    return [p for server in servers[:1] for p in runs.process_tree(server)[1:]]


@pytest.mark.slow
def test_a_hung_peer_ends_the_others_within_the_timeout(tmp_path):
    """One rank frozen by SIGSTOP, --dist-timeout 20: the other exits with code 3 within 35 s, started directly
    and under torchrun (both at once, so the test waits once); nothing is left alive 90 s after."""
    launches = {launcher: runs.Launch(2, _fault_args(tmp_path, launcher, "--dist-timeout", "20"),
                                      tmp_path / f"{launcher}.out", launcher=launcher)
                for launcher in ("direct", "torchrun")}
    everything = []
    try:
        frozen, sent = {}, {}
        for launcher, launch in launches.items():
            runs.wait_for(tmp_path / launcher / "log.txt", "Train: 0 [   2/12", procs=launch.procs)
            frozen[launcher] = launch.workers()[1]
            everything += launch.every_process()
            os.kill(frozen[launcher], signal.SIGSTOP)
            sent[launcher] = time.time()
        for launcher, launch in launches.items():
            out = tmp_path / f"{launcher}.out"
            runs.wait_for(out, "error: rank 0: a collective at epoch 0 step", timeout=sent[launcher] + 35 - time.time())
            line = next(line for line in out.read_text().splitlines() if line.startswith("error: rank 0"))
            assert "--dist-timeout 20 s" in line and "--resume auto" in line
        assert launches["direct"].wait(5)[0] == EXIT_PEER_FAILED
        for launcher in launches:
            os.kill(frozen[launcher], signal.SIGKILL)
        deadline = time.time() + 90
        while runs.alive(everything) and time.time() < deadline:
            time.sleep(0.5)
        assert not runs.alive(everything)
    finally:
        for launch in launches.values():
            launch.kill()


def _mount_small_tmpfs(folder):
    """A real 48 MiB tmpfs at `folder` where this process may mount one (root); False otherwise."""
    folder.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(folder)], capture_output=True)
    return result.returncode == 0


def _fill(folder):
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_stops_every_process_cleanly(tmp_path):
    """Epoch 1's checkpoint write meets a full disk: both processes exit with code 4 and the same message,
    epoch 0's checkpoint still loads, summary.csv holds epoch 0, and no .tmp is left. On a real size-limited
    tmpfs where it can mount one: a test hook holds epoch 1's write of last.pth.tar before its first byte while
    the test fills the disk (so a loaded machine cannot let epoch 1 finish first); else the write call fails
    with ENOSPC through a test hook."""
    disk, flag = tmp_path / "disk", tmp_path / "paused"
    mounted = _mount_small_tmpfs(disk)
    env = {"KD_TEST_PAUSE_WRITE": f"last.pth.tar#2:{flag}"} if mounted else {"KD_TEST_FAIL_WRITE": "last.pth.tar:2"}
    folder = disk / "run"
    try:
        launch = runs.Launch(2, _fault_args(disk, "run"), tmp_path / "run.out", env=env)
        if mounted:
            deadline = time.time() + 300
            while not flag.exists() and time.time() < deadline and launch.procs[0].poll() is None:
                time.sleep(0.01)
            assert flag.exists()
            _fill(disk)
            flag.unlink()
        codes = launch.wait(120)
        launch.kill()
        out = (tmp_path / "run.out").read_text()
        assert codes == [EXIT_STORAGE] * 2, out[-3000:]
        # the two ranks share one output file, so a line of one may start mid-line of the other's (torch's C++
        # warnings are written piecewise): each rank's error is searched for, not each line's start
        errors = dict(re.findall(r"error: rank (\d): (writing the epoch checkpoint [^\n]*)", out))
        assert sorted(errors) == ["0", "1"], out[-3000:]
        assert all("No space left on device" in e and "on rank 0 at the end of epoch 1" in e for e in errors.values())
        assert not [name for name in os.listdir(folder) if name.endswith(".tmp")]
        if mounted:
            os.remove(disk / "filler")
        state = torch.load(folder / "last.pth.tar", weights_only=True)
        assert state["epoch"] == 0
        assert len((folder / "summary.csv").read_text().splitlines()) == 2  # the header and epoch 0
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)])


@pytest.mark.slow
def test_a_killed_loader_worker_ends_a_two_process_run(tmp_path):
    """Rank 1's loader workers SIGKILLed (as the OOM killer does): rank 1 exits with code 5 and a line naming
    --workers, rank 0 with code 3, both within 60 s."""
    launch = runs.Launch(2, _fault_args(tmp_path, "run", "--workers", "1"), tmp_path / "run.out")
    try:
        runs.wait_for(tmp_path / "run" / "log.txt", "Train: 0 [   2/12", procs=launch.procs)
        workers = _forkserver_children(launch.workers()[1])
        assert workers
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        codes = launch.wait(60)
    finally:
        launch.kill()
    out = (tmp_path / "run.out").read_text()
    assert codes == [EXIT_PEER_FAILED, EXIT_DATA_WORKER], out[-3000:]
    assert any(line.startswith("error: rank 1: a data-loader worker died") and "--workers (now 1)" in line
               for line in out.splitlines())


@pytest.mark.slow
def test_a_second_signal_exits_at_once(tmp_path):
    """The first SIGTERM arrives while a recovery checkpoint is being written (a test hook pauses it); a second,
    1.5 s later, ends the process at once with 128 + 15."""
    flag = tmp_path / "paused"
    launch = runs.Launch(1, _fault_args(tmp_path, "run", "-b", "8", "--recovery-interval", "2"),
                         tmp_path / "run.out", env={"KD_TEST_PAUSE_WRITE": f"recovery-0-2:{flag}"})
    try:
        deadline = time.time() + 300
        while not flag.exists() and time.time() < deadline and launch.procs[0].poll() is None:
            time.sleep(0.01)
        assert flag.exists()
        launch.procs[0].send_signal(signal.SIGTERM)
        time.sleep(1.5)
        launch.procs[0].send_signal(signal.SIGTERM)
        sent = time.time()
        codes = launch.wait(10)
        elapsed = time.time() - sent
    finally:
        launch.kill()
    assert codes == [128 + signal.SIGTERM] and elapsed < 5
    assert "stopped at once by a second SIGTERM" in (tmp_path / "run.out").read_text()

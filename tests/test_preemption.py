"""Preemption, restarts and a truncated newest checkpoint, with real processes and real signals (gloo on CPU).

One run of the two-process reference's arguments (tests/runs.py) goes through five launches of the identical
command line with `--resume auto`, each ended differently, and must end bit-identical to the uninterrupted
reference (weights, EMA, distiller state, summary.csv):
1. two directly started processes (as srun starts them) get SIGTERM, every process of the job as SLURM sends it;
2. the same with SIGUSR1 arriving while rank 0 is inside a recovery write (a test hook pauses it there);
   the newest checkpoint is then truncated, so the next launch must warn and fall back to the previous one;
3. torchrun, SIGTERM to the launcher only (it forwards it to its workers);
4. torchrun, SIGTERM to the launcher's process group;
5. torchrun --max-restarts 2, one worker SIGKILLed mid-epoch: the launcher restarts both, which resume from the
   newest recovery checkpoint and finish.
"""
import json
import os
import signal
import time

import pytest
import runs

from kdcore.errors import EXIT_PREEMPTED

STOP_BOUND_S = 30  # one step plus one recovery write, and torchrun's 30 s before it SIGKILLs


def _args(fault_teacher, output):
    return [*runs.reference_args(2, fault_teacher, output), "--experiment", "chain", "--resume", "auto"]


def _stopped(launch, sent_at, expected):
    codes = launch.wait(STOP_BOUND_S)
    elapsed = time.time() - sent_at
    launch.kill()
    assert codes == expected, f"exit codes {codes}: {open(launch.log.name).read()[-3000:]}"
    assert elapsed < STOP_BOUND_S
    return elapsed


@pytest.mark.slow
def test_preempted_restarted_and_truncated_run_matches_uninterrupted(tmp_path, fault_teacher, two_process_reference):
    args, folder = _args(fault_teacher, tmp_path), tmp_path / "chain"
    log = folder / "log.txt"

    def offset():
        return len(log.read_text()) if log.exists() else 0

    # 1. direct start, SIGTERM to every process (ranks, fork servers, loader workers)
    launch = runs.Launch(2, args, tmp_path / "leg1.out")
    runs.wait_for(log, "Train: 0 [   2/6", procs=launch.procs)
    launch.signal_all(signal.SIGTERM)
    _stopped(launch, time.time(), [EXIT_PREEMPTED] * 2)
    marker = json.loads((folder / "PREEMPTED").read_text())
    assert marker["signal"] == "SIGTERM" and marker["epoch"] == 0 and os.path.exists(marker["checkpoint"])

    # 2. direct start, SIGUSR1 while rank 0 writes epoch 1's first recovery checkpoint
    flag, start = tmp_path / "paused", offset()
    launch = runs.Launch(2, args, tmp_path / "leg2.out", env={"KD_TEST_PAUSE_WRITE": f"recovery-1-2:{flag}"})
    runs.wait_for(log, "--resume auto: continuing from", after=start, procs=launch.procs)
    deadline = time.time() + 300
    while not flag.exists() and time.time() < deadline:
        time.sleep(0.01)
    launch.signal_all(signal.SIGUSR1)
    sent = time.time()
    flag.unlink()
    _stopped(launch, sent, [EXIT_PREEMPTED] * 2)
    assert "Stopped by SIGUSR1 at epoch 1 step 2" in log.read_text()[start:]
    newest = folder / "recovery-1-2.pth.tar"
    newest.write_bytes(newest.read_bytes()[:1000])  # a node lost mid-write

    # 3. torchrun, SIGTERM to the launcher alone
    start = offset()
    launch = runs.Launch(2, args, tmp_path / "leg3.out", launcher="torchrun")
    runs.wait_for(log, "Train: 1 [   4/6", after=start, procs=launch.procs)
    text = log.read_text()[start:]
    assert f"--resume auto skips {newest}" in text and "continuing from" in text and "last.pth.tar" in text
    launch.procs[0].send_signal(signal.SIGTERM)
    _stopped(launch, time.time(), [runs.TORCHRUN_SIGTERM_EXIT])
    assert "Stopped by SIGTERM" in log.read_text()[start:]

    # 4. torchrun, SIGTERM to the launcher's process group
    start = offset()
    launch = runs.Launch(2, args, tmp_path / "leg4.out", launcher="torchrun")
    runs.wait_for(log, "Train: 2 [   1/6", after=start, procs=launch.procs)
    os.killpg(launch.procs[0].pid, signal.SIGTERM)
    _stopped(launch, time.time(), [runs.TORCHRUN_SIGTERM_EXIT])
    assert "Stopped by SIGTERM" in log.read_text()[start:]

    # 5. torchrun --max-restarts 2, one worker SIGKILLed: the restarted workers finish the run
    start = offset()
    launch = runs.Launch(2, args, tmp_path / "leg5.out", launcher="torchrun", torchrun_args=["--max-restarts", "2"])
    runs.wait_for(log, "Train: 2 [   3/6", after=start, procs=launch.procs)
    os.kill(launch.workers()[1], signal.SIGKILL)
    codes = launch.wait(300)
    launch.kill()
    assert codes == [0], open(launch.log.name).read()[-3000:]
    text = log.read_text()[start:]
    assert text.count("--resume auto: continuing from") == 2 and "Done:" in text
    # the survivor, told to stop by torchrun while its peer is gone, writes nothing and exits with code 3
    assert "error: rank 0: a collective at" in open(launch.log.name).read()

    reference = two_process_reference
    runs.assert_same_training_state(runs.last_state(reference), runs.last_state(folder), 2)
    assert (reference / "summary.csv").read_text() == (folder / "summary.csv").read_text()
    assert sorted(runs.recovery_positions(folder)) == runs.expected_recovery_positions(2)
    assert not (folder / "PREEMPTED").exists()

"""--recovery-interval: a run SIGKILLed mid-epoch and resumed from its latest recovery checkpoint ends with the
weights, EMA, distiller state and summary of an uninterrupted run, bit for bit, with 1 and 2 processes; the
last --checkpoint-hist recovery files are kept."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO

TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# Augmentation, mixup (numpy's RNG), stochastic depth (torch's), EMA, a per-update lr schedule, a loader worker
# and the teacher's evaluation at start-up: every RNG stream and counter matters.
COMMON = ["--dataset", "synthetic", "--img-size", "32", "--workers", "1", "--synthetic-val-size", "16",
          "--log-interval", "1", "--epochs", "3", "--model", "test_vit", "--teacher", "test_resnet",
          "--teacher-precision", "fp32", "--drop-path", "0.1", "--mixup", "0.5", "--model-ema", "--model-ema-decay",
          "0.9", "--sched-on-updates", "--warmup-epochs", "0", "--lr", "0.02", "--seed", "3",
          "--recovery-interval", "3", "--checkpoint-hist", "2"]
RECOVERY_FILE = re.compile(r"recovery-(\d+)-(\d+)\.pth\.tar")


def _recovery_positions(folder):
    """{(epoch, step): path} of the recovery checkpoints in `folder`."""
    return {(int(m[1]), int(m[2])): folder / m[0] for m in map(RECOVERY_FILE.fullmatch, os.listdir(folder)) if m}


def _expected_positions(steps_per_epoch, epochs, interval, keep):
    """Every `interval`-th update of the run, except those that end an epoch; the last `keep` of them."""
    updates = range(1, steps_per_epoch * epochs + 1)
    return [divmod(u, steps_per_epoch) for u in updates if u % interval == 0 and u % steps_per_epoch][-keep:]


def _process_tree(pid):
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


def _kill_tree(proc):
    for pid in _process_tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _env():
    return dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")


def _train(launcher, *args):
    result = subprocess.run([sys.executable, *launcher, "train.py", *map(str, args)], cwd=REPO, env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def kill_mid_epoch_then_resume(tmp_path, launcher, args, steps_per_epoch, kill_after_step):
    """Train uninterrupted; train again, SIGKILL it once epoch 1 logged `kill_after_step`, and resume it from its
    latest recovery checkpoint. Returns (reference's last.pth.tar, resumed one's, reference folder, killed folder)."""
    _train(launcher, *args, "--output", tmp_path, "--experiment", "reference")
    folder = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *launcher, "train.py", *map(str, args), "--output", str(tmp_path),
                             "--experiment", "killed"], cwd=REPO, env=_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, mark = folder / "log.txt", f"Train: 1 [{kill_after_step:>4d}/{steps_per_epoch}"
    deadline = time.time() + 600
    while time.time() < deadline and not (log.exists() and mark in log.read_text()):
        time.sleep(0.01)
    _kill_tree(proc)
    assert mark in log.read_text() and "Done:" not in log.read_text()
    assert torch.load(folder / "last.pth.tar", weights_only=True)["epoch"] == 0, "the kill must land in epoch 1"

    (epoch, step), latest = max(_recovery_positions(folder).items())
    assert epoch == 1 and 0 < step < steps_per_epoch
    resumed = _train(launcher, "--resume", latest)  # the run's own arguments come back
    assert f"continuing at epoch 1 after step {step}" in resumed
    first_step = re.search(r"Train: 1 \[ *(\d+)/(\d+)", resumed)
    assert first_step and (int(first_step[1]), int(first_step[2])) == (step + 1, steps_per_epoch)
    reference, resumed_state = (torch.load(f / "last.pth.tar", weights_only=True)
                                for f in (tmp_path / "reference", folder))
    assert resumed_state["global_step"] == reference["global_step"] == 3 * steps_per_epoch
    return reference, resumed_state, tmp_path / "reference", folder


def _assert_same_run(reference, resumed, ref_folder, folder, positions):
    for key in ("state_dict", "state_dict_ema", "distiller_extra"):
        assert reference[key].keys() == resumed[key].keys()
        for name, tensor in reference[key].items():
            assert torch.equal(tensor, resumed[key][name]), f"{key}.{name}"
    # The epoch's loss sums come back with the recovery checkpoint, so even the killed epoch's row agrees.
    assert (ref_folder / "summary.csv").read_text() == (folder / "summary.csv").read_text()
    assert sorted(_recovery_positions(ref_folder)) == positions
    assert sorted(_recovery_positions(folder)) == positions


@pytest.mark.slow
def test_one_process_killed_between_recovery_checkpoints_matches_uninterrupted(tmp_path, saved_weights):
    """CRD: its memory banks, normaliser and step counter (which seeds its negatives) must come back too."""
    teacher = saved_weights("test_resnet", num_classes=10)
    args = [*COMMON, "-b", "8", "--synthetic-train-size", "64", "--distiller", "crd", "--crd-k", "32",
            "--teacher-pretrained", teacher]
    reference, resumed, ref_folder, folder = kill_mid_epoch_then_resume(tmp_path, [], args, 8, kill_after_step=5)
    assert {"memory_student", "memory_teacher", "z", "step"} <= set(reference["distiller_extra"])
    _assert_same_run(reference, resumed, ref_folder, folder, _expected_positions(8, 3, interval=3, keep=2))


@pytest.mark.slow
def test_two_processes_killed_between_recovery_checkpoints_match_uninterrupted(tmp_path, saved_weights):
    """RSD over the gathered global batch (its AAD has BatchNorm), with 2 accumulated micro-batches per update
    (DDP's no_sync) and per-rank augmentation: 96 images / (2 processes x 4) = 12 micro-batches, 6 updates."""
    teacher = saved_weights("test_resnet", num_classes=10)
    args = [*COMMON, "-b", "4", "--grad-accum-steps", "2", "--synthetic-train-size", "96", "--distiller", "rsd",
            "--teacher-pretrained", teacher, "--recovery-interval", "2"]
    reference, resumed, ref_folder, folder = kill_mid_epoch_then_resume(tmp_path, TORCHRUN, args, 6,
                                                                        kill_after_step=3)
    _assert_same_run(reference, resumed, ref_folder, folder, _expected_positions(6, 3, interval=2, keep=2))

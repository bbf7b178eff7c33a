"""DESIGN.md §7: a run killed with SIGKILL mid-epoch, resumed from last.pth.tar, ends with the same weights."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run_cli

# Augmentation on and a loader worker, so RNG streams in the main process and the workers both matter.
ARGS = ["--dataset", "synthetic", "--img-size", "32", "--workers", "1", "-b", "16", "--synthetic-train-size", "320",
        "--synthetic-val-size", "32", "--log-interval", "1", "--epochs", "3", "--lr", "0.02", "--seed", "7"]


def _state(folder):
    return torch.load(os.path.join(folder, "last.pth.tar"), weights_only=True)


def kill_in_epoch_1_then_resume(tmp_path, args):
    """(uninterrupted run's last checkpoint, killed-and-resumed run's last checkpoint, its folder)."""
    reference = run_cli("train.py", *args, "--output", tmp_path, "--experiment", "reference")
    assert reference.returncode == 0, reference.stderr[-2000:]

    folder = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "train.py", *map(str, args), "--output", str(tmp_path), "--experiment",
                             "killed"], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    log = folder / "log.txt"
    while time.time() < deadline:  # wait until epoch 1 is under way (epoch 0's checkpoint is on disk)
        if log.exists() and "Train: 1 [   5/20" in log.read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _state(folder)["epoch"] == 0, "the kill must land in epoch 1, after epoch 0's checkpoint"
    assert "Train: 1 [  20/20" not in log.read_text()

    resumed = run_cli("train.py", "--resume", folder / "last.pth.tar")  # the run's own arguments come back
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resumed from" in resumed.stdout and "continuing at epoch 1" in resumed.stdout
    ref, res = _state(tmp_path / "reference"), _state(folder)
    assert res["epoch"] == ref["epoch"] == 2 and res["global_step"] == ref["global_step"] == 60
    return ref, res, folder


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    """A BatchNorm student with mixup, EMA and a loader worker."""
    ref, res, folder = kill_in_epoch_1_then_resume(
        tmp_path, [*ARGS, "--model", "resnet18", "--mixup", "0.2", "--model-ema", "--model-ema-decay", "0.9"])
    for key in ("state_dict", "state_dict_ema"):
        for name, tensor in ref[key].items():
            assert torch.equal(tensor, res[key][name]), f"{key}.{name}"
    summary = (folder / "summary.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in summary[1:]] == ["0", "1", "2"]
    assert (tmp_path / "reference" / "summary.csv").read_text().splitlines()[1:] == summary[1:]


@pytest.mark.slow
def test_crd_killed_and_resumed_keeps_its_banks(tmp_path, saved_weights):
    """CRD's memory banks, normaliser and step counter come back with the weights (issue: the zoo's state)."""
    teacher = saved_weights("resnet18", num_classes=10)
    ref, res, _ = kill_in_epoch_1_then_resume(
        tmp_path, [*ARGS, "--model", "deit_tiny_patch16_224", "--distiller", "crd", "--teacher", "resnet18",
                   "--teacher-pretrained", teacher, "--crd-k", "64", "--teacher-precision", "fp32",
                   "--no-eval-teacher"])
    assert set(ref["distiller_extra"]) >= {"memory_student", "memory_teacher", "z", "step"}
    for key in ("state_dict", "distiller_extra"):
        for name, tensor in ref[key].items():
            assert torch.equal(tensor, res[key][name]), f"{key}.{name}"
    assert int(res["distiller_extra"]["step"]) == 60

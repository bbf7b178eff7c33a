"""The RSD paper's command lines (its code's torch.distributed.launch train.py line and validate.py line) run as
written on a generated CIFAR-100 folder."""
import json
import os
import subprocess
import sys

import pytest
import torch
from cifar_format import write_cifar100
from conftest import REPO, run_main

SHRINK = ["--epochs", "1", "-b", "4", "--workers", "0", "--log-interval", "1"]


@pytest.mark.slow
def test_distributed_launch_seed_command_with_our_teacher(tmp_path):
    data = write_cifar100(tmp_path / "cifar100", n_train=16, n_test=8)
    # A Swin-T teacher saved by this repo: a short vanilla run at the paper's 224 px.
    teacher_run = run_main("train.py", data, "--config", "configs/cifar/cnn.yaml", "--model",
                          "swin_tiny_patch4_window7_224", "--num-classes", "100", "--distiller", "vanilla",
                          *SHRINK, "-b", "8", "--output", tmp_path / "runs", "--experiment", "teacher")
    assert teacher_run.returncode == 0, teacher_run.stderr[-2000:]
    teacher_ckpt = tmp_path / "runs" / "teacher" / "student_last.pth"

    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2", "train.py", data,
           "--config", "configs/cifar/cnn.yaml", "--model", "resnet18", "--teacher", "swin_tiny_patch4_window7_224",
           "--teacher-pretrained", str(teacher_ckpt), "--num-classes", "100", "--distiller", "rsd",
           *SHRINK, "--output", str(tmp_path / "runs"), "--experiment", "seed"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (tmp_path / "runs" / "seed" / "log.txt").read_text()
    assert "2 process(es)" in log and "Data: cifar100" in log and "input (3, 224, 224)" in log
    assert "Distiller rsd: 1,312,768 extra trainable parameters" in log  # Figure 3, ResNet18 <- Swin-T, 100 classes
    assert "Train: 0 [   2/2" in log and "Eval: 0" in log and "Done:" in log
    checkpoint = torch.load(tmp_path / "runs" / "seed" / "last.pth.tar", weights_only=True)
    assert checkpoint["args"]["lr"] == 0.05 and checkpoint["args"]["weight_decay"] == 2e-3  # from cnn.yaml
    assert not any(k.startswith("teacher") for k in checkpoint["state_dict"])

    # validate.py in the seed's form scores the teacher as train.py did at start-up
    scored = run_main("validate.py", data, "--dataset", "cifar100", "--num-classes", "100", "--model",
                      "swin_tiny_patch4_window7_224", "--checkpoint", teacher_ckpt, "--workers", "0")
    assert scored.returncode == 0, scored.stderr[-2000:]
    line = json.loads(scored.stdout.strip().splitlines()[-1])
    assert line["num_samples"] == 8 and line["param_count"] == 27_596_254

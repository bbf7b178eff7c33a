"""The offline demo: `bash train.sh` (shortened to one epoch) and the shipped teacher's recorded accuracy."""
import json
import os
import re
import subprocess

import pytest

from conftest import REPO, run_cli

pytestmark = pytest.mark.usefixtures("fashion_mnist")
TEACHER = "pretrained/convnext_demo_32_fmnist.pth"


def recorded_teacher_top1():
    text = open(os.path.join(REPO, "pretrained", "README.md")).read()
    return float(re.search(r"top-1 (\d+\.\d+)\*\*", text).group(1))


def validate(*args):
    result = run_cli("validate.py", *args, "--workers", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_shipped_teacher_matches_its_readme():
    assert os.path.getsize(os.path.join(REPO, TEACHER)) <= 20 * 2 ** 20
    scored = validate("--dataset", "fashion_mnist", "--model", "convnext_demo_32", "--checkpoint", TEACHER)
    assert scored["num_samples"] == 10000
    assert abs(scored["top1"] - recorded_teacher_top1()) <= 0.1


@pytest.mark.slow
def test_demo_command_summary_and_validate_agree(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    result = subprocess.run(["bash", "train.sh", "--epochs", "1", "--output", str(tmp_path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    done = re.search(r"Done: teacher top-1 ([\d.]+) \| student top-1 ([\d.]+) .*\| epochs 1 \| wall \S+ \| "
                     r"output (\S+)", result.stdout)
    assert done, result.stdout[-2000:]
    teacher_top1, student_top1, folder = float(done.group(1)), float(done.group(2)), done.group(3)
    assert abs(teacher_top1 - recorded_teacher_top1()) <= 0.1
    assert student_top1 > 40  # ten classes: far above chance after one epoch over the 15,000-image subset
    assert re.search(r"Train: 0 \[ 100/117 .* ETA epoch \d+:\d\d:\d\d run \d+:\d\d:\d\d", result.stdout)
    assert os.path.isfile(os.path.join(folder, "last.pth.tar"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(folder))
    scored = validate("--checkpoint", os.path.join(folder, "last.pth.tar"))
    assert abs(scored["top1"] - student_top1) <= 0.1

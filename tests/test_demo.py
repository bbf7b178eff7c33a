"""The offline demo: `bash train.sh` on fewer steps, its summary line, the shipped teacher's recorded accuracy,
and validate.py's agreement with the summary."""
import json
import os
import re
import subprocess

import pytest
from conftest import REPO, run_main

pytestmark = pytest.mark.usefixtures("fashion_mnist")
TEACHER = "pretrained/convnext_demo_32_fmnist.pth"
STEPS = 10  # a class-balanced 1,280 of the demo's images at its batch of 128


def recorded_teacher_top1(section="## Shipped: the offline demo's teacher"):
    text = open(os.path.join(REPO, "pretrained", "README.md")).read()
    text = text[text.index(section):]
    return float(re.search(r"top-1 (\d+\.\d+)\*\*", text).group(1))


@pytest.mark.slow
def test_shipped_token_teacher_scores_its_readme_figure():
    """validate.py on the fidelity study's token teacher, as pretrained/README.md tells a user to run it, gives
    the test top-1 that README records (the full 10,000 test images)."""
    path = "pretrained/swin_demo_32_fmnist.pth"
    assert os.path.getsize(os.path.join(REPO, path)) <= 20 * 2 ** 20
    scored = run_main("validate.py", "--dataset", "fashion_mnist", "--model", "swin_demo_32", "--checkpoint", path,
                      "--workers", "1")
    assert scored.returncode == 0, scored.stderr[-2000:]
    record = json.loads(scored.stdout.strip().splitlines()[-1])
    expected = recorded_teacher_top1("## Shipped: the fidelity study's token teacher")
    assert record["num_samples"] == 10000 and abs(record["top1"] - expected) <= 0.01


@pytest.mark.slow
def test_demo_command_learns_from_its_teacher_and_validate_agrees(tmp_path):
    """The demo's own command (train.sh, its config, the shipped teacher) on 10 steps instead of 4 epochs.

    A broken demo fails here: a teacher that is not the shipped one misses its README top-1 (scored on the
    full 10,000-image test set by the run itself); a distillation that does not train leaves RSD's logged term
    flat (it falls by ~19% over these steps: 29.1 to 23.7 on an Intel Xeon, 2026-12-02); a checkpoint that is
    not what was evaluated disagrees with validate.py. ~27 s on the Xeon, ~80 s expected on the AVX2-only EPYC:
    three passes over the 10,000 test images (teacher, student, validate.py) are most of it, and the
    teacher's README figure is a full-test-set figure.
    """
    assert os.path.getsize(os.path.join(REPO, TEACHER)) <= 20 * 2 ** 20
    env = dict(os.environ, OMP_NUM_THREADS="2")
    result = subprocess.run(["bash", "train.sh", "--epochs", "1", "--train-subset", str(STEPS * 128),
                             "--log-interval", "1", "--output", str(tmp_path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    done = re.search(r"Done: teacher top-1 ([\d.]+) \| student top-1 ([\d.]+) .*\| epochs 1 \| wall \S+ \| "
                     r"output (\S+)", result.stdout)
    assert done, result.stdout[-2000:]
    teacher_top1, student_top1, folder = float(done.group(1)), float(done.group(2)), done.group(3)
    assert abs(teacher_top1 - recorded_teacher_top1()) <= 0.1
    assert re.search(rf"Train: 0 \[  {STEPS}/{STEPS} .* ETA epoch \d+:\d\d:\d\d run \d+:\d\d:\d\d", result.stdout)
    rsd = [float(v) for v in re.findall(r"Train: 0 .* rsd ([\d.]+) ", result.stdout)]  # running means
    assert len(rsd) == STEPS and rsd[-1] < 0.9 * rsd[0], rsd
    assert os.path.isfile(os.path.join(folder, "last.pth.tar"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(folder))
    scored = run_main("validate.py", "--checkpoint", os.path.join(folder, "last.pth.tar"), "--workers", "1")
    assert scored.returncode == 0, scored.stderr[-2000:]
    record = json.loads(scored.stdout.strip().splitlines()[-1])
    assert record["num_samples"] == 10000 and abs(record["top1"] - student_top1) <= 0.1

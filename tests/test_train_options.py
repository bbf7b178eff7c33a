"""train.py flags beyond the defaults: precision, memory format, EMA, the start-up report."""
import re

import pytest

from conftest import SMALL_RUN, run_cli


def train(tmp_path, *args):
    result = run_cli("train.py", *SMALL_RUN, "--epochs", "1", "--output", tmp_path, "--experiment", "run", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_startup_report_swin_nano_from_convnext_tiny_gamma_4(tmp_path, saved_weights):
    """Figure 3 (224 px, 1000 classes): RSD with gamma 4 adds 2,625,536 parameters to Swin-N (9.60M)."""
    teacher = saved_weights("convnext_tiny", num_classes=1000)
    out = train(tmp_path, "--model", "swin_nano_patch4_window7_224", "--teacher", "convnext_tiny",
                "--teacher-pretrained", teacher, "--distiller", "rsd", "--rsd-gamma", "4", "--num-classes", "1000",
                "--no-eval-teacher", "--synthetic-train-size", "16", "--synthetic-val-size", "16", "--img-size", "224")
    assert "Student swin_nano_patch4_window7_224: 9,599,940 parameters" in out
    assert "Distiller rsd: 2,625,536 extra trainable parameters (0.273x the student)" in out


@pytest.mark.parametrize("flags", [
    ["--amp"],
    ["--teacher-precision", "bf16", "--channels-last"],
    ["--model-ema", "--model-ema-decay", "0.9", "0.99"],
])
def test_kd_runs_with(tmp_path, saved_weights, flags):
    out = train(tmp_path, "--distiller", "kd", "--teacher", "resnet18", "--teacher-pretrained",
                saved_weights("resnet18"), *flags)
    loss = float(re.search(r"Train: 0 \[   4/4 .*?loss ([\d.]+)", out).group(1))
    assert 0 < loss < 100
    if "--model-ema" in flags:
        assert "ema0.9_top1" in out and "ema0.99_top1" in out


def test_fp16_amp_on_cpu_is_refused(tmp_path):
    result = run_cli("train.py", *SMALL_RUN, "--amp", "--amp-dtype", "float16", "--output", tmp_path / "runs")
    assert result.returncode == 2 and "--amp-dtype float16 is not supported on CPU" in result.stderr

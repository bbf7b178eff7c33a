"""train.py flags beyond the defaults: precision, memory format, EMA, the start-up report."""
import re

import pytest
import torch

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
    start = saved_weights("resnet18", filename="start.pth")
    out = train(tmp_path, "--distiller", "kd", "--teacher", "resnet18", "--teacher-pretrained",
                saved_weights("resnet18"), "--initial-checkpoint", start, *flags)
    loss = float(re.search(r"Train: 0 \[   4/4 .*?loss ([\d.]+)", out).group(1))
    assert 0 < loss < 100
    before, after = torch.load(start, weights_only=True), torch.load(tmp_path / "run" / "student_last.pth",
                                                                     weights_only=True)
    assert not torch.equal(before["fc.weight"], after["fc.weight"]), "training must move the weights"
    if "--model-ema" in flags:
        assert "ema0.9_top1" in out and "ema0.99_top1" in out


def test_fp16_amp_on_cpu_is_refused(tmp_path):
    result = run_cli("train.py", *SMALL_RUN, "--amp", "--amp-dtype", "float16", "--output", tmp_path / "runs")
    assert result.returncode == 2 and "--amp-dtype float16 is not supported on CPU" in result.stderr


def test_bf16_step_agrees_with_fp32():
    """One KD step with the student under bf16 autocast and a bf16 teacher moves the weights as fp32 does:
    the loss within 2% and the weight update within 10% (relative norm of the difference)."""
    from types import SimpleNamespace
    from distillers import DistillerContext, build_distiller
    from engine.batch import Batch
    from engine.features import FeatureRequest
    from engine.loop import train_step
    from engine.models import create_model
    from engine.precision import autocast_factory
    from engine.teacher import FrozenSource
    from timm.optim import create_optimizer_v2

    torch.manual_seed(0)
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    teacher_model = create_model("resnet18", num_classes=10, img_size=32)
    args = SimpleNamespace(gt_loss_weight=1.0, kd_loss_weight=1.0, kd_temperature=4.0)
    results = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(1)
        student = create_model("resnet18", num_classes=10, img_size=32)
        start = {k: v.clone() for k, v in student.state_dict().items()}
        context = DistillerContext(args=args, gt_criterion=torch.nn.CrossEntropyLoss(), num_classes=10,
                                   teacher=teacher_model)
        distiller = build_distiller("kd", student, context).train()
        teacher = FrozenSource(teacher_model, FeatureRequest(logits=True), "cpu", precision)
        optimizer = create_optimizer_v2(distiller, opt="sgd", lr=0.1, momentum=0.9)
        autocast = autocast_factory(torch.device("cpu"), None if precision == "fp32" else torch.bfloat16)
        batch = Batch(images=images, targets=labels, labels=labels, index=torch.arange(16))
        loss, _ = train_step(distiller, teacher, optimizer, batch, autocast=autocast)
        update = torch.cat([(v - start[k]).flatten() for k, v in student.state_dict().items()
                            if v.is_floating_point()])
        results[precision] = (loss.item(), update)
    (loss32, update32), (loss16, update16) = results["fp32"], results["bf16"]
    assert torch.isfinite(torch.tensor(loss16)) and update16.norm() > 0
    assert abs(loss16 - loss32) <= 0.02 * abs(loss32)
    assert (update16 - update32).norm() <= 0.1 * update32.norm()

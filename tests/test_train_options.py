"""train.py flags beyond the defaults: precision, memory format, EMA, the start-up report."""
import re

import pytest
import torch
from conftest import SMALL_RUN, run_main

from distillers.base import Distiller
from engine.sources import FrozenSource


def channels_last(tensor):
    return tensor.is_contiguous(memory_format=torch.channels_last)


@pytest.fixture
def seen(monkeypatch):
    """What each training step saw, recorded in this process: for the student step (the distiller's forward),
    the autocast state and dtype, whether the batch and every conv weight of the student were channels_last,
    and the dtype of the student's logits; for the teacher, the dtype of its own logits inside the frozen
    source (before the fp32 copy the distiller gets)."""
    records = {"student": [], "teacher": []}
    distiller_forward, source_features = Distiller.forward, FrozenSource.features

    def forward(self, batch, teacher_feats=None, source_feats=None):
        convs = [m.weight for m in self.student.modules() if isinstance(m, torch.nn.Conv2d)]
        state = {"autocast": torch.is_autocast_enabled("cpu"), "dtype": torch.get_autocast_dtype("cpu"),
                 "images_channels_last": channels_last(batch.images),
                 "weights_channels_last": bool(convs) and all(channels_last(w) for w in convs)}
        logits, losses = distiller_forward(self, batch, teacher_feats, source_feats)
        records["student"].append({**state, "logits": logits.dtype})
        return logits, losses

    def features(self, images):
        computed = source_features(self, images)
        records["teacher"].append(computed.logits.dtype if computed.logits is not None else None)
        return computed

    monkeypatch.setattr(Distiller, "forward", forward)
    monkeypatch.setattr(FrozenSource, "features", features)
    return records


def train(tmp_path, *args):
    result = run_main("train.py", *SMALL_RUN, "--epochs", "1", "--output", tmp_path, "--experiment", "run", *args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_startup_report_swin_nano_from_convnext_tiny_gamma_4(tmp_path, saved_weights):
    """Figure 3 (224 px, 1000 classes): RSD with gamma 4 adds 2,625,536 parameters to Swin-N (9.60M)."""
    teacher = saved_weights("convnext_tiny", num_classes=1000)
    out = train(tmp_path, "--model", "swin_nano_patch4_window7_224", "--teacher", "convnext_tiny",
                "--teacher-pretrained", teacher, "--distiller", "rsd", "--rsd-gamma", "4", "--num-classes", "1000",
                "--no-eval-teacher", "--synthetic-train-size", "16", "--synthetic-val-size", "16", "--img-size", "224")
    assert "Student swin_nano_patch4_window7_224: 9,599,940 parameters" in out
    assert "Distiller rsd: 2,625,536 extra trainable parameters (0.273x the student)" in out


def kd_run(tmp_path, saved_weights, *flags):
    """One epoch (4 steps) of KD, ResNet18 from ResNet18 at 32 px; checks the logged loss and that the student's
    weights moved, and returns the log."""
    start = saved_weights("resnet18", filename="start.pth")
    out = train(tmp_path, "--distiller", "kd", "--teacher", "resnet18", "--teacher-pretrained",
                saved_weights("resnet18"), "--initial-checkpoint", start, *flags)
    loss = float(re.search(r"Train: 0 \[   4/4 .*?loss ([\d.]+)", out).group(1))
    assert 0 < loss < 100
    before, after = torch.load(start, weights_only=True), torch.load(tmp_path / "run" / "student_last.pth",
                                                                     weights_only=True)
    assert not torch.equal(before["fc.weight"], after["fc.weight"]), "training must move the weights"
    return out


@pytest.mark.bf16
def test_amp_runs_the_student_step_under_bf16_autocast(tmp_path, saved_weights, seen):
    kd_run(tmp_path, saved_weights, "--amp")
    assert len(seen["student"]) == 4
    for step in seen["student"]:
        assert step["autocast"] and step["dtype"] == torch.bfloat16, step
        assert step["logits"] == torch.bfloat16, step  # the student really computed in bf16
        assert not step["images_channels_last"] and not step["weights_channels_last"], step


@pytest.mark.bf16
def test_bf16_teacher_and_channels_last(tmp_path, saved_weights, seen):
    kd_run(tmp_path, saved_weights, "--teacher-precision", "bf16", "--channels-last")
    assert seen["teacher"] == [torch.bfloat16] * 4, seen["teacher"]  # the teacher's own output, inside the source
    assert len(seen["student"]) == 4
    for step in seen["student"]:
        assert step["images_channels_last"] and step["weights_channels_last"], step
        assert not step["autocast"] and step["logits"] == torch.float32, step  # no --amp: the student stays fp32


def test_two_model_emas(tmp_path, saved_weights, seen):
    out = kd_run(tmp_path, saved_weights, "--model-ema", "--model-ema-decay", "0.9", "0.99")
    assert "ema0.9_top1" in out and "ema0.99_top1" in out
    assert all(not step["autocast"] and step["logits"] == torch.float32 for step in seen["student"])
    checkpoint = torch.load(tmp_path / "run" / "last.pth.tar", weights_only=True)
    student = checkpoint["state_dict"]["fc.weight"]
    ema_fast, ema_slow = (state["module.fc.weight"] for state in checkpoint["ema_states"])
    # 4 updates, the first copies the model: each EMA lags the student, and the two decays differ
    assert not torch.equal(ema_fast, student) and not torch.equal(ema_slow, student)
    assert not torch.equal(ema_slow, ema_fast)


def test_fp16_amp_on_cpu_is_refused(tmp_path):
    result = run_main("train.py", *SMALL_RUN, "--amp", "--amp-dtype", "float16", "--output", tmp_path / "runs")
    assert result.returncode == 2 and "--amp-dtype float16 is not supported on CPU" in result.stderr


@pytest.mark.bf16
def test_bf16_step_agrees_with_fp32(seen):
    """One KD step with the student under bf16 autocast and a bf16 teacher moves the weights as fp32 does:
    the loss within 2% and the weight update within 10% (relative norm of the difference). Both really ran in
    bf16: the autocast inside the student step, the teacher's own logits inside the source."""
    from types import SimpleNamespace

    from timm.optim import create_optimizer_v2

    from distillers import build_distiller
    from engine.loop import train_step
    from engine.models import create_model
    from kdcore.batch import Batch
    from kdcore.features import FeatureRequest
    from kdcore.precision import autocast_factory

    torch.manual_seed(0)
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    teacher_model = create_model("resnet18", num_classes=10, img_size=32)
    args = SimpleNamespace(gt_loss_weight=1.0, kd_loss_weight=1.0, kd_temperature=4.0, logit_stand=False,
                           distiller="kd", seed=0)
    results = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(1)
        student = create_model("resnet18", num_classes=10, img_size=32)
        start = {k: v.clone() for k, v in student.state_dict().items()}
        distiller = build_distiller(args, student, teacher=teacher_model, num_classes=10).train()
        teacher = FrozenSource(teacher_model, FeatureRequest(logits=True), "cpu", precision)
        optimizer = create_optimizer_v2(distiller, opt="sgd", lr=0.1, momentum=0.9)
        autocast = autocast_factory(torch.device("cpu"), None if precision == "fp32" else torch.bfloat16)
        batch = Batch(images=images, targets=labels, labels=labels, index=torch.arange(16))
        seen["student"].clear()
        seen["teacher"].clear()
        loss, _ = train_step(distiller, teacher, optimizer, batch, autocast=autocast)
        (student_step,), teacher_dtypes = seen["student"], seen["teacher"]
        if precision == "bf16":
            assert student_step["autocast"] and student_step["dtype"] == torch.bfloat16, student_step
            assert student_step["logits"] == torch.bfloat16 and teacher_dtypes == [torch.bfloat16]
        else:
            assert not student_step["autocast"] and student_step["logits"] == torch.float32, student_step
            assert teacher_dtypes == [torch.float32]
        update = torch.cat([(v - start[k]).flatten() for k, v in student.state_dict().items()
                            if v.is_floating_point()])
        results[precision] = (loss.item(), update)
    (loss32, update32), (loss16, update16) = results["fp32"], results["bf16"]
    assert torch.isfinite(torch.tensor(loss16)) and update16.norm() > 0
    assert abs(loss16 - loss32) <= 0.02 * abs(loss32)
    assert (update16 - update32).norm() <= 0.1 * update32.norm()

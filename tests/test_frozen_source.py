"""Frozen sources: input remapping to their own statistics and size, precision choice, frozen for good."""
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.models import create_model
from engine.sources import FrozenSource, build_frozen_teacher
from kdcore.errors import UserError
from kdcore.features import FeatureRequest, extract_features
from kdcore.precision import autocast_context, resolve_teacher_precision
from kdcore.sources import InputSpec

CPU = torch.device("cpu")
LOGITS = FeatureRequest()
STUDENT = InputSpec.of((0.5, 0.4, 0.3), (0.25, 0.5, 1.0), 32)
TEACHER = InputSpec.of((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 32)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return create_model("convnext_demo_32", num_classes=10)


def pixels(n=2, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def normalised(raw, spec):
    """What a loader normalising with `spec` hands over, computed channel by channel in float64."""
    out = torch.empty_like(raw, dtype=torch.float64)
    for c in range(3):
        out[:, c] = (raw[:, c].double() - spec.mean[c]) / spec.std[c]
    return out


def test_remap_equals_renormalising_the_raw_pixels():
    source = FrozenSource(tiny_model(), LOGITS, CPU, "fp32", student_input=STUDENT, source_input=TEACHER)
    raw = pixels()
    remapped = source.remap(normalised(raw, STUDENT).float())
    torch.testing.assert_close(remapped.double(), normalised(raw, TEACHER), rtol=0, atol=1e-5)


def test_equal_specs_pass_the_batch_through_untouched():
    model = tiny_model()
    same = InputSpec.of(list(STUDENT.mean), list(STUDENT.std), (3, 32, 32))
    source = FrozenSource(model, LOGITS, CPU, "fp32", student_input=STUDENT, source_input=same)
    x = normalised(pixels(), STUDENT).float()
    assert source.remap(x) is x
    with torch.no_grad():
        expected = extract_features(model, x, LOGITS).logits
    torch.testing.assert_close(source.of_images(x).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("teacher_size", [64, 16])
def test_resize_to_the_sources_size(teacher_size):
    target = InputSpec.of(STUDENT.mean, STUDENT.std, teacher_size)
    source = FrozenSource(tiny_model(), LOGITS, CPU, "fp32", student_input=STUDENT, source_input=target)
    x = normalised(pixels(), STUDENT).float()
    out = source.remap(x)
    assert out.shape == (2, 3, teacher_size, teacher_size)
    shrinking = teacher_size < 32
    expected = F.interpolate(x, size=teacher_size, mode="bilinear", align_corners=False, antialias=shrinking)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # antialiased only when shrinking


def test_predict_scores_the_remapped_batch():
    model = tiny_model()
    target = InputSpec.of(TEACHER.mean, TEACHER.std, 48)
    source = FrozenSource(model, LOGITS, CPU, "fp32", student_input=STUDENT, source_input=target)
    raw = pixels()
    logits = source.predict(normalised(raw, STUDENT).float())
    teacher_view = F.interpolate(normalised(raw, TEACHER).float(), size=48, mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected = model(teacher_view)
    assert logits.dtype == torch.float32 and logits.shape == (2, 10)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    logits_of_images = source.of_images(normalised(raw, STUDENT).float()).logits
    torch.testing.assert_close(logits_of_images, expected, rtol=1e-4, atol=1e-4)


def test_build_frozen_teacher_reads_the_teacher_flags():
    config = {"mean": STUDENT.mean, "std": STUDENT.std, "input_size": (3, 32, 32)}
    args = SimpleNamespace(teacher_precision="fp32", teacher_mean=list(TEACHER.mean), teacher_std=list(TEACHER.std),
                           teacher_img_size=48, compile=False, channels_last=False)
    teacher = build_frozen_teacher(args, tiny_model(), LOGITS, CPU, config)
    assert teacher.remap(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 48, 48)
    args.teacher_mean = args.teacher_std = args.teacher_img_size = None  # defaults: the student's input
    x = torch.zeros(1, 3, 32, 32)
    assert build_frozen_teacher(args, tiny_model(), LOGITS, CPU, config).remap(x) is x


def _cpu_bf16(monkeypatch, amx, avx512_bf16):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(False, False, "fp32"), (True, False, "bf16"),
                                                         (False, True, "bf16")])
def test_auto_precision_on_cpu(monkeypatch, amx, avx512_bf16, expected):
    _cpu_bf16(monkeypatch, amx, avx512_bf16)
    precision, reason = resolve_teacher_precision("auto", CPU)
    assert precision == expected and reason.startswith("auto: ")
    if expected == "fp32":
        assert "no native bf16" in reason and "emulated" in reason


@pytest.mark.parametrize("supported, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cuda(monkeypatch, supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Some GPU")
    assert resolve_teacher_precision("auto", torch.device("cuda"))[0] == expected


def test_explicit_precisions_are_kept(monkeypatch):
    _cpu_bf16(monkeypatch, True, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # native bf16: no warning
        assert resolve_teacher_precision("bf16", CPU)[0] == "bf16"
        assert resolve_teacher_precision("fp32", CPU)[0] == "fp32"


def test_explicit_bf16_without_native_support_warns(monkeypatch):
    _cpu_bf16(monkeypatch, False, False)
    with pytest.warns(UserWarning, match="emulated"):
        precision, reason = resolve_teacher_precision("bf16", CPU)
    assert precision == "bf16" and "emulated" in reason


def test_fp16_teacher_on_cpu_is_a_user_error():
    with pytest.raises(UserError, match="fp16 is not supported on CPU.*auto, bf16 or fp32"):
        resolve_teacher_precision("fp16", CPU)
    with pytest.raises(UserError, match="fp16"):
        FrozenSource(tiny_model(), LOGITS, CPU, "fp16")


def test_fp16_student_amp_on_cpu_is_a_user_error():
    with pytest.raises(UserError, match="--amp-dtype bfloat16"):
        autocast_context(SimpleNamespace(amp=True, amp_dtype="float16"), CPU)
    with autocast_context(SimpleNamespace(amp=False, amp_dtype="float16"), CPU)():  # no --amp: no autocast
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.bf16
def test_bf16_student_amp_on_cpu_autocasts():
    x, weight = torch.randn(2, 4), torch.randn(3, 4)
    with autocast_context(SimpleNamespace(amp=True, amp_dtype="bfloat16"), CPU)():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert F.linear(x, weight).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_frozen_for_good():
    """No parameter trains, and a train() that reaches the model through a parent module leaves it in eval."""
    teacher_model, student = tiny_model(0), tiny_model(1)
    source = FrozenSource(teacher_model, LOGITS, CPU, "fp32")
    assert not isinstance(source, nn.Module)
    parent = nn.ModuleDict({"student": student, "teacher": teacher_model})  # a careless distiller
    parent.train()
    teacher_model.train()
    assert student.training
    assert all(not m.training for m in teacher_model.modules())
    assert all(not p.requires_grad for p in teacher_model.parameters())
    features = source.of_images(torch.zeros(2, 3, 32, 32))
    assert not features.logits.requires_grad and not torch.is_inference(features.logits)

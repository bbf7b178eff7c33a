import re

import pytest
import torch

from engine.models import create_model
from engine.weights import load_weights
from kdcore.errors import UserError


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_teacher_checkpoint_formats(saved_weights, wrap):
    path = saved_weights("resnet18", wrap=wrap)
    torch.manual_seed(1)
    model = load_weights(create_model("resnet18", num_classes=10), path, "resnet18")
    torch.manual_seed(0)
    reference = create_model("resnet18", num_classes=10)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


def test_module_prefix_is_stripped(tmp_path):
    torch.manual_seed(0)
    source = create_model("resnet18", num_classes=10)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "ddp.pth")
    model = load_weights(create_model("resnet18", num_classes=10), str(tmp_path / "ddp.pth"), "resnet18")
    assert torch.equal(model.fc.weight, source.fc.weight)


def test_pickled_objects_are_refused(tmp_path):
    """weights_only=True: a checkpoint that needs arbitrary unpickling is an error, not executed."""
    torch.save({"state_dict": {}, "obj": object()}, tmp_path / "unsafe.pth")
    with pytest.raises(UserError, match="weights_only=True"):
        load_weights(create_model("resnet18", num_classes=10), str(tmp_path / "unsafe.pth"), "resnet18")


def test_ema_requested_but_absent(saved_weights):
    with pytest.raises(UserError, match="no EMA weights"):
        load_weights(create_model("resnet18", num_classes=10), saved_weights("resnet18"), "resnet18", use_ema=True)


def timm_06_swin_state_dict(model):
    """A timm >= 1.0 Swin's weights laid out as timm 0.6.x saved them (the paper's Swin teachers): patch
    merging at the end of each stage (`layers.{i-1}.downsample`, timm >= 1.0 puts it at the start of stage i),
    the classifier as `head`, and the persistent `relative_position_index`/`attn_mask` buffers."""
    old = {}
    for key, value in model.state_dict().items():
        merge = re.fullmatch(r"layers\.(\d+)\.downsample\.(.+)", key)
        if merge:
            key = f"layers.{int(merge.group(1)) - 1}.downsample.{merge.group(2)}"
        elif key.startswith("head.fc."):
            key = "head." + key[len("head.fc."):]
        old[key] = value.clone()
    for name, buffer in model.named_buffers():
        if name.endswith(("relative_position_index", "attn_mask")):
            old[name] = buffer.clone()
    return old


def test_timm_06_swin_teacher_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    source = create_model("swin_pico_patch4_window7_224", num_classes=100).eval()
    old = timm_06_swin_state_dict(source)
    assert "layers.0.downsample.reduction.weight" in old and "head.weight" in old
    assert "layers.0.blocks.1.attn_mask" in old and not any(k.startswith("layers.3.downsample") for k in old)
    torch.save({"model": old}, tmp_path / "swin_06.pth")

    torch.manual_seed(1)
    model = create_model("swin_pico_patch4_window7_224", num_classes=100)
    load_weights(model, str(tmp_path / "swin_06.pth"), "swin_pico_patch4_window7_224", role="teacher")
    loaded, original = model.state_dict(), source.state_dict()
    assert loaded.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(loaded[name], tensor), name
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model.eval()(images), source(images))


def test_timm_06_swin_teacher_with_other_class_count(tmp_path):
    torch.manual_seed(0)
    torch.save(timm_06_swin_state_dict(create_model("swin_pico_patch4_window7_224", num_classes=100)),
               tmp_path / "swin_06.pth")
    with pytest.raises(UserError, match="has a 100-class head but .* was built with 10 classes"):
        load_weights(create_model("swin_pico_patch4_window7_224", num_classes=10), str(tmp_path / "swin_06.pth"),
                     "swin_pico_patch4_window7_224", role="teacher")

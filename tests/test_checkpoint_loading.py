import pytest
import torch

from engine.errors import UserError
from engine.models import create_model, load_weights


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

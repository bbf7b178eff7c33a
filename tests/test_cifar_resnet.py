"""The CIFAR ResNets of RichKD's pair (custom_model/cifar_resnet.py): parameter counts derived by hand from the
architecture, timm registration and API, the embedding and stage maps against a forward written out layer by layer,
and mdistiller's checkpoint key names."""
import pytest
import timm
import torch
import torch.nn.functional as F

from engine.models import count_parameters, create_model
from kdcore.dataset_stats import CIFAR100_MEAN, CIFAR100_STD
from kdcore.features import FeatureRequest, embedding_dim, extract_features

WIDTHS = (32, 64, 128, 256)


def hand_count(depth, classes=100):
    """Stem conv + BN; per stage, n basic blocks (two 3x3 convs + two BNs), the first with a 1x1 conv + BN
    shortcut (the width changes at every stage); the classifier."""
    n = (depth - 2) // 6
    total = 3 * 9 * WIDTHS[0] + 2 * WIDTHS[0]
    for c_in, c in zip(WIDTHS[:-1], WIDTHS[1:]):
        total += (9 * c_in * c + 2 * c) + (9 * c * c + 2 * c) + (c_in * c + 2 * c)  # first block
        total += (n - 1) * 2 * (9 * c * c + 2 * c)
    return total + WIDTHS[-1] * classes + classes


def test_parameter_counts_match_the_paper():
    assert hand_count(8) == 1_233_540 and hand_count(32) == 7_433_860  # 1.23M and 7.43M
    assert count_parameters(create_model("cifar_resnet8x4", num_classes=100)) == 1_233_540
    assert count_parameters(create_model("cifar_resnet32x4", num_classes=100)) == 7_433_860
    assert count_parameters(create_model("cifar_resnet8x4", num_classes=10)) == hand_count(8, 10)


def test_registered_with_timm_with_cifar_defaults():
    for name in ("cifar_resnet8x4", "cifar_resnet32x4"):
        assert timm.is_model(name)
        cfg = timm.create_model(name).pretrained_cfg
        assert cfg["input_size"] == (3, 32, 32) and cfg["num_classes"] == 100 and cfg["crop_pct"] == 1.0
        assert tuple(cfg["mean"]) == CIFAR100_MEAN and tuple(cfg["std"]) == CIFAR100_STD
    # train.py passes img_size and drop_rate to every student
    model = create_model("cifar_resnet8x4", num_classes=10, img_size=32, drop_rate=0.1)
    assert model.fc.out_features == 10 and embedding_dim(model) == 256


def layer_by_layer(model, x):
    """The forward written out: stem, then each block as relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut)."""
    x = F.relu(model.bn1(model.conv1(x)))
    maps = [x]
    for stage in (model.layer1, model.layer2, model.layer3):
        for block in stage:
            shortcut = x if block.downsample is None else block.downsample[1](block.downsample[0](x))
            x = F.relu(block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x))))) + shortcut)
        maps.append(x)
    return maps, x.mean(dim=(2, 3))


@pytest.mark.parametrize("name,blocks", [("cifar_resnet8x4", 1), ("cifar_resnet32x4", 5)])
def test_forward_embedding_and_stage_maps(name, blocks):
    torch.manual_seed(0)
    model = create_model(name, num_classes=100).eval()
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3)] == [blocks] * 3
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps, pooled = layer_by_layer(model, x)
        final, inter = model.forward_intermediates(x, indices=[0, 1, 2, 3])
        feats = extract_features(model, x, FeatureRequest(embedding=True))
        logits = model(x)
    assert [tuple(m.shape[1:]) for m in inter] == [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)]
    for ours, expected in zip(inter, maps):
        assert torch.allclose(ours, expected, atol=1e-6)
    assert torch.allclose(final, maps[-1], atol=1e-6)
    assert torch.allclose(feats.embedding, pooled, atol=1e-6) and feats.embedding.shape == (2, 256)
    assert torch.allclose(feats.logits, logits, atol=1e-6)
    assert torch.allclose(logits, pooled @ model.fc.weight.t() + model.fc.bias, atol=1e-5)
    assert len(model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)) == 1


def test_state_dict_uses_mdistiller_key_names():
    """So mdistiller's resnet32x4 CIFAR-100 teacher (cifar_teachers.tar) loads without renaming."""
    keys = set(create_model("cifar_resnet8x4", num_classes=100).state_dict())
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.0.bn2.bias",
                "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_var", "layer3.0.conv2.weight",
                "fc.weight", "fc.bias"):
        assert key in keys, key
    assert not any(k.startswith("layer4") for k in keys)


def test_paper_stages_are_the_stem_and_the_three_stages():
    """The stage table maps paper stages 1-4 of the CIFAR ResNets to stem, layer1, layer2, layer3."""
    from kdcore.stages import probe_stages
    model = timm.create_model("cifar_resnet8x4", num_classes=100)
    shapes = {s: info.shape for s, info in probe_stages(model, 32, (1, 2, 3, 4)).items()}
    assert shapes == {1: (32, 32, 32), 2: (64, 32, 32), 3: (128, 16, 16), 4: (256, 8, 8)}

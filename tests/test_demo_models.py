"""The demo's small-input models: shapes of logits, pooled embedding and stage features at 32 px."""
import pytest
import timm
import torch

import custom_model  # noqa: F401
from kdcore.features import FeatureRequest, extract_features


@pytest.mark.parametrize("name,params,embed,stages", [
    # timm's patch-2 ConvNeXt (1,905,994) without stage 0's downsample (LayerNorm 2x32 + 2x2 conv 32*32*4+32)
    ("convnext_demo_32", 1_905_994 - (2 * 32 + 32 * 32 * 4 + 32), 256,
     [(32, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2)]),
    ("deit_demo_32", 459_562, 96, [(65, 96)] * 4),  # NLC: 64 patch tokens and the class token
    ("swin_demo_32", 2_676_592, 256, [(256, 32), (64, 64), (16, 128), (4, 256)]),  # NLC: the 16/8/4/2 px maps
    ("resnet_demo_32", 703_010, 128, [(16, 16, 16), (32, 8, 8), (64, 4, 4), (128, 2, 2)]),
])
def test_shapes(name, params, embed, stages):
    model = timm.create_model(name).eval()
    assert sum(p.numel() for p in model.parameters()) == params
    x = torch.randn(3, 3, 32, 32)
    feats = extract_features(model, x, FeatureRequest(stages=(1, 2, 3, 4), embedding=True))
    assert feats.logits.shape == (3, 10)
    assert feats.embedding.shape == (3, embed)
    assert [tuple(feats.stages[s].shape[1:]) for s in (1, 2, 3, 4)] == stages
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)


def test_deit_demo_parameter_count_by_hand():
    """ViT: patch embed + cls + pos + depth x (LN, qkv, proj, LN, MLP) + final LN + head."""
    d, depth, tokens, classes, hidden = 96, 4, 65, 10, 384
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * hidden + hidden) + (hidden * d + d)
    expected = (3 * 16 * d + d) + d + tokens * d + depth * block + 2 * d + (d * classes + classes)
    assert sum(p.numel() for p in timm.create_model("deit_demo_32").parameters()) == expected


def test_swin_demo_parameter_count_by_hand():
    """Swin: patch embed (2 px conv + LN), per block (LN, qkv, proj, relative-position table of (2w-1)^2 x heads,
    LN, MLP x4), a patch merging before stages 1-3 (LN over 4 x d/2 channels, 2d -> d linear without bias), final
    LN and head. The last stage's 2x2 map shrinks its window to 2."""
    def block(d, heads, window):
        return (2 * d + (3 * d * d + 3 * d) + (d * d + d) + (2 * window - 1) ** 2 * heads + 2 * d
                + (4 * d * d + 4 * d) + (4 * d * d + d))
    expected = 3 * 2 * 2 * 32 + 32 + 2 * 32
    for i, (d, depth, heads, window) in enumerate(zip((32, 64, 128, 256), (2, 2, 4, 2), (1, 2, 4, 8), (4, 4, 4, 2))):
        expected += (2 * 2 * d + 2 * d * d if i else 0) + depth * block(d, heads, window)
    expected += 2 * 256 + 256 * 10 + 10
    assert sum(p.numel() for p in timm.create_model("swin_demo_32").parameters()) == expected


def test_resnet_demo_parameter_count_by_hand():
    """ResNet: deep stem (3x3 convs 3->8->8->16, each with BatchNorm), two basic blocks per stage (two 3x3 convs
    with BatchNorm; a 1x1 conv + BatchNorm shortcut where the width changes), the fc head."""
    def basic(cin, cout):
        shortcut = cin * cout + 2 * cout if cin != cout else 0
        return 9 * cin * cout + 2 * cout + 9 * cout * cout + 2 * cout + shortcut
    expected = (9 * 3 * 8 + 16) + (9 * 8 * 8 + 16) + (9 * 8 * 16 + 32)
    width = 16
    for c in (16, 32, 64, 128):
        expected += basic(width, c) + basic(c, c)
        width = c
    expected += 128 * 10 + 10
    assert sum(p.numel() for p in timm.create_model("resnet_demo_32").parameters()) == expected

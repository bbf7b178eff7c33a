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

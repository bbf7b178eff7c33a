"""Paper-stage features: the family table, the dry-run probe, one forward per extraction, request merging.

Expected shapes and indices are written from the architecture definitions (each model's published widths and
strides, and the OFA-KD/RSD code's stage choices), not read back from the code under test.
"""
import pytest
import torch
from torch import nn

from custom_forward import family_for, scaled_block_indices
from engine.models import create_model
from kdcore.errors import UserError
from kdcore.features import FeatureRequest, Features, extract_features
from kdcore.stages import StageInfo, probe_stages


def pyramid(width, grid=56):
    """CNN stages at strides 4/8/16/32 of 224 px, channels doubling from `width`: (C, H, W)."""
    return [(width * 2 ** i, grid >> i, grid >> i) for i in range(4)]


def token_pyramid(width, grid=56):
    """Swin: the same pyramid flattened to tokens: (H*W, C), no prefix token."""
    return [((grid >> i) ** 2, width * 2 ** i) for i in range(4)]


def columnar(tokens, width):
    """ViT/Mixer: every stage has the same token count and width."""
    return [(tokens, width)] * 4


# name: (kind, prefix tokens, shapes of paper stages 1-4 at 224 px)
PAPER_STAGES = {
    "resnet18": ("cnn", 0, pyramid(64)),
    "resnet50": ("cnn", 0, pyramid(256)),                  # bottleneck expansion 4: 256..2048
    "mobilenetv2_100": ("cnn", 0, [(24, 56, 56), (32, 28, 28), (96, 14, 14), (1280, 7, 7)]),
    "convnext_tiny": ("cnn", 0, pyramid(96)),
    "swin_tiny_patch4_window7_224": ("token", 0, token_pyramid(96)),
    "swin_nano_patch4_window7_224": ("token", 0, token_pyramid(64)),
    "swin_pico_patch4_window7_224": ("token", 0, token_pyramid(48)),
    "deit_tiny_patch16_224": ("token", 1, columnar(14 * 14 + 1, 192)),
    "vit_small_patch16_224": ("token", 1, columnar(14 * 14 + 1, 384)),
    "mixer_b16_224": ("token", 0, columnar(14 * 14, 768)),
    "resmlp_12_224": ("token", 0, columnar(14 * 14, 384)),
}


@pytest.mark.parametrize("name", PAPER_STAGES)
def test_probe_matches_the_papers_stages(name):
    kind, prefix, shapes = PAPER_STAGES[name]
    model = create_model(name, num_classes=100).train()
    infos = probe_stages(model, (3, 224, 224), (1, 2, 3, 4))
    layout = "NCHW" if kind == "cnn" else "NLC"
    assert infos == {s: StageInfo(s, kind, layout, prefix, shape) for s, shape in zip((1, 2, 3, 4), shapes)}
    assert model.training and all(m.training for m in model.modules())


def test_probe_restores_mixed_modes_and_takes_an_int_size():
    model = create_model("resnet18", num_classes=10).train()
    model.bn1.eval()
    assert probe_stages(model, 64, (4,))[4].shape == (512, 2, 2)
    assert model.training and not model.bn1.training and model.layer1.training


# name, create kwargs, input px, forward_intermediates index of paper stages 1-4 ("final": final features)
MATCH_CASES = [
    ("resnet18", {}, 64, (1, 2, 3, 4)),
    ("mobilenetv2_100", {}, 64, (1, 2, 3, "final")),
    ("convnext_atto", {}, 64, (0, 1, 2, 3)),
    ("swin_pico_patch4_window7_224", {}, 224, (0, 1, 2, 3)),
    ("deit_demo_32", {}, 32, (0, 0, 2, 3)),                       # 4 blocks
    ("deit_tiny_distilled_patch16_224", {"img_size": 32}, 32, (1, 3, 9, 11)),
    ("resmlp_12_224", {"img_size": 32}, 32, (1, 3, 9, 11)),
    ("mixer_s32_224", {"img_size": 64}, 64, (0, 2, 6, 7)),          # 8 blocks
]


def reference_stages(model, x, name, indices):
    """Paper stages from a separate forward_intermediates call, laid out by hand."""
    blocks = sorted({i for i in indices if i != "final"})
    if name.startswith("deit"):
        final, outs = model.forward_intermediates(x, indices=blocks, output_fmt="NLC", return_prefix_tokens=True)
        outs = [torch.cat([prefix, tokens], dim=1) for tokens, prefix in outs]
    elif name.startswith(("resmlp", "mixer")):
        final, outs = model.forward_intermediates(x, indices=blocks, output_fmt="NLC")
    else:
        final, outs = model.forward_intermediates(x, indices=blocks)
        if name.startswith("swin"):
            outs = [m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, m.shape[1]) for m in outs]
    by_index = dict(zip(blocks, outs), final=final)
    return {s: by_index[i] for s, i in zip((1, 2, 3, 4), indices)}


@pytest.mark.parametrize("name,kwargs,px,indices", MATCH_CASES)
def test_stage_tensors_and_logits_match_timm(name, kwargs, px, indices):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **kwargs).eval()
    x = torch.randn(2 if px < 224 else 1, 3, px, px)
    with torch.no_grad():
        feats = extract_features(model, x, FeatureRequest(stages=(1, 2, 3, 4), embedding=True))
        expected = reference_stages(model, x, name, indices)
        logits = model(x)
    assert feats.stages.keys() == expected.keys()
    for s in expected:
        assert torch.allclose(feats.stages[s], expected[s], atol=1e-5), f"stage {s}"
    assert torch.allclose(feats.logits, logits, atol=1e-5)
    assert torch.allclose(feats.embedding, model.forward_head(model.forward_features(x), pre_logits=True), atol=1e-5)


def test_depth_scaling():
    assert scaled_block_indices(12) == (1, 3, 9, 11)
    assert scaled_block_indices(4) == (0, 0, 2, 3)    # round(2/3, 4/3, 10/3, 4) - 1
    assert scaled_block_indices(1) == (0, 0, 0, 0)
    demo = create_model("deit_demo_32", num_classes=10)
    assert family_for(demo).indices(demo) == (0, 0, 2, 3)
    vit12 = create_model("deit_tiny_patch16_224", num_classes=10, img_size=32)
    assert family_for(vit12).indices(vit12) == (1, 3, 9, 11)


@pytest.mark.parametrize("name,stem", [("resnet18", "conv1"), ("mobilenetv2_100", "conv_stem"),
                                       ("deit_demo_32", "patch_embed"), ("mixer_s32_224", "stem")])
@pytest.mark.parametrize("stages", [(), (4,), (1, 2, 3, 4)])
def test_one_forward_per_extraction(name, stem, stages):
    model = create_model(name, num_classes=10, img_size=32).eval()
    calls = []
    getattr(model, stem).register_forward_hook(lambda *_: calls.append("stem"))
    model.get_classifier().register_forward_hook(lambda *_: calls.append("head"))
    with torch.no_grad():
        extract_features(model, torch.randn(2, 3, 32, 32), FeatureRequest(stages=stages, embedding=True))
    assert calls == ["stem", "head"]


def test_merge_requests():
    a = FeatureRequest(stages=(3, 1), logits=False)
    b = FeatureRequest(stages=(4, 1), embedding=True, logits=False)
    assert a.stages == (1, 3)
    assert a.merge(b) == b.merge(a) == FeatureRequest(stages=(1, 3, 4), embedding=True, logits=False)
    assert a.merge(FeatureRequest()) == FeatureRequest(stages=(1, 3), logits=True)
    with pytest.raises(UserError, match="paper stages are 1-4"):
        FeatureRequest(stages=(0, 1))


def test_detached_float_copies_every_stage():
    stage = torch.ones(2, 3, dtype=torch.bfloat16)
    copy = Features(stages={2: stage}).detached_float()
    assert copy.stages[2].dtype == torch.float32 and copy.logits is None
    assert copy.stages[2].data_ptr() != stage.data_ptr()


class Unlisted(nn.Module):
    """A model class with timm's head API but no entry in the stage table."""

    def __init__(self):
        super().__init__()
        self.body, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 5)

    def forward_features(self, x):
        return self.body(x)

    def forward_head(self, x, pre_logits=False):
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_unlisted_class_needs_a_table_entry_only_for_stages():
    model, x = Unlisted(), torch.randn(2, 3, 8, 8)
    with pytest.raises(UserError, match=r"Unlisted.*custom_forward\.register_family"):
        extract_features(model, x, FeatureRequest(stages=(1,)))
    with pytest.raises(UserError, match="Unlisted"):
        probe_stages(model, (3, 8, 8), (1,))
    feats = extract_features(model, x, FeatureRequest(embedding=True))
    assert torch.allclose(feats.logits, model(x)) and feats.embedding.shape == (2, 4) and feats.stages == {}

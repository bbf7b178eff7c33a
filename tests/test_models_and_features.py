"""Feature extraction: one pass gives the same logits as model(x), for every paper family."""
import pytest
import timm
import torch

from distillers import build_distiller
from distillers.rsd import RSD
from engine.models import create_model
from kdcore.features import FeatureRequest, embedding_dim, extract_features

FAMILIES = ["resnet18", "mobilenetv2_100", "deit_tiny_patch16_224", "swin_pico_patch4_window7_224",
            "convnext_atto", "mixer_s32_224", "resmlp_12_224"]


@pytest.mark.parametrize("name", FAMILIES)
def test_one_pass_features_match_forward(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = extract_features(model, x, FeatureRequest(stages=(1, 2), embedding=True))  # paper stages
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(feats.logits, expected, atol=1e-5)
    assert feats.embedding.shape == (2, embedding_dim(model))
    assert sorted(feats.stages) == [1, 2]


def swin_parameter_count(embed_dim, classes, heads=(2, 4, 8, 16), depths=(2, 2, 2, 2), window=7):
    """Counted by hand: patch embed, per block 12d^2 + 13d + relative-position table, patch merging, head."""
    n = 3 * embed_dim * 16 + embed_dim + 2 * embed_dim
    for i, (h, depth) in enumerate(zip(heads, depths)):
        d = embed_dim * 2 ** i
        if i > 0:
            n += 8 * (d // 2) + 8 * (d // 2) ** 2
        n += depth * (12 * d * d + 13 * d + (2 * window - 1) ** 2 * h)
    d = embed_dim * 8
    return n + 2 * d + d * classes + classes


@pytest.mark.parametrize("name,embed_dim", [("swin_nano_patch4_window7_224", 64),
                                            ("swin_pico_patch4_window7_224", 48)])
def test_custom_swin_sizes(name, embed_dim):
    model = timm.create_model(name, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == swin_parameter_count(embed_dim, 1000)
    assert model.num_features == 8 * embed_dim


def test_swin_nano_is_the_papers_9_60m():
    assert round(swin_parameter_count(64, 1000) / 1e6, 2) == 9.60


@pytest.mark.parametrize("student,teacher,gamma,expected", [
    ("resnet18", "swin_tiny_patch4_window7_224", 2, 1_312_768),
    ("swin_nano_patch4_window7_224", "convnext_tiny", 4, 2_625_536),
])
def test_rsd_extra_parameters_match_figure_3(student, teacher, gamma, expected):
    from distillers import DISTILLERS
    from engine.train_args import build_train_parser
    args = build_train_parser(DISTILLERS).parse_args(["--distiller", "rsd", "--rsd-gamma", str(gamma)])
    distiller = build_distiller(args, timm.create_model(student, num_classes=100),
                                teacher=timm.create_model(teacher, num_classes=100), num_classes=100)
    assert isinstance(distiller, RSD)
    assert distiller.extra_parameter_count() == expected


def test_unknown_model_is_a_user_error():
    from kdcore.errors import UserError
    with pytest.raises(UserError, match="unknown model 'resnet_18'"):
        create_model("resnet_18", num_classes=10)

"""Swin-Nano and Swin-Pico: the paper's small Swin students (REFERENCE.md §5).

Patch 4, window 7, depths (2, 2, 2, 2), heads (2, 4, 8, 16); embed dim 64 (nano) and 48 (pico).
Swin-N has 9.60M parameters at 1000 classes. No pretrained weights exist for them.
"""
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import register_model
from timm.models.swin_transformer import SwinTransformer

_DATA_CFG = dict(input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.9, interpolation="bicubic",
                 mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, num_classes=1000,
                 first_conv="patch_embed.proj", classifier="head.fc")


def _small_swin(name, embed_dim, pretrained, **kwargs):
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights; train it from scratch (drop --pretrained)")
    model = SwinTransformer(patch_size=4, window_size=7, embed_dim=embed_dim, depths=(2, 2, 2, 2),
                            num_heads=(2, 4, 8, 16), **kwargs)
    model.pretrained_cfg = model.default_cfg = dict(_DATA_CFG, architecture=name)
    return model


@register_model
def swin_nano_patch4_window7_224(pretrained=False, **kwargs):
    return _small_swin("swin_nano_patch4_window7_224", 64, pretrained, **kwargs)


@register_model
def swin_pico_patch4_window7_224(pretrained=False, **kwargs):
    return _small_swin("swin_pico_patch4_window7_224", 48, pretrained, **kwargs)

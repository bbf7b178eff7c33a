"""Swin-Nano and Swin-Pico: the RSD paper's (ICCV 2025) small Swin students, added by its code.

Patch 4, window 7, depths (2, 2, 2, 2), heads (2, 4, 8, 16); embed dim 64 (nano) and 48 (pico).
Swin-N has 9.60M parameters at 1000 classes. No pretrained weights exist for them.
"""
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn


def _cfg():
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.9,
                interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv="patch_embed.proj", classifier="head.fc")


# timm's register_model reads this module-level table for the models' data configs.
default_cfgs = generate_default_cfgs({
    "swin_nano_patch4_window7_224": _cfg(),
    "swin_pico_patch4_window7_224": _cfg(),
})


def _small_swin(variant, embed_dim, pretrained, **kwargs):
    model_args = dict(patch_size=4, window_size=7, embed_dim=embed_dim, depths=(2, 2, 2, 2),
                      num_heads=(2, 4, 8, 16))
    return build_model_with_cfg(SwinTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)),
                                **dict(model_args, **kwargs))


@register_model
def swin_nano_patch4_window7_224(pretrained=False, **kwargs):
    return _small_swin("swin_nano_patch4_window7_224", 64, pretrained, **kwargs)


@register_model
def swin_pico_patch4_window7_224(pretrained=False, **kwargs):
    return _small_swin("swin_pico_patch4_window7_224", 48, pretrained, **kwargs)

"""Small-input (32 px) members of two paper families for the offline demo on Fashion-MNIST.

- `convnext_demo_32`: ConvNeXt (the teacher family of ConvNeXt-T -> DeiT-T), 2 px patch stem (timm then
  strides stage 0 too), stages at 8/4/2/1 px, dims (32, 64, 128, 256), depths (2, 2, 4, 2); 1.9M parameters
  at 10 classes.
- `deit_demo_32`: DeiT/ViT (the student family), patch 4 (8x8 tokens + class token), width 96, depth 4,
  3 heads; 0.46M parameters at 10 classes.
Both keep timm's forward_intermediates()/forward_head(), so every distiller works on them unchanged.
"""
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.convnext import ConvNeXt
from timm.models.vision_transformer import VisionTransformer


def _cfg(**kwargs):
    # crop_pct 1.0: evaluation only resizes (Fashion-MNIST's 28 px to 32), it crops nothing away.
    return dict(url="", num_classes=10, input_size=(3, 32, 32), pool_size=None, crop_pct=1.0,
                interpolation="bilinear", mean=(0.2860,) * 3, std=(0.3530,) * 3, **kwargs)


default_cfgs = generate_default_cfgs({
    "convnext_demo_32": _cfg(first_conv="stem.0", classifier="head.fc"),
    "deit_demo_32": _cfg(first_conv="patch_embed.proj", classifier="head"),
})


@register_model
def convnext_demo_32(pretrained=False, **kwargs):
    model_args = dict(depths=(2, 2, 4, 2), dims=(32, 64, 128, 256), patch_size=2)
    return build_model_with_cfg(ConvNeXt, "convnext_demo_32", pretrained,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
                                **dict(model_args, **kwargs))


@register_model
def deit_demo_32(pretrained=False, **kwargs):
    model_args = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3)
    return build_model_with_cfg(VisionTransformer, "deit_demo_32", pretrained,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
                                **dict(model_args, **kwargs))

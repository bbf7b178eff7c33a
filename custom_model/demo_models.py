"""Small-input (32 px) members of the paper's families for the offline demo and the fidelity study on Fashion-MNIST.

- `convnext_demo_32`: ConvNeXt (the teacher family of ConvNeXt-T -> DeiT-T), 2 px patch stem and an unstrided
  stage 0, so the stages run at 16/8/4/2 px; dims (32, 64, 128, 256), depths (2, 2, 4, 2); 1,901,802
  parameters at 10 classes.
- `deit_demo_32`: DeiT/ViT (the student family), patch 4 (8x8 tokens + class token), width 96, depth 4,
  3 heads; 0.46M parameters at 10 classes.
- `mixer_demo_32`: MLP-Mixer (the family of the paper's Mixer-B/16 teacher and ResMLP student), patch 4 (8x8
  tokens, no class token), width 96 like the DeiT student, depth 6, timm's (0.5, 4) MLP ratios; 0.49M parameters
  at 10 classes, so the fidelity study's two students differ in architecture, not size.
- `swin_demo_32`: Swin (the token-teacher family of Swin-T -> ResNet18), 2 px patches (16x16 tokens), 4x4
  windows, width 32 doubling per stage, depths (2, 2, 4, 2), head width 32, so the stages run at 16/8/4/2 px like
  the ConvNeXt's (the last stage's 2x2 map is one window, unshifted); 2.68M parameters at 10 classes.
- `resnet_demo_32`: ResNet (the CNN-student family, BatchNorm), basic blocks (2, 2, 2, 2) as ResNet18's, widths
  (16, 32, 64, 128), timm's 3-conv deep stem (the first conv strides 2) and no max pool, so the stages run at
  16/8/4/2 px; 0.70M parameters at 10 classes.
All keep timm's forward_intermediates()/forward_head(), so every distiller works on them unchanged.
"""
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.convnext import ConvNeXt
from timm.models.mlp_mixer import MlpMixer
from timm.models.resnet import BasicBlock, ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn


class ConvNeXtFineStem(ConvNeXt):
    """ConvNeXt with a 2 px patch stem whose first stage keeps the stem's resolution.

    timm strides stage 0 whenever the stem's stride is 2 (so that stage 0 always ends at 1/4 of the input);
    Fashion-MNIST's small garments need the finer maps, so this builds timm's unstrided stage 0 (stem stride 4)
    and then swaps the stem's 4 px patch conv for a 2 px one: stages at 1/2, 1/4, 1/8 and 1/16 of the input.
    """

    def __init__(self, in_chans=3, dims=(96, 192, 384, 768), **kwargs):
        super().__init__(in_chans=in_chans, dims=dims, patch_size=4, **kwargs)
        self.stem[0] = nn.Conv2d(in_chans, dims[0], kernel_size=2, stride=2)
        for info in self.feature_info:
            info["reduction"] //= 2


class ResNetNoPool(ResNet):
    """ResNet without the stem's max pool: at 32 px a stride-2 stem followed by a pool would leave 8x8 maps for the
    first stage, too coarse for Fashion-MNIST's garments; the stages then sit at 1/2, 1/4, 1/8 and 1/16."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.maxpool = nn.Identity()
        for info in self.feature_info[1:]:
            info["reduction"] //= 2


def _cfg(**kwargs):
    # crop_pct 1.0: evaluation only resizes (Fashion-MNIST's 28 px to 32), it crops nothing away.
    return dict(url="", num_classes=10, input_size=(3, 32, 32), pool_size=None, crop_pct=1.0,
                interpolation="bilinear", mean=(0.2860,) * 3, std=(0.3530,) * 3, **kwargs)


default_cfgs = generate_default_cfgs({
    "convnext_demo_32": _cfg(first_conv="stem.0", classifier="head.fc"),
    "deit_demo_32": _cfg(first_conv="patch_embed.proj", classifier="head"),
    "mixer_demo_32": _cfg(first_conv="stem.proj", classifier="head"),
    "swin_demo_32": _cfg(first_conv="patch_embed.proj", classifier="head.fc"),
    "resnet_demo_32": _cfg(first_conv="conv1.0", classifier="fc"),
})


@register_model
def convnext_demo_32(pretrained=False, **kwargs):
    model_args = dict(depths=(2, 2, 4, 2), dims=(32, 64, 128, 256))
    return build_model_with_cfg(ConvNeXtFineStem, "convnext_demo_32", pretrained,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
                                **dict(model_args, **kwargs))


@register_model
def deit_demo_32(pretrained=False, **kwargs):
    model_args = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3)
    return build_model_with_cfg(VisionTransformer, "deit_demo_32", pretrained,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
                                **dict(model_args, **kwargs))


@register_model
def mixer_demo_32(pretrained=False, **kwargs):
    model_args = dict(img_size=32, patch_size=4, embed_dim=96, num_blocks=6)
    return build_model_with_cfg(MlpMixer, "mixer_demo_32", pretrained,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3, 4, 5), feature_cls="getter"),
                                **dict(model_args, **kwargs))


@register_model
def swin_demo_32(pretrained=False, **kwargs):
    model_args = dict(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2, 2, 4, 2),
                      num_heads=(1, 2, 4, 8), drop_path_rate=0.0)
    return build_model_with_cfg(SwinTransformer, "swin_demo_32", pretrained,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
                                **dict(model_args, **kwargs))


@register_model
def resnet_demo_32(pretrained=False, **kwargs):
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2), channels=(16, 32, 64, 128), stem_type="deep",
                      stem_width=8)
    return build_model_with_cfg(ResNetNoPool, "resnet_demo_32", pretrained, **dict(model_args, **kwargs))

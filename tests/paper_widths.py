"""Widths of the paper's architectures at 224 px, written by hand from their definitions (timm's model cards and
the RSD paper's custom Swin-N/P), never read from a built model: what the parameter counts of tools/overhead.py,
the presets and the distillers are checked against.

EMBEDDING_WIDTHS: the pooled pre-logits width D of every student and teacher.
TEACHER_STAGES: each teacher's paper stages the same way, with its kind and prefix tokens; PROMPT_SHAPES: the
(channels, side) of the tensor where each stage begins, where PAT's prompts enter (before ResNet's layer k and
ConvNeXt's stage k, after Swin's patch merging, after the block of the previous stage of a ViT/Mixer).
STUDENT_STAGES: each student's paper stages 1-4 (as the OFA-KD and RSD code take them: a CNN's 4 stage outputs,
Swin's last block of each of its 4 stages, blocks 1, 3, 9, 11 of a 12-block ViT/DeiT/Mixer/ResMLP) as (channels,
grid side): a CNN's NCHW map, or a token model's patch grid (the prefix tokens, DeiT's class token, come on top
of side * side).
"""

EMBEDDING_WIDTHS = {
    "resnet18": 512,                        # last stage 512 channels, global average pool
    "resnet50": 2048,                       # last stage 512 x bottleneck expansion 4
    "mobilenetv2_100": 1280,                # the final 1x1 conv to 1280
    "deit_tiny_patch16_224": 192,
    "vit_small_patch16_224": 384,
    "resmlp_12_224": 384,
    "mixer_b16_224": 768,
    "swin_pico_patch4_window7_224": 384,    # embed_dim 48 doubled at each of the 3 merges
    "swin_nano_patch4_window7_224": 512,    # embed_dim 64 ... 512
    "swin_tiny_patch4_window7_224": 768,    # embed_dim 96 ... 768
    "convnext_tiny": 768,                   # dims 96/192/384/768
}

STUDENT_KINDS = {"resnet18": "cnn", "mobilenetv2_100": "cnn", "deit_tiny_patch16_224": "token",
                 "resmlp_12_224": "token", "swin_pico_patch4_window7_224": "token",
                 "swin_nano_patch4_window7_224": "token"}

STUDENT_STAGES = {
    # stages 1-4 are the outputs of layer1-4: strides 4/8/16/32 of a 224 px image
    "resnet18": [(64, 56), (128, 28), (256, 14), (512, 7)],
    # the inverted-residual stages at strides 4/8/16 (24/32/96 channels), then the final 1280-channel 1x1 conv
    "mobilenetv2_100": [(24, 56), (32, 28), (96, 14), (1280, 7)],
    # 12 blocks of width 192 on 16 px patches: 14 x 14 patch tokens (plus the class token) at every stage
    "deit_tiny_patch16_224": [(192, 14)] * 4,
    # 12 blocks of width 384 on 16 px patches, no class token
    "resmlp_12_224": [(384, 14)] * 4,
    # 4 px patches (56 x 56), width doubled and grid halved by each patch merging
    "swin_pico_patch4_window7_224": [(48, 56), (96, 28), (192, 14), (384, 7)],
    "swin_nano_patch4_window7_224": [(64, 56), (128, 28), (256, 14), (512, 7)],
}

TEACHER_STAGES = {  # name: (kind, prefix tokens, [(channels, side)] of stages 1-4)
    "swin_tiny_patch4_window7_224": ("token", 0, [(96, 56), (192, 28), (384, 14), (768, 7)]),
    "vit_small_patch16_224": ("token", 1, [(384, 14)] * 4),
    "deit_tiny_patch16_224": ("token", 1, [(192, 14)] * 4),
    "mixer_b16_224": ("token", 0, [(768, 14)] * 4),
    "convnext_tiny": ("cnn", 0, [(96, 56), (192, 28), (384, 14), (768, 7)]),
    "resnet50": ("cnn", 0, [(256, 56), (512, 28), (1024, 14), (2048, 7)]),
}

PROMPT_SHAPES = {
    "swin_tiny_patch4_window7_224": [(96, 56), (192, 28), (384, 14), (768, 7)],  # after each patch merging
    "vit_small_patch16_224": [(384, 14)] * 4,
    "deit_tiny_patch16_224": [(192, 14)] * 4,
    "mixer_b16_224": [(768, 14)] * 4,
    "convnext_tiny": [(96, 56), (96, 56), (192, 28), (384, 14)],  # the stem, then each stage's input
    "resnet50": [(64, 56), (256, 56), (512, 28), (1024, 14)],  # after the stem's max pool, then layer k-1's output
}

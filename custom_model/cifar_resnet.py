"""The CIFAR ResNets of CRD/mdistiller that RichKD reports on: resnet32x4 (teacher) -> resnet8x4 (student).

A 3x3 stem conv (3 -> 32 channels, stride 1, no max-pool), then three stages of basic blocks (two 3x3 convs,
identity shortcut, a 1x1 conv + BN shortcut where the width or stride changes) with widths 64, 128, 256 and
strides 1, 2, 2, then global average pooling and a linear classifier. Depth 6n + 2: n = 5 blocks per stage
for resnet32x4, n = 1 for resnet8x4; 7,433,860 and 1,233,540 parameters at 100 classes, 32 px inputs.

Module names (conv1, bn1, layer1-3, fc, downsample.0/1) are those of the mdistiller checkpoints
(cifar_teachers.tar), so its resnet32x4 teacher loads directly. The timm API is kept: forward_features,
forward_head(pre_logits=True) (the 256-d pooled embedding) and forward_intermediates, whose indices are
0 = stem, 1-3 = the three stages (the four feature maps mdistiller hands to its distillers).
"""
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.nn import functional as F

from custom_forward import Family, nchw_maps, register_family
from kdcore.dataset_stats import CIFAR100_MEAN, CIFAR100_STD


def conv3x3(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))."""

    def __init__(self, in_channels, channels, stride=1):
        super().__init__()
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False),
                                            nn.BatchNorm2d(channels))

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + shortcut)


class CifarResNet(nn.Module):
    """ResNet of depth 6n + 2 for 32 px inputs; `widths` = (stem, stage 1, stage 2, stage 3)."""

    def __init__(self, depth=32, widths=(32, 64, 128, 256), num_classes=100, in_chans=3, drop_rate=0.0,
                 global_pool="avg"):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet of basic blocks has depth 6n + 2, got {depth}")
        blocks = (depth - 2) // 6
        self.num_classes, self.drop_rate, self.global_pool = num_classes, drop_rate, global_pool
        self.conv1 = conv3x3(in_chans, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, in_channels = [], widths[0]
        for channels, stride in zip(widths[1:], (1, 2, 2)):
            stages.append(nn.Sequential(*[BasicBlock(in_channels if i == 0 else channels, channels,
                                                     stride if i == 0 else 1) for i in range(blocks)]))
            in_channels = channels
        self.layer1, self.layer2, self.layer3 = stages
        self.num_features = self.head_hidden_size = widths[-1]
        self.fc = nn.Linear(widths[-1], num_classes) if num_classes else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stem(self, x):
        return F.relu(self.bn1(self.conv1(x)))

    def get_classifier(self):
        return self.fc

    def reset_classifier(self, num_classes, global_pool=None):
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
                              intermediates_only=False):
        """(final map, [maps at `indices`]): index 0 is the stem's output, 1-3 the stages' (timm's API)."""
        if output_fmt != "NCHW":
            raise ValueError("CifarResNet hands out NCHW maps only")
        take_indices, max_index = feature_take_indices(4, indices)
        x = self.stem(x)
        intermediates = [x] if 0 in take_indices else []
        stages = (self.layer1, self.layer2, self.layer3)
        for index, stage in enumerate(stages[:max_index] if stop_early else stages, start=1):
            x = stage(x)
            if index in take_indices:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def forward_features(self, x):
        return self.layer3(self.layer2(self.layer1(self.stem(x))))

    def forward_head(self, x, pre_logits=False):
        x = x.mean(dim=(2, 3))
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


# Its row of the stage table: the stem, then its 3 stages (mdistiller's order).
register_family(CifarResNet, Family("cnn", lambda m: (0, 1, 2, 3), nchw_maps))


def _cfg():
    # crop_pct 1.0: CIFAR images are evaluated whole at 32 px.
    return dict(url="", num_classes=100, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0,
                interpolation="bilinear", mean=CIFAR100_MEAN, std=CIFAR100_STD, first_conv="conv1", classifier="fc")


default_cfgs = generate_default_cfgs({"cifar_resnet8x4": _cfg(), "cifar_resnet32x4": _cfg()})


def _create(variant, depth, pretrained, **kwargs):
    return build_model_with_cfg(CifarResNet, variant, pretrained, **dict(dict(depth=depth), **kwargs))


@register_model
def cifar_resnet8x4(pretrained=False, **kwargs):
    return _create("cifar_resnet8x4", 8, pretrained, **kwargs)


@register_model
def cifar_resnet32x4(pretrained=False, **kwargs):
    return _create("cifar_resnet32x4", 32, pretrained, **kwargs)

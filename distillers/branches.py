"""OFA's stage branches (Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous Architectures in
Knowledge Distillation", NeurIPS 2023, as its official code builds them): one small classifier per paper stage
that turns a student stage feature into class logits, so an intermediate stage can be distilled in the logit
space common to every architecture. Used by `--distiller ofa` and by the RSD paper's Table 7 variant.

The branch follows the student's family (`StageInfo.kind`), never the tensor layout; with D_s, D_t the
embedding widths:
- CNN student: stage 4 Conv1x1(C -> max(D_s, D_t)); stage s < 4: 4 - s separable-conv blocks that halve
  the map and double the channels, the last one mapping to max(D_s, D_t); then GAP and a Linear classifier.
- Token student: patch merging down to a 7 x 7 grid (the first merge maps C -> D_s), max(4 - s, 1) ViT
  blocks (width D_s, 4 heads), the class token (or the mean token when there is none), a Linear classifier.
  A grid too small to merge starts with Linear(C -> D_s) instead (Identity when C == D_s already).
Shapes come from the dry run (`kdcore.stages.probe_stages`).
"""
import math

import torch
from timm.models.swin_transformer import PatchMerging
from timm.models.vision_transformer import Block
from torch import nn

from kdcore.errors import UserError

FINAL_GRID = 7
BLOCK_HEADS = 4


class SepConv(nn.Sequential):
    """Downsampling separable conv: (depthwise 3x3 stride 2, pointwise 1x1, BN, ReLU), then
    (depthwise 3x3, pointwise 1x1 to `out_chans`, BN, ReLU)."""

    def __init__(self, in_chans, out_chans):
        super().__init__(
            nn.Conv2d(in_chans, in_chans, 3, stride=2, padding=1, groups=in_chans, bias=False),
            nn.Conv2d(in_chans, in_chans, 1, bias=False), nn.BatchNorm2d(in_chans), nn.ReLU(),
            nn.Conv2d(in_chans, in_chans, 3, padding=1, groups=in_chans, bias=False),
            nn.Conv2d(in_chans, out_chans, 1, bias=False), nn.BatchNorm2d(out_chans), nn.ReLU())


def cnn_branch(info, width, num_classes):
    """Stage map (B, C, H, W) -> logits; `width` is max(D_s, D_t)."""
    chans = info.shape[0]
    if info.stage == 4:
        body = [nn.Conv2d(chans, width, 1)]
    else:
        blocks = 4 - info.stage
        body = [SepConv(chans << i, width if i == blocks - 1 else chans << (i + 1)) for i in range(blocks)]
    return nn.Sequential(*body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


class TokenBranch(nn.Module):
    """Stage tokens (B, prefix + H*W, C) -> logits. Prefix (class, distillation) tokens skip the merging and
    join the ViT blocks; the class token, the first one, is the pooled feature."""

    def __init__(self, info, student_dim, num_classes):
        super().__init__()
        tokens, chans = info.shape
        self.prefix_tokens = info.prefix_tokens
        self.grid = math.isqrt(tokens - self.prefix_tokens)
        if self.grid ** 2 != tokens - self.prefix_tokens:
            raise UserError(f"OFA token branch: stage {info.stage} has {tokens - self.prefix_tokens} patch tokens, "
                            f"not a square grid; use a square --img-size")
        if self.prefix_tokens and chans != student_dim:
            raise UserError(f"OFA token branch: stage {info.stage} is {chans} wide, the embedding {student_dim}; "
                            f"prefix tokens cannot be re-projected: pick other --ofa-stage values")
        merges = max(int(math.log2(self.grid / FINAL_GRID)), 0)
        if merges:
            # As the OFA-KD code: a GELU after every merge but the last, and always after the first.
            self.entry = nn.Sequential(*(
                nn.Sequential(PatchMerging(chans if i == 0 else student_dim, student_dim),
                              nn.GELU() if i == 0 or i < merges - 1 else nn.Identity())
                for i in range(merges)))
        else:
            self.entry = nn.Linear(chans, student_dim) if chans != student_dim else nn.Identity()
        self.blocks = nn.Sequential(*(Block(student_dim, BLOCK_HEADS) for _ in range(max(4 - info.stage, 1))))
        self.head = nn.Linear(student_dim, num_classes)

    def forward(self, x):
        prefix, patches = x[:, :self.prefix_tokens], x[:, self.prefix_tokens:]
        patches = self.entry(patches.reshape(x.shape[0], self.grid, self.grid, -1)).flatten(1, 2)
        if not self.prefix_tokens:
            return self.head(self.blocks(patches).mean(dim=1))
        return self.head(self.blocks(torch.cat((prefix, patches), dim=1))[:, 0])


def init_branch(module):
    """Convs: Kaiming normal (fan out); Linears: trunc-normal std 0.02, as timm; biases 0; norms 1 and 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class StageBranches(nn.ModuleDict):
    """One branch per paper stage in `stage_infos` ({stage: StageInfo}); call with {stage: feature}."""

    def __init__(self, stage_infos, student_dim, teacher_dim, num_classes):
        super().__init__({str(s): cnn_branch(info, max(student_dim, teacher_dim), num_classes)
                          if info.kind == "cnn" else TokenBranch(info, student_dim, num_classes)
                          for s, info in sorted(stage_infos.items())})
        init_branch(self)

    def forward(self, stage_feats):
        """{stage: logits} for every branch."""
        return {int(s): branch(stage_feats[int(s)]) for s, branch in self.items()}

"""FitNets: Hints for Thin Deep Nets (Romero et al., ICLR 2015): hints from the teacher's intermediate stages.

For every paper stage in --fitnet-stage an adapter regresses the student's stage feature onto the
teacher's, and the loss is the element-mean squared error per stage, summed over the stages. The RSD
code (which made FitNets work across architectures) scales that sum by an extra 0.1 on top of
--fitnet-loss-weight; so does this one (`HINT_SCALE`). No --kd-loss-weight, as there.

One alignment rule for every pair of families, instead of the RSD code's per-pair patch aligners:
both features become NCHW maps (token sequences lose their prefix tokens and fold row-major into a
square grid, as timm lays out patches), then the student's map goes through a 1x1 conv to the
teacher's channels and is resampled bilinearly to the teacher's grid. The MSE needs no batch
statistics, so DDP's gradient averaging already gives the global-batch result.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdcore.errors import UserError
from kdcore.features import PAPER_STAGES, FeatureRequest, paper_stage

from .base import Distiller, fp32_loss
from .registry import register_distiller

HINT_SCALE = 0.1  # the RSD code's extra factor on the summed hint losses


@fp32_loss
def fitnet_loss(student_maps: Sequence[torch.Tensor], teacher_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """FitNets' hint loss (Romero et al., ICLR 2015; written out): sum over stages of the element-mean squared
    error between the adapted student map and the teacher's, in fp32 (fp64 kept).

    Args:
        student_maps: one adapted student map per stage, each of its teacher map's shape.
        teacher_maps: the teacher's maps, in the same stage order.

    Returns:
        The scalar loss, before `HINT_SCALE` and `--fitnet-loss-weight`.
    """
    return sum(F.mse_loss(s, t) for s, t in zip(student_maps, teacher_maps))


def map_shape(info, role):
    """(C, H, W) of a stage once laid out as a map; a token count (prefix dropped) must be a square."""
    if info.layout == "NCHW":
        return tuple(info.shape)
    length, dim = info.shape
    patches = length - info.prefix_tokens
    side = math.isqrt(patches)
    if side * side != patches:
        raise UserError(f"fitnet: the {role}'s stage {info.stage} has {patches} patch tokens, not a square grid; "
                        f"use a square input size (--img-size/--teacher-img-size) or drop stage {info.stage} "
                        f"from --fitnet-stage")
    return dim, side, side


def as_map(x, info, shape):
    """A stage feature as an NCHW map of per-sample `shape`: NLC tokens lose their prefix and fold row-major."""
    if info.layout == "NCHW":
        return x
    return x[:, info.prefix_tokens:].transpose(1, 2).reshape(x.shape[0], *shape)


class HintAdapter(nn.Module):
    """The student's stage feature as a map, a 1x1 conv to the teacher's channels, bilinear to its grid."""

    def __init__(self, student_info, teacher_info):
        super().__init__()
        self.student_info = student_info
        self.student_shape = map_shape(student_info, "student")
        self.teacher_shape = map_shape(teacher_info, "teacher")
        self.conv = nn.Conv2d(self.student_shape[0], self.teacher_shape[0], kernel_size=1, bias=False)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")  # OFA-KD's init

    def forward(self, x):
        x = self.conv(as_map(x, self.student_info, self.student_shape))
        if tuple(x.shape[-2:]) != self.teacher_shape[1:]:
            x = F.interpolate(x, size=self.teacher_shape[1:], mode="bilinear", align_corners=False)
        return x


@register_distiller("fitnet")
class FitNet(Distiller):
    """FitNets, hint-based distillation (Romero et al., ICLR 2015), for any pair of architectures (one adapter rule).
    Flags: `--fitnet-stage 1 2 3 4 --fitnet-loss-weight 1` (times a fixed 0.1, as the RSD code)."""

    def __init__(self, student, context):
        super().__init__(student, context)
        self.fitnet_loss_weight = context.args.fitnet_loss_weight
        stages = self.student_request.stages
        self.teacher_info = {s: context.teacher.stages[s] for s in stages}
        self.adapters = nn.ModuleDict({str(s): HintAdapter(context.student.stages[s], context.teacher.stages[s])
                                       for s in stages})

    @classmethod
    def feature_requests(cls, args):
        stages = tuple(args.fitnet_stage)
        return FeatureRequest(stages=stages), FeatureRequest(stages=stages, logits=False)

    @classmethod
    def add_arguments(cls, parser):
        g = parser.add_argument_group("FitNets")
        g.add_argument("--fitnet-stage", type=paper_stage, nargs="+", default=list(PAPER_STAGES),
                       help="paper stages (1-4) that get a hint loss")
        g.add_argument("--fitnet-loss-weight", type=float, default=1.0,
                       help=f"weight of the summed hint losses (times a fixed {HINT_SCALE}, as the RSD code)")

    def aligned_maps(self, student_feats, teacher_feats):
        """([adapted student map], [teacher map]) per stage, both NCHW of the teacher's shape."""
        students, teachers = [], []
        for key, adapter in self.adapters.items():
            stage = int(key)
            students.append(adapter(student_feats.stages[stage]))
            teachers.append(as_map(teacher_feats.stages[stage], self.teacher_info[stage], adapter.teacher_shape))
        return students, teachers

    def distill_losses(self, student_feats, teacher_feats, batch):
        students, teachers = self.aligned_maps(student_feats, teacher_feats)
        return {"fitnet": HINT_SCALE * self.fitnet_loss_weight * fitnet_loss(students, teachers)}

"""What every distiller shares: the student, the ground-truth loss, and the feature plumbing.

The interface (DESIGN.md, "Distiller interface"): a distiller declares the features it needs from the
student and the teacher (`FeatureRequest`: paper stages 1-4, pooled embedding, logits), is built with a
`DistillerContext` (shapes found by a dry run, class count, dataset size, world size), and each step gets
the student's features (computed here, in one pass), the teacher's (computed once by the frozen teacher)
and the step's `Batch` (images, criterion targets, hard labels, dataset indices, mixup lambda).
"""
import argparse
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import nn

from engine.features import FeatureRequest, extract_features


def at_least_fp32(x):
    """`x` in fp32, or fp64 when it already is: the precision every loss computes in, even under autocast."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass
class DistillerContext:
    """What a distiller is built with, besides the student."""
    args: argparse.Namespace
    gt_criterion: nn.Module
    num_classes: int
    teacher: Optional[nn.Module] = None  # the frozen teacher model: read its widths, never call or train it
    student_stages: Dict = field(default_factory=dict)  # requested paper stage -> StageInfo (dry run)
    teacher_stages: Dict = field(default_factory=dict)
    dataset_size: int = 0  # training samples (memory banks keyed by dataset index)
    train_labels: Optional[torch.Tensor] = None  # class of each training sample, by dataset index (int64)
    world_size: int = 1
    student_data_config: Optional[dict] = None  # timm's data config of the student's input: mean, std, input_size


class Distiller(nn.Module):
    """Owns the student and any extra trainable modules; the teacher's features arrive as an argument.

    Subclasses set `student_request`/`teacher_request` (teacher None = no teacher), or override
    `feature_requests(args)` when flags decide them, and implement
    `distill_losses(student_feats, teacher_feats, batch) -> {name: loss}`. A distiller that cannot use
    mixed images sets `supports_mixup = False`. Buffers it keeps identical on every rank itself (memory
    banks updated from all-gathered data) are named by `self_synced_buffers()`, so DDP does not broadcast them.
    """

    student_request = FeatureRequest()
    teacher_request = None
    supports_mixup = True

    def __init__(self, student, context):
        super().__init__()
        self.student = student
        self.gt_criterion = context.gt_criterion
        self.gt_loss_weight = context.args.gt_loss_weight
        self.student_request, self.teacher_request = self.feature_requests(context.args)

    @classmethod
    def feature_requests(cls, args):
        """(student request, teacher request or None) for these arguments."""
        return cls.student_request, cls.teacher_request

    @classmethod
    def add_arguments(cls, parser):
        """Add this distiller's own flags (named as in the reference code)."""

    def extra_parameter_count(self):
        """Trainable parameters beyond the student (projectors, AAD, ...): the paper's Figure 3 overhead."""
        return sum(p.numel() for p in self.extra_parameters())

    def extra_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("student.") and p.requires_grad]

    def self_synced_buffers(self):
        """Names of buffers this distiller keeps identical across processes itself (none by default)."""
        return []

    def extra_state_dict(self):
        return {k: v for k, v in self.state_dict().items() if not k.startswith("student.")}

    def load_extra_state_dict(self, state):
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("student.")]
        if missing or unexpected:
            raise RuntimeError(f"distiller state mismatch: missing {missing}, unexpected {unexpected}")

    def forward(self, batch, teacher_feats=None):
        student_feats = extract_features(self.student, batch.images, self.student_request)
        losses = {"ce": self.gt_loss_weight * self.gt_criterion(student_feats.logits, batch.targets)}
        losses.update(self.distill_losses(student_feats, teacher_feats, batch))
        return student_feats.logits, losses

    def distill_losses(self, student_feats, teacher_feats, batch):
        return {}

"""What every distiller shares: the student, the ground-truth loss, the feature plumbing, and the fp32 policy of
every loss.

The interface: a distiller declares the features it needs from the
student and the teacher (`FeatureRequest`: paper stages 1-4, pooled embedding, logits) and any second frozen
source (`extra_sources`), is built by `distillers.factory.build_distiller` with a `DistillerContext` (each
source's widths and stage layouts found by a dry run, class count, dataset size, world size), and each step gets
the student's features (computed here, in one pass), the teacher's and every extra source's (computed once by the
engine, outside the student's autocast) and the step's `Batch` (images, criterion targets, hard labels, dataset
indices, mixup lambda).

Flags: a class's `add_arguments(parser)`, where it defines one, adds only the flags of that class (the parser
calls it once per class along every registered class's MRO, so a subclass inherits its parent's flags and never
re-adds them). A distiller reads its own flags, the common flags it lists in `shared_flags` (`--kd-loss-weight`,
`--logit-stand`: their help then names it, and `build_distiller` refuses `--logit-stand` to the others), and other
methods' flags only where it lists them in `borrowed_flags` (their help then says so).
"""
import argparse
import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
from torch import nn

from kdcore.features import FeatureRequest, extract_features
from kdcore.stages import OutputInfo


def _at_least_fp32(x):
    """A floating tensor in fp32, or fp64 when it already is; lists and tuples element by element; the rest as is."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() and x.dtype != torch.float64 else x
    if isinstance(x, (list, tuple)):
        return type(x)(_at_least_fp32(v) for v in x)
    return x


def _device_type(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.device.type
        if isinstance(v, (list, tuple)) and v:
            return _device_type(v)
    return "cpu"


def fp32_loss(loss: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The precision policy of every `*_loss`: called with autocast off and every floating tensor argument (and
    each tensor of a list argument) in fp32, or kept in fp64, so bf16/fp16 features under the student's autocast
    never reach a log, an exp or a sum over the batch in low precision.

    Args:
        loss: a loss function of tensors (and plain hyperparameters).

    Returns:
        The same function, wrapped (`functools.wraps`: name, docstring and annotations kept).
    """
    @functools.wraps(loss)
    def in_fp32(*args, **kwargs):
        with torch.autocast(_device_type([*args, *kwargs.values()]), enabled=False):
            return loss(*map(_at_least_fp32, args), **{k: _at_least_fp32(v) for k, v in kwargs.items()})
    return in_fp32


@dataclass
class DistillerContext:
    """What a distiller is built with, besides the student; made only by `distillers.factory.build_distiller`."""
    args: argparse.Namespace
    gt_criterion: nn.Module
    num_classes: int
    student: OutputInfo = field(default_factory=OutputInfo)  # the student's widths and requested stages
    teacher: Optional[OutputInfo] = None  # the teacher's, from its model or its cache; None without a teacher
    sources: Dict[str, OutputInfo] = field(default_factory=dict)  # each extra source's, by SourceSpec.name
    dataset_size: int = 0  # training samples (memory banks keyed by dataset index)
    train_labels: Optional[torch.Tensor] = None  # class of each training sample, by dataset index (int64)
    world_size: int = 1
    seed: int = 0  # the run's --seed (CRD's negatives are drawn from it)
    # {paper stage: (C, H, W)} of the tensor where each teacher stage begins (custom_forward/staged.py), found by a
    # dry run for a method that hooks the live teacher (`needs_live_teacher`: PAT); None otherwise
    teacher_hook_shapes: Optional[dict] = None


class Distiller(nn.Module):
    """Owns the student and any extra trainable modules; the sources' features arrive as arguments.

    Subclasses set `student_request`/`teacher_request` (teacher None = no teacher), or override
    `feature_requests(args)` when flags decide them, and implement
    `distill_losses(student_feats, teacher_feats, batch, **source_feats) -> {name: loss}`, where `source_feats`
    holds the `Features` of each source `extra_sources(args)` declares, by its name. A distiller that cannot use
    mixed images sets `supports_mixup = False`. Buffers it keeps identical on every rank itself (memory
    banks updated from all-gathered data) are named by `self_synced_buffers()`, so DDP does not broadcast them.
    """

    student_request = FeatureRequest()
    teacher_request = None
    supports_mixup = True
    needs_live_teacher = ""  # why the method cannot learn from a teacher cache, if it cannot (PAT)
    shared_flags = ()  # common flags read besides --gt-loss-weight (which every distiller reads)
    borrowed_flags = {}  # {argument dest: registered name of the method that defines it}

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
    def extra_sources(cls, args):
        """The second frozen sources (`kdcore.sources.SourceSpec`) these arguments ask for; the engine builds them."""
        return ()

    def extra_parameter_count(self):
        """Trainable parameters beyond the student (projectors, AAD, ...): the paper's Figure 3 overhead."""
        return sum(p.numel() for p in self.extra_parameters())

    def extra_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("student.") and p.requires_grad]

    def self_synced_buffers(self):
        """Names of buffers this distiller keeps identical across processes itself: by default those its direct
        submodules name by a `self_synced_buffers()` of their own (CRD's `contrast`)."""
        return [f"{name}.{buffer}" for name, module in self.named_children()
                if hasattr(module, "self_synced_buffers") for buffer in module.self_synced_buffers()]

    def attach_teacher(self, source):
        """The engine hands every distiller its frozen teacher source once built; only a method that runs the teacher
        again itself (PAT's prompted pass, through `source.staged_pass`) keeps it, as a plain attribute."""

    def late_gradient(self, module_name):
        """Whether extra module `module_name` may get a zero gradient at the first step by design (PAT's prompt
        convolutions, behind beta = 0); every other extra module gets a gradient at every step."""
        return False

    def extra_state_dict(self):
        return {k: v for k, v in self.state_dict().items() if not k.startswith("student.")}

    def load_extra_state_dict(self, state):
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("student.")]
        if missing or unexpected:
            raise RuntimeError(f"distiller state mismatch: missing {missing}, unexpected {unexpected}")

    def forward(self, batch, teacher_feats=None, source_feats=None):
        student_feats = extract_features(self.student, batch.images, self.student_request)
        losses = {"ce": self.gt_loss_weight * self.gt_criterion(student_feats.logits, batch.targets)}
        losses.update(self.distill_losses(student_feats, teacher_feats, batch, **(source_feats or {})))
        return student_feats.logits, losses

    def distill_losses(self, student_feats, teacher_feats, batch):
        return {}

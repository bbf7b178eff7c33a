"""What every distiller shares: the student, the ground-truth loss, and the feature plumbing."""
from torch import nn

from engine.features import FeatureRequest, extract_features


class Distiller(nn.Module):
    """Owns the student and any extra trainable modules; the teacher's features arrive as an argument.

    Subclasses set `student_request`/`teacher_request` (None = no teacher) and implement
    `distill_losses(student_feats, teacher_feats, targets) -> {name: loss}`.
    """

    student_request = FeatureRequest()
    teacher_request = None

    def __init__(self, student, teacher_model, args, gt_criterion):
        super().__init__()
        self.student = student
        self.gt_criterion = gt_criterion
        self.gt_loss_weight = args.gt_loss_weight

    @classmethod
    def add_arguments(cls, parser):
        """Add this distiller's own flags (named as in the reference code)."""

    def extra_parameter_count(self):
        """Trainable parameters beyond the student (projectors, AAD, ...): the paper's Figure 3 overhead."""
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("student.") and p.requires_grad)

    def extra_state_dict(self):
        return {k: v for k, v in self.state_dict().items() if not k.startswith("student.")}

    def load_extra_state_dict(self, state):
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("student.")]
        if missing or unexpected:
            raise RuntimeError(f"distiller state mismatch: missing {missing}, unexpected {unexpected}")

    def no_weight_decay(self):
        inner = getattr(self.student, "no_weight_decay", None)
        return {f"student.{n}" for n in inner()} if inner else set()

    def forward(self, images, targets, teacher_feats=None):
        student_feats = extract_features(self.student, images, self.student_request)
        losses = {"ce": self.gt_loss_weight * self.gt_criterion(student_feats.logits, targets)}
        losses.update(self.distill_losses(student_feats, teacher_feats, targets))
        return student_feats.logits, losses

    def distill_losses(self, student_feats, teacher_feats, targets):
        return {}

"""CC: Correlation Congruence for Knowledge Distillation (Peng et al., ICCV 2019), as the OFA-KD code runs it.

Both pooled embeddings are mapped to `--correlation-feat-dim` by their own trainable Linear (the
teacher-side one belongs to the distiller); with delta_i = e_s,i - e_t,i the loss couples each sample
with the next one in the batch: scale * mean_i sum_d |delta_i,d| |delta_{i+1},d|, times --kd-loss-weight.
Adjacent pairs are taken over the global batch under DDP (gathered in rank order).
"""
import torch
from torch import nn

from kdcore.distributed import gather_no_grad, gather_with_grad
from kdcore.features import FeatureRequest

from .base import Distiller, fp32_loss
from .registry import register_distiller


@fp32_loss
def correlation_loss(student_embed: torch.Tensor, teacher_embed: torch.Tensor, scale: float) -> torch.Tensor:
    """CC loss in the OFA-KD code's form (the loss, written out; Peng et al., ICCV 2019):
    scale * mean over adjacent samples (i, i+1) of sum_d |delta_i,d| |delta_{i+1},d|, delta = e_s - e_t.

    Args:
        student_embed: (B, d) projected student embeddings e_s.
        teacher_embed: (B, d) projected teacher embeddings e_t.
        scale: the loss scale (`--correlation-scale`, 0.02).

    Returns:
        The scalar loss, computed in fp32 (fp64 kept).
    """
    delta = (student_embed - teacher_embed).abs()
    return scale * (delta[:-1] * delta[1:]).sum(dim=1).mean()


@register_distiller("correlation")
class Correlation(Distiller):
    """CC, Correlation Congruence (Peng et al., ICCV 2019), in the OFA-KD code's form.

    Trainable Linear(D -> `--correlation-feat-dim`) embeddings on both sides; the term is scaled by
    `--correlation-scale` and `--kd-loss-weight`.
    """
    student_request = FeatureRequest(embedding=True)
    teacher_request = FeatureRequest(embedding=True, logits=False)
    shared_flags = ("kd_loss_weight",)

    def __init__(self, student, context):
        super().__init__(student, context)
        args = context.args
        self.correlation_scale, self.kd_loss_weight = args.correlation_scale, args.kd_loss_weight
        self.embed_s = nn.Linear(context.student.embedding_width, args.correlation_feat_dim)
        self.embed_t = nn.Linear(context.teacher.embedding_width, args.correlation_feat_dim)

    @classmethod
    def add_arguments(cls, parser):
        g = parser.add_argument_group("CC (correlation congruence)")
        g.add_argument("--correlation-scale", type=float, default=0.02, help="scale of the CC loss")
        g.add_argument("--correlation-feat-dim", type=int, default=128,
                       help="width of the student and teacher embeddings the loss compares")

    def distill_losses(self, student_feats, teacher_feats, batch):
        # Projected after gathering, so the teacher-side Linear gets the global-batch gradient on every rank.
        student = self.embed_s(gather_with_grad(student_feats.embedding))
        teacher = self.embed_t(gather_no_grad(teacher_feats.embedding))
        return {"correlation": self.kd_loss_weight * correlation_loss(student, teacher, self.correlation_scale)}

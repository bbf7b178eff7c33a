"""DIST: Knowledge Distillation from A Stronger Teacher (Huang et al., NeurIPS 2022).

Matches relations instead of exact probabilities, with d(u, v) = 1 - Pearson(u, v) on y = softmax(logits / tau):
inter-class relation, d between each sample's student and teacher class distributions (rows of the B x C
matrix), averaged over samples; intra-class relation, d between each class's student and teacher scores across
the batch (columns), averaged over classes. L = CE + kd_loss_weight * tau^2 * (beta * inter + gamma * intra).
The intra term is a batch statistic, so it is taken over the global batch under DDP.
"""
import torch
import torch.nn.functional as F

from kdcore.distributed import gather_no_grad, gather_with_grad
from kdcore.features import FeatureRequest

from .base import Distiller, fp32_loss
from .registry import register_distiller

PEARSON_EPS = 1e-8  # added to the product of the norms, as the OFA-KD code


def _row_pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of `a` with the same row of `b`: the cosine of the centred rows."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + PEARSON_EPS)


@fp32_loss
def dist_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor, beta: float, gamma: float,
              tau: float) -> torch.Tensor:
    """The DIST loss (Huang et al., NeurIPS 2022; the paper's loss, written out), with y = softmax(logits / tau):
    tau^2 * (beta * (1 - mean_i Pearson(y_s[i, :], y_t[i, :])) + gamma * (1 - mean_c Pearson(y_s[:, c], y_t[:, c]))).

    Args:
        logits_student: (B, C) student logits, every row of the (global) batch.
        logits_teacher: (B, C) teacher logits.
        beta: weight of the inter-class relation (rows).
        gamma: weight of the intra-class relation (columns).
        tau: the softmax temperature.

    Returns:
        The scalar loss, computed in fp32 (fp64 stays fp64).
    """
    y_s = F.softmax(logits_student / tau, dim=1)
    y_t = F.softmax(logits_teacher.to(y_s.dtype) / tau, dim=1)
    inter = 1 - _row_pearson(y_s, y_t).mean()
    intra = 1 - _row_pearson(y_s.t(), y_t.t()).mean()
    return tau ** 2 * (beta * inter + gamma * intra)


@register_distiller("dist")
class DIST(Distiller):
    """DIST, Knowledge Distillation from A Stronger Teacher (Huang et al., NeurIPS 2022): inter- and intra-class
    Pearson relations of the softened logits. Flags: `--dist-beta 1 --dist-gamma 1 --dist-tau 1`."""
    teacher_request = FeatureRequest(logits=True)
    shared_flags = ("kd_loss_weight",)

    def __init__(self, student, context):
        super().__init__(student, context)
        args = context.args
        self.dist_beta, self.dist_gamma, self.dist_tau = args.dist_beta, args.dist_gamma, args.dist_tau
        self.kd_loss_weight = args.kd_loss_weight

    @classmethod
    def add_arguments(cls, parser):
        g = parser.add_argument_group("DIST")
        g.add_argument("--dist-beta", type=float, default=1.0, help="beta: weight of the inter-class relation")
        g.add_argument("--dist-gamma", type=float, default=1.0, help="gamma: weight of the intra-class relation")
        g.add_argument("--dist-tau", type=float, default=1.0, help="softmax temperature tau")

    def distill_losses(self, student_feats, teacher_feats, batch):
        loss = dist_loss(gather_with_grad(student_feats.logits), gather_no_grad(teacher_feats.logits), self.dist_beta,
                         self.dist_gamma, self.dist_tau)
        return {"dist": self.kd_loss_weight * loss}

"""RKD: Relational Knowledge Distillation (Park et al., CVPR 2019): distance and angle losses.

On the pooled embeddings as they are, of whatever widths: as in the OFA-KD code there is no projector,
since both relations (pairwise distances normalised by their mean, cosines of triplet angles) compare
samples within one model's space. Distance loss: smooth-L1 between the normalised distance matrices;
angle loss: smooth-L1 between the cosines of the angle at e_i between e_j and e_k, for every triplet.
Total: kd_loss_weight * (distance_weight * distance + angle_weight * angle), over the global batch.
"""
import torch
import torch.nn.functional as F

from kdcore.distributed import gather_no_grad, gather_with_grad
from kdcore.features import FeatureRequest

from .base import Distiller, fp32_loss
from .registry import register_distiller


def pairwise_distances(x: torch.Tensor, eps: float, squared: bool) -> torch.Tensor:
    """Euclidean (or, with `squared`, squared) distances from |a|^2 + |b|^2 - 2ab floored at eps; zero diagonal."""
    norms = x.pow(2).sum(dim=1)
    dist = (norms[:, None] + norms[None, :] - 2 * x @ x.t()).clamp(min=eps)
    if not squared:
        dist = dist.sqrt()
    return dist.masked_fill(torch.eye(len(x), dtype=torch.bool, device=x.device), 0)


def normalised_distances(x: torch.Tensor, eps: float, squared: bool) -> torch.Tensor:
    """Pairwise distances divided by the mean of the positive ones."""
    dist = pairwise_distances(x, eps, squared)
    return dist / dist[dist > 0].mean()


def triplet_cosines(x: torch.Tensor) -> torch.Tensor:
    """[i, j, k] = cos of the angle at e_i between e_j and e_k (0 where j or k equals i)."""
    directions = F.normalize(x[None, :, :] - x[:, None, :], dim=2)  # [i, j] = unit(e_j - e_i)
    return directions @ directions.transpose(1, 2)


@fp32_loss
def rkd_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, distance_weight: float, angle_weight: float,
             eps: float, squared: bool) -> torch.Tensor:
    """RKD's distance-wise and angle-wise losses (Park et al., CVPR 2019; written out):
    distance_weight * smooth-L1(normalised distances) + angle_weight * smooth-L1(triplet cosines), in fp32
    (fp64 kept).

    Args:
        student_emb: (B, D_s) student embeddings.
        teacher_emb: (B, D_t) teacher embeddings (any width: only relations within a model are compared).
        distance_weight: weight of the distance loss (25).
        angle_weight: weight of the angle loss (50).
        eps: floor of the squared pairwise distances.
        squared: use squared distances.

    Returns:
        The scalar loss.
    """
    s, t = student_emb, teacher_emb
    distance = F.smooth_l1_loss(normalised_distances(s, eps, squared), normalised_distances(t, eps, squared))
    angle = F.smooth_l1_loss(triplet_cosines(s), triplet_cosines(t))
    return distance_weight * distance + angle_weight * angle


@register_distiller("rkd")
class RKD(Distiller):
    """RKD, Relational Knowledge Distillation (Park et al., CVPR 2019): distance (weight 25) and angle (weight 50)
    relations of the pooled embeddings, times `--kd-loss-weight`."""
    student_request = FeatureRequest(embedding=True)
    teacher_request = FeatureRequest(embedding=True, logits=False)
    shared_flags = ("kd_loss_weight",)

    def __init__(self, student, context):
        super().__init__(student, context)
        args = context.args
        self.kd_loss_weight = args.kd_loss_weight
        self.rkd_distance_weight, self.rkd_angle_weight = args.rkd_distance_weight, args.rkd_angle_weight
        self.rkd_eps, self.rkd_squared = args.rkd_eps, args.rkd_squared

    @classmethod
    def add_arguments(cls, parser):
        g = parser.add_argument_group("RKD")
        g.add_argument("--rkd-distance-weight", type=float, default=25.0, help="weight of the distance loss")
        g.add_argument("--rkd-angle-weight", type=float, default=50.0, help="weight of the angle loss")
        g.add_argument("--rkd-eps", type=float, default=1e-12, help="floor of the squared pairwise distances")
        g.add_argument("--rkd-squared", action="store_true", help="use squared pairwise distances")

    def distill_losses(self, student_feats, teacher_feats, batch):
        student = gather_with_grad(student_feats.embedding)
        teacher = gather_no_grad(teacher_feats.embedding)
        loss = rkd_loss(student, teacher, self.rkd_distance_weight, self.rkd_angle_weight, self.rkd_eps,
                        self.rkd_squared)
        return {"rkd": self.kd_loss_weight * loss}

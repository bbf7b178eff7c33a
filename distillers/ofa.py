"""OFA: One-for-All knowledge distillation (Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous
Architectures in Knowledge Distillation", NeurIPS 2023).

Loss: CE + kd_loss_weight * ofa_loss(final logits, eps_last)
         + ofa_loss_weight * sum over --ofa-stage of ofa_loss(branch logits of the stage, eps_stage),
where each stage's branch (distillers/branches.py) turns a student stage feature into logits.
`--ofa-criterion rsd` is the RSD paper's Table 6: every one of those terms becomes the RSD loss between
the (branch) logits and the teacher logits, over the global batch, with the same weights.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kdcore.distributed import gather_no_grad, gather_with_grad
from kdcore.errors import UserError
from kdcore.features import FeatureRequest, paper_stage

from .base import Distiller, fp32_loss
from .branches import StageBranches
from .registry import register_distiller
from .rsd import rsd_loss


@fp32_loss
def ofa_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor, target_mask: torch.Tensor, eps: float,
             temperature: float) -> torch.Tensor:
    """OFA's target-enhanced loss (Hao et al., NeurIPS 2023; the loss as the OFA-KD code computes it, written out):
    mean_b sum_c -[(p_t + y)^eps - y] * log p_s with p = softmax(logits / T) and y the one-hot target.

    The target class's weight is raised by the teacher's confidence to the power eps (eps > 1 sharpens it);
    no T^2 factor. Computed in fp32 (fp64 stays fp64) with log_softmax, so fp16/bf16 logits cannot turn the
    log of an underflowed probability into NaN.

    Args:
        logits_student: (B, C) student logits (final or a stage branch's).
        logits_teacher: (B, C) teacher logits.
        target_mask: (B, C) one-hot hard targets y.
        eps: the target-enhancement exponent (`--ofa-eps`).
        temperature: the softmax temperature T.

    Returns:
        The scalar loss.
    """
    log_p_s = F.log_softmax(logits_student / temperature, dim=1)
    p_t = F.softmax(logits_teacher.to(log_p_s.dtype) / temperature, dim=1)
    target_mask = target_mask.to(log_p_s.dtype)
    weight = (p_t + target_mask).pow(eps) - target_mask
    return -(weight * log_p_s).sum(dim=1).mean()


def stage_eps(stages: Sequence[int], eps: Sequence[float]) -> tuple[dict[int, float], float]:
    """The eps of each stage (in --ofa-stage order) and of the final logits: one value broadcast to all,
    or exactly one per stage plus one for the logits, as the OFA-KD code.

    Returns:
        ({stage: eps}, eps of the final logits).
    """
    if len(eps) == 1:
        eps = list(eps) * (len(stages) + 1)
    if len(eps) != len(stages) + 1:
        raise UserError(f"--ofa-eps takes one value or one per --ofa-stage plus one for the final logits "
                        f"({len(stages) + 1} here), got {len(eps)}")
    return dict(zip(stages, eps[:-1])), eps[-1]


@register_distiller("ofa")
class OFA(Distiller):
    """OFA, One-for-All heterogeneous distillation (Hao et al., NeurIPS 2023): `ofa_loss` on the final logits and
    on the logits of a branch per `--ofa-stage`; `--ofa-eps` (CIFAR 1.0, ImageNet 1.5). `--ofa-criterion rsd`
    is the RSD paper's Table 6 (ICCV 2025)."""
    shared_flags = ("kd_loss_weight",)
    borrowed_flags = {"rsd_kappa": "rsd"}  # --ofa-criterion rsd: the RSD terms' kappa

    @classmethod
    def feature_requests(cls, args):
        return FeatureRequest(stages=tuple(args.ofa_stage)), FeatureRequest(logits=True)

    def __init__(self, student, context):
        super().__init__(student, context)
        args = context.args
        if len(set(args.ofa_stage)) != len(args.ofa_stage):
            raise UserError(f"--ofa-stage lists a stage twice: {args.ofa_stage}")
        self.ofa_eps_by_stage, self.ofa_eps_logits = stage_eps(args.ofa_stage, args.ofa_eps)
        self.ofa_temperature, self.ofa_criterion = args.ofa_temperature, args.ofa_criterion
        self.kd_loss_weight, self.ofa_loss_weight = args.kd_loss_weight, args.ofa_loss_weight
        self.rsd_kappa = args.rsd_kappa if self.ofa_criterion == "rsd" else None
        self.branches = StageBranches(context.student.stages, context.student.embedding_width,
                                      context.teacher.embedding_width, context.num_classes)

    @classmethod
    def add_arguments(cls, parser):
        g = parser.add_argument_group("OFA")
        g.add_argument("--ofa-stage", type=paper_stage, nargs="*", default=[1, 2, 3, 4],
                       help="paper stages with a branch; none = final logits only (RSD paper, Table 5)")
        g.add_argument("--ofa-eps", type=float, nargs="+", default=[1.0],
                       help="target-enhancement exponent: one value, or one per stage then one for the logits")
        g.add_argument("--ofa-temperature", type=float, default=1.0, help="softmax temperature T")
        g.add_argument("--ofa-loss-weight", type=float, default=1.0, help="weight of the summed stage terms")
        g.add_argument("--ofa-criterion", default="ofa", choices=("ofa", "rsd"),
                       help="rsd: every OFA term becomes the RSD loss on logits (RSD paper, Table 6; "
                            "kappa from --rsd-kappa)")

    def _term(self, logits, teacher_logits, target_mask, eps):
        if self.ofa_criterion == "rsd":
            return rsd_loss(gather_with_grad(logits), teacher_logits, self.rsd_kappa)
        return ofa_loss(logits, teacher_logits, target_mask, eps, self.ofa_temperature)

    def distill_losses(self, student_feats, teacher_feats, batch):
        """{"ofa": kd_loss_weight * term(final logits, eps_last), "ofa_stage<s>": ofa_loss_weight * term(branch s)},
        each term `ofa_loss` (or `rsd_loss` under `--ofa-criterion rsd`)."""
        teacher_logits = teacher_feats.logits
        if self.ofa_criterion == "rsd":
            teacher_logits = gather_no_grad(teacher_logits)
        target_mask = F.one_hot(batch.labels, student_feats.logits.shape[1])
        losses = {"ofa": self.kd_loss_weight * self._term(student_feats.logits, teacher_logits, target_mask,
                                                          self.ofa_eps_logits)}
        for stage, logits in self.branches(student_feats.stages).items():
            losses[f"ofa_stage{stage}"] = self.ofa_loss_weight * self._term(logits, teacher_logits, target_mask,
                                                                           self.ofa_eps_by_stage[stage])
        return losses

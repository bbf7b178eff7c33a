"""Logit distillation: KD (Hinton et al., "Distilling the Knowledge in a Neural Network", NeurIPS 2014 Deep
Learning Workshop, arXiv 1503.02531) and BKD, the binary-cross-entropy variant found in the OFA-KD code
(Hao et al., NeurIPS 2023), which has no paper of its own.

KD:  T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, mean over the batch.
BKD: every student logit read as an independent sigmoid, trained with binary cross-entropy towards the
     teacher's softmax probability of that class, mean over batch and classes.
Both are scaled by --kd-loss-weight and share --kd-temperature. The loss math runs in fp32 (fp64 stays fp64),
so bf16 student logits under autocast never reach a log.
"""
import torch
import torch.nn.functional as F

from kdcore.features import FeatureRequest

from .base import Distiller, fp32_loss
from .registry import register_distiller


@fp32_loss
def kd_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s KD loss (the paper's loss, written out): T^2 * KL(softmax(t / T) || softmax(s / T)),
    summed over the classes, mean over the batch; the T^2 factor keeps the gradient scale independent of T,
    as the paper advises.

    Args:
        logits_student: (B, C) student logits s.
        logits_teacher: (B, C) teacher logits t.
        temperature: the softmax temperature T.

    Returns:
        The scalar loss, computed in fp32 (fp64 stays fp64).
    """
    log_p_s = F.log_softmax(logits_student / temperature, dim=1)
    log_p_t = F.log_softmax(logits_teacher.to(log_p_s.dtype) / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature ** 2


@fp32_loss
def bkd_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """BKD as the OFA-KD code computes it (written out; no paper equation):
    mean_{b,c} BCE(sigmoid(s_bc / T), softmax(t_b / T)_c) * T^2.

    The OFA-KD code applies no temperature (it is this at T = 1, the --kd-temperature default); with T != 1 both
    sides are softened by T and the T^2 factor keeps the gradient scale of KD. The minimum over the student
    logits is at s / T = logit(p_t). Arguments and result as for `kd_loss`.
    """
    s = logits_student / temperature
    p_t = F.softmax(logits_teacher.to(s.dtype) / temperature, dim=1)
    return F.binary_cross_entropy_with_logits(s, p_t) * temperature ** 2


@register_distiller("kd")
class KD(Distiller):
    """KD, knowledge distillation (Hinton et al., NeurIPS 2014 Deep Learning Workshop, arXiv 1503.02531):
    CE + `--kd-loss-weight` * T^2 KL on the logits softened by `--kd-temperature` (default 1)."""
    teacher_request = FeatureRequest(logits=True)
    shared_flags = ("kd_loss_weight",)

    def __init__(self, student, context):
        super().__init__(student, context)
        args = context.args
        self.kd_temperature, self.kd_loss_weight = args.kd_temperature, args.kd_loss_weight

    @classmethod
    def add_arguments(cls, parser):
        g = parser.add_argument_group("KD")
        g.add_argument("--kd-temperature", type=float, default=1.0, help="softmax temperature T (KD and BKD)")

    def distill_losses(self, student_feats, teacher_feats, batch):
        return {"kd": self.kd_loss_weight * kd_loss(student_feats.logits, teacher_feats.logits, self.kd_temperature)}


@register_distiller("bkd")
class BKD(KD):
    """BKD, binary KD from the OFA-KD code (Hao et al., NeurIPS 2023; no paper of its own): KD's flags, with
    the KL replaced by a BCE of each student logit against the teacher's softmax probability of that class."""

    def distill_losses(self, student_feats, teacher_feats, batch):
        return {"bkd": self.kd_loss_weight * bkd_loss(student_feats.logits, teacher_feats.logits, self.kd_temperature)}

"""Logit distillation: KD (Hinton et al., "Distilling the Knowledge in a Neural Network", NeurIPS 2014 Deep
Learning Workshop, arXiv 1503.02531) and BKD, the binary-cross-entropy variant found in the OFA-KD code
(Hao et al., NeurIPS 2023), which has no paper of its own.

KD:  T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, mean over the batch.
BKD: every student logit read as an independent sigmoid, trained with binary cross-entropy towards the
     teacher's softmax probability of that class, mean over batch and classes.
Both are scaled by --kd-loss-weight and share --kd-temperature. The loss math runs in fp32 (fp64 stays fp64),
so bf16 student logits under autocast never reach a log.

--logit-stand (Sun et al., "Logit Standard Deviation as Adaptive Temperature for Knowledge Distillation",
CVPR 2024) z-scores the logits of both sides per sample, Z(z) = (z - mean_c z) / (std_c z + 1e-7) with the
unbiased std, before the division by T; the gradient flows through the student's mean and std. It is read by KD,
BKD, DKD and RichKD's (L) term; CE always sees the raw logits.
"""
import torch
import torch.nn.functional as F

from kdcore.features import FeatureRequest

from .base import Distiller, fp32_loss
from .registry import register_distiller

LOGIT_STAND_EPS = 1e-7  # added to the std, as the LS-KD code; subnormal in fp16, hence fp32 (`fp32_loss`)


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Z(z) = (z - mean_c z) / (std_c z + 1e-7) per row of (B, C) logits, unbiased std over the classes.

    A row of equal logits (a zero-initialised head, as timm's Mixer and ResMLP have) maps to zeros and its gradient
    is scaled by 1e7: finite, but large. Called inside the `fp32_loss` functions only, so it runs in fp32 or fp64.
    """
    centered = logits - logits.mean(dim=1, keepdim=True)
    return centered / (logits.std(dim=1, keepdim=True) + LOGIT_STAND_EPS)


def standardized_pair(logits_student, logits_teacher, logit_stand):
    """Both sides z-scored by `standardize` when `logit_stand`, else unchanged; the teacher in the student's dtype."""
    logits_teacher = logits_teacher.to(logits_student.dtype)
    if logit_stand:
        return standardize(logits_student), standardize(logits_teacher)
    return logits_student, logits_teacher


@fp32_loss
def kd_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor, temperature: float,
            logit_stand: bool = False) -> torch.Tensor:
    """Hinton et al.'s KD loss (the paper's loss, written out): T^2 * KL(softmax(t / T) || softmax(s / T)),
    summed over the classes, mean over the batch; the T^2 factor keeps the gradient scale independent of T,
    as the paper advises.

    Args:
        logits_student: (B, C) student logits s.
        logits_teacher: (B, C) teacher logits t.
        temperature: the softmax temperature T.
        logit_stand: z-score both sides (`standardize`) before dividing by T (LS-KD).

    Returns:
        The scalar loss, computed in fp32 (fp64 stays fp64).
    """
    logits_student, logits_teacher = standardized_pair(logits_student, logits_teacher, logit_stand)
    log_p_s = F.log_softmax(logits_student / temperature, dim=1)
    log_p_t = F.log_softmax(logits_teacher / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature ** 2


@fp32_loss
def bkd_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor, temperature: float,
             logit_stand: bool = False) -> torch.Tensor:
    """BKD as the OFA-KD code computes it (written out; no paper equation):
    mean_{b,c} BCE(sigmoid(s_bc / T), softmax(t_b / T)_c) * T^2.

    The OFA-KD code applies no temperature (it is this at T = 1, the --kd-temperature default); with T != 1 both
    sides are softened by T and the T^2 factor keeps the gradient scale of KD. The minimum over the student
    logits is at s / T = logit(p_t). Arguments and result as for `kd_loss`.

    With `logit_stand` (our choice: BKD has no LS setting of its own) both sides are z-scored before T, as in KD:
    each sigmoid(Z(s)_c / T) is trained towards softmax(Z(t) / T)_c, with the same T^2 factor.
    """
    logits_student, logits_teacher = standardized_pair(logits_student, logits_teacher, logit_stand)
    s = logits_student / temperature
    p_t = F.softmax(logits_teacher / temperature, dim=1)
    return F.binary_cross_entropy_with_logits(s, p_t) * temperature ** 2


@register_distiller("kd")
class KD(Distiller):
    """KD, knowledge distillation (Hinton et al., NeurIPS 2014 Deep Learning Workshop, arXiv 1503.02531):
    CE + `--kd-loss-weight` * T^2 KL on the logits softened by `--kd-temperature` (default 1), z-scored first
    with `--logit-stand`."""
    teacher_request = FeatureRequest(logits=True)
    shared_flags = ("kd_loss_weight", "logit_stand")

    def __init__(self, student, context):
        super().__init__(student, context)
        args = context.args
        self.kd_temperature, self.kd_loss_weight = args.kd_temperature, args.kd_loss_weight
        self.logit_stand = args.logit_stand

    @classmethod
    def add_arguments(cls, parser):
        g = parser.add_argument_group("KD")
        g.add_argument("--kd-temperature", type=float, default=1.0, help="softmax temperature T (KD and BKD)")

    def distill_losses(self, student_feats, teacher_feats, batch):
        loss = kd_loss(student_feats.logits, teacher_feats.logits, self.kd_temperature, self.logit_stand)
        return {"kd": self.kd_loss_weight * loss}


@register_distiller("bkd")
class BKD(KD):
    """BKD, binary KD from the OFA-KD code (Hao et al., NeurIPS 2023; no paper of its own): KD's flags, with
    the KL replaced by a BCE of each student logit against the teacher's softmax probability of that class."""

    def distill_losses(self, student_feats, teacher_feats, batch):
        loss = bkd_loss(student_feats.logits, teacher_feats.logits, self.kd_temperature, self.logit_stand)
        return {"bkd": self.kd_loss_weight * loss}

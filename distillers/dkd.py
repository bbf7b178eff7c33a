"""DKD: Decoupled Knowledge Distillation (Zhao et al., CVPR 2022).

The paper rewrites KD's KL as TCKD + (1 - p_target^T) * NCKD: TCKD, the KL between the binary
(target class vs all others) distributions of teacher and student; NCKD, the KL between their softmaxes over
the non-target classes only. DKD drops the coupling factor and weights the two freely:
L = CE + kd_loss_weight * T^2 * (alpha * TCKD + beta * NCKD). Each KL is summed over its classes and averaged
over the batch, as the OFA-KD code. The target is the hard label; under mixup/cutmix, the dominant class.

The warm-up of the DKD authors' code (the term scaled by min(epoch / warmup, 1)) is omitted: the OFA-KD code,
whose DKD the RSD paper's tables report, has none.
"""
import torch
import torch.nn.functional as F

from kdcore.features import FeatureRequest

from .base import Distiller, fp32_loss
from .kd import standardized_pair
from .registry import register_distiller

TARGET_MASK = 1000.0  # subtracted from the target logit (after dividing by T) to leave it out of NCKD's softmax


def _binary_log_probs(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log p_target and log(1 - p_target) of softmax(z), from log-sum-exps so that neither underflows."""
    log_target = z.masked_fill(~target, float("-inf")).logsumexp(dim=1)
    log_rest = z.masked_fill(target, float("-inf")).logsumexp(dim=1)
    return torch.stack([log_target, log_rest], dim=1) - z.logsumexp(dim=1, keepdim=True)


def _kl(log_p_student: torch.Tensor, log_p_teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student), summed over the classes, mean over the batch."""
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


@fp32_loss
def dkd_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor, labels: torch.Tensor, alpha: float,
             beta: float, temperature: float, logit_stand: bool = False) -> torch.Tensor:
    """The DKD loss (Zhao et al., CVPR 2022; the paper's loss, written out): T^2 * (alpha * TCKD + beta * NCKD).

    TCKD = KL(b_t || b_s) over the binary (target, rest) probabilities; NCKD = KL over the softmax of the
    non-target classes (the target logit masked by -1000 after dividing by T).

    Args:
        logits_student: (B, C) student logits.
        logits_teacher: (B, C) teacher logits.
        labels: (B,) hard labels (int64).
        alpha: weight of TCKD.
        beta: weight of NCKD.
        temperature: the softmax temperature T.
        logit_stand: z-score both sides (`distillers.kd.standardize`) before dividing by T and masking (LS-KD).

    Returns:
        The scalar loss, computed in fp32 (fp64 stays fp64).
    """
    logits_student, logits_teacher = standardized_pair(logits_student, logits_teacher, logit_stand)
    z_s = logits_student / temperature
    z_t = logits_teacher / temperature
    target = F.one_hot(labels, z_s.shape[1]).bool()
    tckd = _kl(_binary_log_probs(z_s, target), _binary_log_probs(z_t, target))
    mask = TARGET_MASK * target.to(z_s.dtype)
    nckd = _kl(F.log_softmax(z_s - mask, dim=1), F.log_softmax(z_t - mask, dim=1))
    return temperature ** 2 * (alpha * tckd + beta * nckd)


@register_distiller("dkd")
class DKD(Distiller):
    """DKD, Decoupled Knowledge Distillation (Zhao et al., CVPR 2022): TCKD and NCKD weighted freely.
    Flags: `--dkd-alpha 1 --dkd-beta 2 --dkd-temperature 1`; weight `--kd-loss-weight`; `--logit-stand`."""
    teacher_request = FeatureRequest(logits=True)
    shared_flags = ("kd_loss_weight", "logit_stand")

    def __init__(self, student, context):
        super().__init__(student, context)
        args = context.args
        self.dkd_alpha, self.dkd_beta, self.dkd_temperature = args.dkd_alpha, args.dkd_beta, args.dkd_temperature
        self.kd_loss_weight, self.logit_stand = args.kd_loss_weight, args.logit_stand

    @classmethod
    def add_arguments(cls, parser):
        g = parser.add_argument_group("DKD")
        g.add_argument("--dkd-alpha", type=float, default=1.0, help="alpha: weight of TCKD (target vs rest)")
        g.add_argument("--dkd-beta", type=float, default=2.0, help="beta: weight of NCKD (non-target classes)")
        g.add_argument("--dkd-temperature", type=float, default=1.0, help="softmax temperature T")

    def distill_losses(self, student_feats, teacher_feats, batch):
        loss = dkd_loss(student_feats.logits, teacher_feats.logits, batch.labels, self.dkd_alpha, self.dkd_beta,
                        self.dkd_temperature, self.logit_stand)
        return {"dkd": self.kd_loss_weight * loss}

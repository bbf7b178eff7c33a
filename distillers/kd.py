"""Hinton KD: T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean (REFERENCE.md §4)."""
import torch.nn.functional as F

from engine.features import FeatureRequest

from .base import Distiller
from .registry import register_distiller


def kd_loss(student_logits, teacher_logits, temperature):
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature ** 2


@register_distiller("kd")
class KD(Distiller):
    teacher_request = FeatureRequest(logits=True)

    def __init__(self, student, context):
        super().__init__(student, context)
        args = context.args
        self.temperature, self.kd_loss_weight = args.kd_temperature, args.kd_loss_weight

    @classmethod
    def add_arguments(cls, parser):
        g = parser.add_argument_group("KD")
        g.add_argument("--kd-temperature", type=float, default=1.0, help="softmax temperature T")

    def distill_losses(self, student_feats, teacher_feats, batch):
        return {"kd": self.kd_loss_weight * kd_loss(student_feats.logits, teacher_feats.logits, self.temperature)}

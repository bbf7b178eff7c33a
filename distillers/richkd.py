"""RichKD: Enriching Knowledge Distillation with Cross-Modal Teacher Fusion (Mansourian et al., arXiv 2511.09286).

A second frozen source C (CLIP ViT-L/14 zero-shot in the paper) is fused with the task teacher T, alpha = 0.7:
- (L): z_F = alpha z_T + (1 - alpha) z_C, and 3 * T^2 * KL(softmax(z_F / T) || softmax(z_S / T)) with T = 3.
- (F): CRD (distillers/crd.py: its heads, memory banks, negatives and NCE loss) with the teacher-side embedding
  replaced by the fused normalise(alpha g_T(e_T) + (1 - alpha) g_C(e_C)), where g_T and g_C are each source's
  own Linear(-> 128) + L2 head; weight 0.8.
- (LF): both. The ground-truth CE (--gt-loss-weight) is added as in every distiller.
These are the paper's weights (its code's RICH config), not KD's or CRD's defaults; --kd-loss-weight is not read.
--logit-stand z-scores the (L) term's two sides, z_S and the fused z_F (fusion first, on the raw logits as the
paper fuses them); (F) has no logits, so --richkd-mode F refuses it.

The second source is either a cache (--richkd-cache, written by tools/build_cache.py from clean images, rows
read by the batch's dataset indices: the paper's way, training never runs CLIP) or a live frozen timm model
(--richkd-source/--richkd-source-pretrained), run once per step on the batch after remapping it to its own
--richkd-source-mean/std/img-size (each defaulting to the student's). This file only declares it
(`extra_sources`); the engine builds it beside the teacher and hands its features to `distill_losses`.
(F) reads CRD's --crd-feat-dim, --crd-k, --crd-momentum, --crd-temperature and --crd-nce-eps.

Mixup/cutmix: supported. A live source sees the mixed images. Cached rows belong to the clean images, so they
are mixed with the images' own weight and pairing (lam * row_i + (1 - lam) * row_{B-1-i}, as timm's Mixup
pairs image i with image B-1-i and mixes the targets): for cutmix lam is the pasted area's complement, and for
both this stands in for the source's output on the mixed image, which was never computed.
"""
import torch
import torch.nn.functional as F
from torch import nn

from kdcore.errors import UserError
from kdcore.features import FeatureRequest
from kdcore.sources import SourceSpec, add_source_arguments

from .base import Distiller, fp32_loss
from .contrastive import L2Embedding
from .crd import contrastive_memory
from .kd import kd_loss
from .registry import register_distiller

MODES = ("L", "F", "LF")
SECOND_SOURCE = "second_source"  # its keyword in distill_losses


def fuse(teacher: torch.Tensor, source: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * teacher + (1 - alpha) * source: the fused logits z_F (or the fused, unnormalised embedding)."""
    return alpha * teacher + (1 - alpha) * source


def fused_embedding(embedding_teacher: torch.Tensor, embedding_source: torch.Tensor, alpha: float) -> torch.Tensor:
    """normalise(alpha g_T(e_T) + (1 - alpha) g_C(e_C)), from the two heads' (already L2-normalised) outputs."""
    return F.normalize(fuse(embedding_teacher, embedding_source, alpha), dim=1)


@fp32_loss
def richkd_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor, logits_source: torch.Tensor,
                alpha: float, temperature: float, logit_stand: bool = False) -> torch.Tensor:
    """RichKD's logit term (L) without its weight (Mansourian et al., arXiv 2511.09286; written out):
    T^2 * KL(softmax(z_F / T) || softmax(z_S / T)), z_F = alpha z_T + (1 - alpha) z_C, batch mean, in fp32
    (fp64 stays).

    Args:
        logits_student: (B, C) student logits z_S.
        logits_teacher: (B, C) task-teacher logits z_T.
        logits_source: (B, C) second-source (CLIP zero-shot) logits z_C.
        alpha: fusion weight of the task teacher (0.7).
        temperature: the softmax temperature T (3).
        logit_stand: z-score z_S and z_F before dividing by T (LS-KD, as `kd_loss`).

    Returns:
        The scalar loss.
    """
    return kd_loss(logits_student, fuse(logits_teacher, logits_source, alpha), temperature, logit_stand)


class FusedEmbedding(nn.Module):
    """CRD's teacher-side head for RichKD: reads [e_T, e_C] side by side, gives fused_embedding(g_T(e_T), g_C(e_C))."""

    def __init__(self, teacher_head, source_head, alpha):
        super().__init__()
        self.teacher, self.source, self.alpha = teacher_head, source_head, alpha
        self.split = teacher_head.linear.in_features

    def forward(self, x):
        return fused_embedding(self.teacher(x[:, :self.split]), self.source(x[:, self.split:]), self.alpha)


@register_distiller("richkd")
class RichKD(Distiller):
    """RichKD, cross-modal teacher fusion (Mansourian et al., arXiv 2511.09286): `--richkd-mode` L (KD on the
    fused logits), F (CRD against the fused embedding) or LF (both); in (L) alone no contrastive component is
    built. Defaults: alpha 0.7, T 3, weights 3 (L) and 0.8 (F)."""
    shared_flags = ("logit_stand",)
    borrowed_flags = {flag: "crd" for flag in ("crd_feat_dim", "crd_k", "crd_momentum", "crd_temperature",
                                               "crd_nce_eps")}

    @classmethod
    def feature_requests(cls, args):
        logits, contrastive = "L" in args.richkd_mode, "F" in args.richkd_mode
        return FeatureRequest(embedding=contrastive), FeatureRequest(logits=logits, embedding=contrastive)

    @classmethod
    def extra_sources(cls, args):
        request = FeatureRequest(logits="L" in args.richkd_mode, embedding="F" in args.richkd_mode)
        return (SourceSpec(SECOND_SOURCE, "--richkd", request),)

    def __init__(self, student, context):
        super().__init__(student, context)
        args = context.args
        self.richkd_mode = args.richkd_mode
        self.richkd_alpha, self.richkd_temperature = args.richkd_alpha, args.richkd_temperature
        self.richkd_logit_weight, self.richkd_feat_weight = args.richkd_logit_weight, args.richkd_feat_weight
        self.logit_stand = args.logit_stand
        if self.logit_stand and "L" not in self.richkd_mode:
            raise UserError("--logit-stand standardises RichKD's logit term, which --richkd-mode F has none of: "
                            "use --richkd-mode L or LF, or drop --logit-stand")
        if "F" in self.richkd_mode:  # CRD's heads, banks, negatives and Z, then g_C beside g_T
            self.contrast = contrastive_memory(args, context, context.teacher.embedding_width, "richkd")
            source_head = L2Embedding(context.sources[SECOND_SOURCE].embedding_width, args.crd_feat_dim)
            self.contrast.embed_t = FusedEmbedding(self.contrast.embed_t, source_head, self.richkd_alpha)

    @classmethod
    def add_arguments(cls, parser):
        g = parser.add_argument_group("RichKD")
        g.add_argument("--richkd-mode", default="LF", choices=MODES,
                       help="L: fused-logit KD; F: CRD against the fused embedding; LF: both")
        g.add_argument("--richkd-alpha", type=float, default=0.7, help="fusion weight of the task teacher")
        g.add_argument("--richkd-temperature", type=float, default=3.0, help="(L) softmax temperature T")
        g.add_argument("--richkd-logit-weight", type=float, default=3.0, help="weight of the (L) term")
        g.add_argument("--richkd-feat-weight", type=float, default=0.8, help="weight of the (F) term")
        add_source_arguments(g, "--richkd", "second source")

    def distill_losses(self, student_feats, teacher_feats, batch, second_source):
        losses = {}
        if "L" in self.richkd_mode:
            losses["richkd_logit"] = self.richkd_logit_weight * richkd_loss(
                student_feats.logits, teacher_feats.logits, second_source.logits, self.richkd_alpha,
                self.richkd_temperature, self.logit_stand)
        if "F" in self.richkd_mode:
            side_by_side = torch.cat([teacher_feats.embedding.float(), second_source.embedding.float()], dim=1)
            losses["richkd_feat"] = self.richkd_feat_weight * self.contrast(student_feats.embedding, side_by_side,
                                                                            batch.index)
        return losses

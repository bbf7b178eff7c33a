"""RichKD: Enriching Knowledge Distillation with Cross-Modal Teacher Fusion (Mansourian et al., arXiv 2511.09286;
REFERENCE.md §6).

A second frozen source C (CLIP ViT-L/14 zero-shot in the paper) is fused with the task teacher T, alpha = 0.7:
- (L): z_F = alpha z_T + (1 - alpha) z_C, and 3 * T^2 * KL(softmax(z_F / T) || softmax(z_S / T)) with T = 3.
- (F): CRD (distillers/crd.py: its heads, memory banks, negatives and NCE loss) with the teacher-side embedding
  replaced by the fused normalise(alpha g_T(e_T) + (1 - alpha) g_C(e_C)), where g_T and g_C are each source's
  own Linear(-> 128) + L2 head; weight 0.8.
- (LF): both. The ground-truth CE (--gt-loss-weight) is added as in every distiller.
These are the paper's weights (its code's RICH config), not KD's or CRD's defaults; --kd-loss-weight is not read.

The second source is either a cache (--richkd-cache, written by tools/build_cache.py from clean images, rows
read by the batch's dataset indices: the paper's way, training never runs CLIP) or a live frozen timm model
(--richkd-source/--richkd-source-pretrained), run once per step on the batch after remapping it to its own
--richkd-source-mean/std/img-size (each defaulting to the student's).

Mixup/cutmix: supported. A live source sees the mixed images. Cached rows belong to the clean images, so they
are mixed with the images' own weight and pairing (lam * row_i + (1 - lam) * row_{B-1-i}, as timm's Mixup
pairs image i with image B-1-i and mixes the targets): for cutmix lam is the pasted area's complement, and for
both this stands in for the source's output on the mixed image, which was never computed.
"""
import torch
import torch.nn.functional as F
from torch import nn

from engine.cache import SourceCache, mix_like_images
from engine.errors import UserError
from engine.features import FeatureRequest, Features
from engine.models import create_model, embedding_dim, load_weights
from engine.teacher import FrozenSource, InputSpec
from engine.train_args import add_input_spec_arguments

from .base import Distiller, at_least_fp32
from .crd import CRD, L2Embedding
from .kd import kd_loss
from .registry import register_distiller

MODES = ("L", "F", "LF")


def fuse(teacher, source, alpha):
    """alpha * teacher + (1 - alpha) * source: the fused logits z_F (or the fused, unnormalised embedding)."""
    return alpha * teacher + (1 - alpha) * source


def fused_embedding(embedding_teacher, embedding_source, alpha):
    """normalise(alpha g_T(e_T) + (1 - alpha) g_C(e_C)), from the two heads' (already L2-normalised) outputs."""
    return F.normalize(fuse(embedding_teacher, embedding_source, alpha), dim=1)


def richkd_loss(logits_student, logits_teacher, logits_source, alpha, temperature):
    """(L) without its weight: T^2 * KL(softmax(z_F / T) || softmax(z_S / T)), batch mean, in fp32 (fp64 stays)."""
    fused = fuse(at_least_fp32(logits_teacher), at_least_fp32(logits_source), alpha)
    return kd_loss(logits_student, fused, temperature)


class FusedEmbedding(nn.Module):
    """CRD's teacher-side head for RichKD: reads [e_T, e_C] side by side, gives fused_embedding(g_T(e_T), g_C(e_C))."""

    def __init__(self, teacher_head, source_head, alpha):
        super().__init__()
        self.teacher, self.source, self.alpha = teacher_head, source_head, alpha
        self.split = teacher_head.linear.in_features

    def forward(self, x):
        return fused_embedding(self.teacher(x[:, :self.split]), self.source(x[:, self.split:]), self.alpha)


class CachedSource:
    """The second source read from a cache: the rows of the batch's dataset indices, mixed as the images were."""

    def __init__(self, cache):
        self.cache = cache

    def embedding_width(self):
        return self.cache.width("embedding")

    def __call__(self, batch):
        rows = self.cache.lookup(batch.index)
        return Features(*(None if x is None else mix_like_images(x, batch.lam) for x in (rows.logits, rows.embedding)))


class LiveSource:
    """The second source as a frozen model run on the (mixed) batch, in its own precision even under the
    student's autocast."""

    def __init__(self, frozen):
        self.frozen = frozen

    def embedding_width(self):
        return embedding_dim(self.frozen.model)

    def __call__(self, batch):
        with torch.autocast(batch.images.device.type, enabled=False):
            return self.frozen(batch.images)


def build_second_source(args, student, context, request):
    """A CachedSource (--richkd-cache) or a LiveSource (--richkd-source), checked against the run."""
    needs = [k for k, wanted in (("logits", request.logits), ("embedding", request.embedding)) if wanted]
    if bool(args.richkd_cache) == bool(args.richkd_source):
        raise UserError("--distiller richkd needs one second source: --richkd-cache DIR (tools/build_cache.py) or "
                        "--richkd-source MODEL --richkd-source-pretrained PATH")
    if args.richkd_cache:
        if context.train_labels is None:
            raise UserError("--richkd-cache needs the class of every training sample to check the cache against")
        cache = SourceCache(args.richkd_cache)
        cache.check(context.train_labels, needs, context.num_classes)
        return CachedSource(cache)
    if not args.richkd_source_pretrained:
        raise UserError(f"--richkd-source {args.richkd_source} needs --richkd-source-pretrained PATH (its trained "
                        f"checkpoint); a randomly initialised source teaches nothing")
    student_input = InputSpec.of_data_config(context.student_data_config)  # --richkd-source-* default to it
    source_input = student_input.with_overrides(args.richkd_source_mean, args.richkd_source_std,
                                                args.richkd_source_img_size)
    model = create_model(args.richkd_source, num_classes=context.num_classes, img_size=source_input.size[0])
    load_weights(model, args.richkd_source_pretrained, args.richkd_source, role="second source")
    return LiveSource(FrozenSource(model, request, args.device, args.teacher_precision, student_input=student_input,
                                   source_input=source_input, compile=args.compile))


@register_distiller("richkd")
class RichKD(CRD):
    """(L), (F) or both; in (L) alone none of CRD's heads and memory banks are built."""

    @classmethod
    def feature_requests(cls, args):
        logits, contrastive = "L" in args.richkd_mode, "F" in args.richkd_mode
        return FeatureRequest(embedding=contrastive), FeatureRequest(logits=logits, embedding=contrastive)

    def __init__(self, student, context):
        args = context.args
        if "F" in args.richkd_mode:
            super().__init__(student, context)  # CRD: g_S, g_T, banks, negatives, Z
        else:
            Distiller.__init__(self, student, context)
        self.logit_term, self.contrastive = "L" in args.richkd_mode, "F" in args.richkd_mode
        # not `temperature`: CRD's NCE temperature has that name
        self.alpha, self.logit_temperature = args.richkd_alpha, args.richkd_temperature
        self.logit_weight = args.richkd_logit_weight
        self.second_source = build_second_source(args, student, context, FeatureRequest(
            logits=self.logit_term, embedding=self.contrastive))  # a plain attribute: never trained or saved
        if self.contrastive:
            self.loss_weight = args.richkd_feat_weight  # CRD's term weight
            self.embed_t = FusedEmbedding(self.embed_t, L2Embedding(self.second_source.embedding_width(),
                                                                    args.crd_feat_dim), self.alpha)

    @classmethod
    def add_arguments(cls, parser):
        """RichKD's own flags; (F) also reads CRD's --crd-feat-dim, --crd-k, --crd-momentum, --crd-temperature."""
        g = parser.add_argument_group("RichKD")
        g.add_argument("--richkd-mode", default="LF", choices=MODES,
                       help="L: fused-logit KD; F: CRD against the fused embedding; LF: both")
        g.add_argument("--richkd-alpha", type=float, default=0.7, help="fusion weight of the task teacher")
        g.add_argument("--richkd-temperature", type=float, default=3.0, help="(L) softmax temperature T")
        g.add_argument("--richkd-logit-weight", type=float, default=3.0, help="weight of the (L) term")
        g.add_argument("--richkd-feat-weight", type=float, default=0.8, help="weight of the (F) term")
        g.add_argument("--richkd-cache", default="", help="cached second source (tools/build_cache.py)")
        g.add_argument("--richkd-source", default="", help="live second source: a timm model name")
        g.add_argument("--richkd-source-pretrained", default="", help="the live source's checkpoint")
        add_input_spec_arguments(g, "--richkd-source", "the live source")

    def self_synced_buffers(self):
        return super().self_synced_buffers() if self.contrastive else []

    def distill_losses(self, student_feats, teacher_feats, batch):
        source = self.second_source(batch)
        losses = {}
        if self.logit_term:
            losses["richkd_logit"] = self.logit_weight * richkd_loss(student_feats.logits, teacher_feats.logits,
                                                                     source.logits, self.alpha,
                                                                     self.logit_temperature)
        if self.contrastive:
            side_by_side = torch.cat([teacher_feats.embedding.float(), source.embedding.float()], dim=1)
            losses["richkd_feat"] = super().distill_losses(student_feats, Features(embedding=side_by_side),
                                                           batch)["crd"]
        return losses

"""CRD: Contrastive Representation Distillation (Tian et al., ICLR 2020), as the OFA-KD code runs it.

Each pooled embedding goes through its own trainable head, Linear(D -> feat_dim) then L2 normalisation
(the paper's g_S and g_T). Each is contrasted with the *other* model's memory bank: the positive is the bank
row of the sample itself, the K negatives are rows of K samples of other classes. With the critic
h = exp(<v, m> / T) / Z and a uniform noise distribution 1/N over the N training samples, the paper's NCE
objective for one anchor is

    L = -(1/B) sum_b [ log h_pos / (h_pos + K/N) + sum_k log (K/N) / (h_neg,k + K/N) ]

and CRD sums it over both anchors (student embedding vs teacher bank, teacher embedding vs student bank).
Z is estimated once, from the first batch, as N times the mean of exp(<v, m> / T), then frozen. After the
loss, each bank row at the batch's indices moves towards the sample's new embedding (momentum 0.5) and is
renormalised.

Loss weight: the OFA-KD code scales the CRD term by `--kd-loss-weight` (1.0); the CRD paper (and RichKD)
use 0.8 with the ground-truth loss: pass `--kd-loss-weight 0.8` for that.

Distributed: negatives are drawn for the whole global batch from a generator seeded by (--seed, step), so
each sample gets the same negatives whatever the process count (on a given device type); each process then
scores its own rows. Z is estimated over the global first batch, and every process applies the same
all-gathered (index, embedding) update to its banks, so they stay identical without DDP broadcasting them.

Mixup/cutmix: supported as in the OFA-KD code, which applies timm's Mixup before CRD: a mixed image keeps
its own dataset index as the positive, its negatives exclude the class of the sample at that index, and its
(mixed) embedding updates that index's bank rows. The paper's ViT/MLP configs use mixup, so refusing it would
break those command lines.

Memory: two fp32 banks of N x feat_dim (61 MB for Fashion-MNIST's 60,000 images, 1.31 GB for ImageNet-1k's
1,281,167); each step also holds a copy of both banks until its backward, and a transient B x N matrix of
scores (328 MB for ImageNet at a local batch of 64).
"""
from kdcore.features import FeatureRequest

from .base import Distiller
from .contrastive import ContrastiveMemory
from .registry import register_distiller


@register_distiller("crd")
class CRD(Distiller):
    """CRD, Contrastive Representation Distillation (Tian et al., ICLR 2020): the NCE objective against two
    memory banks, on the pooled embeddings.

    Flags: `--crd-feat-dim 128 --crd-k 16384 --crd-momentum 0.5 --crd-temperature 0.07`; weight `--kd-loss-weight`.
    """
    student_request = FeatureRequest(embedding=True)
    teacher_request = FeatureRequest(logits=False, embedding=True)
    shared_flags = ("kd_loss_weight",)

    def __init__(self, student, context):
        super().__init__(student, context)
        args = context.args
        self.kd_loss_weight = args.kd_loss_weight
        self.contrast = contrastive_memory(args, context, context.teacher.embedding_width, "crd")

    @classmethod
    def add_arguments(cls, parser):
        g = parser.add_argument_group("CRD")
        g.add_argument("--crd-feat-dim", type=int, default=128, help="width of the L2-normalised embeddings")
        g.add_argument("--crd-k", type=int, default=16384, help="K: negatives per sample (other classes only)")
        g.add_argument("--crd-momentum", type=float, default=0.5, help="memory bank update momentum")
        g.add_argument("--crd-temperature", type=float, default=0.07, help="NCE temperature T")
        g.add_argument("--crd-nce-eps", type=float, default=1e-7, help="eps in the NCE denominators")

    def distill_losses(self, student_feats, teacher_feats, batch):
        loss = self.contrast(student_feats.embedding, teacher_feats.embedding, batch.index)
        return {"crd": self.kd_loss_weight * loss}


def contrastive_memory(args, context, teacher_width, method):
    """The `ContrastiveMemory` of a run from CRD's flags: the student's embedding against `teacher_width`."""
    return ContrastiveMemory(context.student.embedding_width, teacher_width, context.train_labels,
                             context.dataset_size, feat_dim=args.crd_feat_dim, k=args.crd_k,
                             momentum=args.crd_momentum, temperature=args.crd_temperature, eps=args.crd_nce_eps,
                             seed=context.seed, method=method)

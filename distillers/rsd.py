"""RSD: Redundancy Suppression Distillation (Zhang et al., "Cross-Architecture Distillation Made Simple with
Redundancy Suppression", ICCV 2025, arXiv 2507.21844), with its official code's defaults.

L = CE(logits_s, y) + lambda * L_rsd(h(z_s), z_t), where h is the AAD projector (discarded after
training) and L_rsd = sum_i (C_ii - 1)^2 + kappa * sum_{i != j} C_ij^2 over the cross-correlation C
of the batch-standardised teacher and projected student embeddings (the paper's Pearson matrix, Eq. 4).
Statistics are taken over the global batch under DDP, the AAD's BatchNorm included.

Variants of the paper, each one flag away: `--rsd-target logits` (Table 5: the same loss on the student and
teacher logits, no AAD); `--rsd-kappa 0` (Table 3: RSD-corr only); `--rsd-no-aad` (Table 4);
`--rsd-branch-stage 3 4` (Table 7: plus lambda * L_rsd between the logits of OFA's stage branches and the
teacher logits, per listed stage). RSD inside OFA (Table 6) is `--distiller ofa --ofa-criterion rsd`.
"""
from __future__ import annotations

import torch
from torch import nn

from kdcore.distributed import gather_no_grad, gather_with_grad
from kdcore.errors import UserError
from kdcore.features import FeatureRequest, paper_stage

from .base import Distiller, fp32_loss
from .branches import StageBranches
from .registry import register_distiller

STANDARDISE_EPS = 1e-5


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Per-dimension z-score over the batch, biased std, as the official code does."""
    return (x - x.mean(dim=0)) / (x.std(dim=0, unbiased=False) + STANDARDISE_EPS)


@fp32_loss
def rsd_loss(student_feats: torch.Tensor, teacher_feats: torch.Tensor, kappa: float) -> torch.Tensor:
    """L_rsd of the RSD paper (Zhang et al., ICCV 2025): sum_i (C_ii - 1)^2 + kappa * sum_{i != j} C_ij^2, where
    C = t_hat^T s_hat / B is the paper's Pearson matrix P (Eq. 4) of the batch-standardised features.

    The invariance term on C's diagonal plus kappa times the redundancy (off-diagonal) term, a sum as the
    official code (the paper's Algorithm 1 takes a mean instead, which only rescales lambda by D^2). Computed in
    fp32 (or fp64) even under autocast: C is a sum over the batch of products.

    Args:
        student_feats: (B, D) AAD-projected student embeddings (or student logits).
        teacher_feats: (B, D) teacher embeddings (or logits), the same width.
        kappa: weight of the off-diagonal term (`--rsd-kappa`, 0.01; 0 is Table 3's RSD-corr only).

    Returns:
        The scalar loss, before lambda (`--rsd-loss-weight`).
    """
    s, t = standardise(student_feats), standardise(teacher_feats)
    corr = t.t() @ s / s.shape[0]
    diag = torch.diagonal(corr)
    invariance = (diag - 1).pow(2).sum()
    redundancy = corr.pow(2).sum() - diag.pow(2).sum()
    return invariance + kappa * redundancy


class ArchitectureAgnosticDecoupler(nn.Sequential):
    """AAD, the RSD paper's architecture-agnostic knowledge decoupler, applied to the student embedding only and
    discarded after training: Linear(D_s, gamma*D_s) -> BN -> GELU -> Linear(gamma*D_s, D_t), no biases in the
    linears; Linear weights trunc-normal std 0.02, BN weight 1 and bias 0."""

    def __init__(self, in_dim: int, out_dim: int, gamma: float = 2.0):
        hidden = int(round(gamma * in_dim))
        super().__init__(nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.GELU(),
                         nn.Linear(hidden, out_dim, bias=False))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
            elif isinstance(m, nn.BatchNorm1d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


@register_distiller("rsd")
class RSD(Distiller):
    """RSD, Redundancy Suppression Distillation (Zhang et al., ICCV 2025): CE + lambda * L_rsd(AAD(z_s), z_t) on
    the penultimate embeddings, no logit KD. Flags: `--rsd-loss-weight 0.1 --rsd-kappa 0.01 --rsd-gamma 2`;
    `--rsd-target logits`, `--rsd-no-aad` and `--rsd-branch-stage` give the paper's Tables 5, 4 and 7."""

    @classmethod
    def feature_requests(cls, args):
        on_embedding = args.rsd_target == "embedding"
        student = FeatureRequest(stages=tuple(args.rsd_branch_stage), embedding=on_embedding)
        teacher = FeatureRequest(embedding=on_embedding, logits=not on_embedding or bool(args.rsd_branch_stage))
        return student, teacher

    def __init__(self, student, context):
        super().__init__(student, context)
        args = context.args
        self.rsd_loss_weight, self.rsd_kappa = args.rsd_loss_weight, args.rsd_kappa
        d_s, d_t = context.student.embedding_width, context.teacher.embedding_width
        if args.rsd_target == "logits":
            self.aad = None
        elif args.rsd_no_aad:
            if d_s != d_t:
                raise UserError(f"--rsd-no-aad needs equal embedding widths, but the student has {d_s} and the "
                                f"teacher {d_t}; drop --rsd-no-aad")
            self.aad = nn.Identity()
        else:
            self.aad = ArchitectureAgnosticDecoupler(d_s, d_t, args.rsd_gamma)
        self.branches = StageBranches(context.student.stages, d_s, d_t, context.num_classes)

    @classmethod
    def add_arguments(cls, parser):
        g = parser.add_argument_group("RSD")
        g.add_argument("--rsd-loss-weight", type=float, default=0.1, help="lambda: weight of L_rsd")
        g.add_argument("--rsd-kappa", type=float, default=0.01, help="kappa: weight of the off-diagonal term")
        g.add_argument("--rsd-gamma", type=float, default=2.0, help="gamma: AAD hidden width / student width")
        g.add_argument("--rsd-no-aad", action="store_true", help="ablation: no AAD (needs D_s == D_t)")
        g.add_argument("--rsd-target", default="embedding", choices=("embedding", "logits"),
                       help="logits: RSD between student and teacher logits, no AAD (paper, Table 5)")
        g.add_argument("--rsd-branch-stage", type=paper_stage, nargs="*", default=[],
                       help="paper stages whose OFA branch logits also get lambda * L_rsd against the teacher "
                            "logits (paper, Table 7)")

    def distill_losses(self, student_feats, teacher_feats, batch):
        """{"rsd": lambda * L_rsd} over the global batch, plus {"rsd_stage<s>": lambda * L_rsd(branch s logits,
        teacher logits)} for each `--rsd-branch-stage` (Table 7)."""
        if self.aad is None:
            losses = {"rsd": self.rsd_loss_weight * rsd_loss(gather_with_grad(student_feats.logits),
                                                             gather_no_grad(teacher_feats.logits), self.rsd_kappa)}
        else:
            # AAD runs on the gathered global batch, so its BatchNorm sees global statistics on any device.
            projected = self.aad(gather_with_grad(student_feats.embedding))
            teacher = gather_no_grad(teacher_feats.embedding)
            losses = {"rsd": self.rsd_loss_weight * rsd_loss(projected, teacher, self.rsd_kappa)}
        if self.branches:
            teacher_logits = gather_no_grad(teacher_feats.logits)
            for stage, logits in self.branches(student_feats.stages).items():
                losses[f"rsd_stage{stage}"] = self.rsd_loss_weight * rsd_loss(gather_with_grad(logits), teacher_logits,
                                                                             self.rsd_kappa)
        return losses

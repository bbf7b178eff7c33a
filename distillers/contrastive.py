"""CRD's contrastive part as a component (Tian et al., "Contrastive Representation Distillation", ICLR 2020, as
the OFA-KD code runs it): the NCE loss, the negatives, the memory banks and their update, and
`ContrastiveMemory`, which `crd` and `richkd` both own. The method itself is explained in distillers/crd.py.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kdcore.distributed import all_reduce_sum, gather_no_grad, world_size
from kdcore.errors import UserError, warn

from .base import fp32_loss


@fp32_loss
def crd_loss(student_scores: torch.Tensor, teacher_scores: torch.Tensor, z: torch.Tensor | Sequence[float],
             num_data: int, temperature: float = 0.07, eps: float = 1e-7) -> torch.Tensor:
    """NCE loss of both anchors, the CRD paper's objective (Tian et al., ICLR 2020; the paper's loss, written out).

    Per anchor, with h = exp(score / T) / Z and noise mass K/N:
    -(1/B) sum_b [log h_pos / (h_pos + K/N + eps) + sum_k log (K/N) / (h_neg + K/N + eps)] (eps as the
    OFA-KD code). Computed from log h in fp32 (or fp64) even under autocast, so a vanishing h cannot give log 0.

    Args:
        student_scores: (B, 1 + K) dot products of the student anchors with the teacher bank, the positive first.
        teacher_scores: the same for the teacher-side anchors against the student bank.
        z: the frozen normalisers (Z_s, Z_t).
        num_data: N, the number of training samples.
        temperature: the NCE temperature T.
        eps: added to each denominator.

    Returns:
        The scalar loss, summed over both anchors.
    """
    return (_nce_loss(student_scores, z[0], num_data, temperature, eps)
            + _nce_loss(teacher_scores, z[1], num_data, temperature, eps))


def _nce_loss(scores: torch.Tensor, z: torch.Tensor | float, num_data: int, temperature: float,
              eps: float) -> torch.Tensor:
    """One anchor's term of `crd_loss`, from log h."""
    noise = (scores.shape[1] - 1) / num_data
    log_h = scores / temperature - torch.log(torch.as_tensor(z, dtype=scores.dtype, device=scores.device))
    log_denominator = torch.logaddexp(log_h, torch.full_like(log_h, math.log(noise + eps)))
    log_positive = log_h[:, 0] - log_denominator[:, 0]
    log_negative = math.log(noise) - log_denominator[:, 1:]
    return -(log_positive.sum() + log_negative.sum()) / scores.shape[0]


def class_blocks(train_labels):
    """Dataset indices sorted by class (stable), with each class's first position and size in that order."""
    counts = torch.bincount(train_labels)
    return torch.argsort(train_labels, stable=True), torch.cumsum(counts, 0) - counts, counts


def negatives_generator(seed, step, device):
    """A generator seeded by (seed, step) alone: the same draw on every process and for any process count.

    The pair is hashed to 32 bits, all that a CPU generator's Mersenne Twister takes from its seed.
    """
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=4).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest, "little"))
    return generator


def draw_negatives(classes, k, by_class, starts, counts, generator):
    """K dataset indices per anchor of class `classes[b]`, uniform over the samples of the other classes.

    Drawn with replacement, as the OFA-KD code (numpy's choice over the other classes' index list, replace=True),
    so K may exceed the number of such samples (tiny datasets). A position r among the N - n_c other samples
    is r in the class-sorted order, shifted past the anchor's own class block.
    """
    others = by_class.numel() - counts[classes]
    u = torch.rand(len(classes), k, generator=generator, device=by_class.device, dtype=torch.float64)
    r = (u * others[:, None]).long()
    r = r + (r >= starts[classes][:, None]) * counts[classes][:, None]
    return by_class[r]


def momentum_update(bank, index, feats, momentum):
    """In place: bank[i] <- L2-normalise(momentum * bank[i] + (1 - momentum) * feature) at each index i.

    A repeated index (DistributedSampler padding, repeated augmentation) keeps its last occurrence, so every
    process writes the same rows whatever the device's index_copy_ does with duplicates.
    """
    unique, inverse = torch.unique(index, return_inverse=True)
    positions = torch.arange(len(index), device=index.device)
    last = torch.full_like(unique, -1).scatter_reduce_(0, inverse, positions, "amax")
    index, feats = index[last], feats[last].to(bank.dtype)
    bank.index_copy_(0, index, F.normalize(momentum * bank[index] + (1 - momentum) * feats, dim=1))


class L2Embedding(nn.Module):
    """Linear(D -> feat_dim) then L2 normalisation: the paper's embedding heads g_S and g_T."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x):
        return F.normalize(self.linear(x), dim=1)


def _scores(bank, contrast, anchors):
    """(B, 1 + K) dot products of each anchor with the bank rows at its contrast indices.

    Picked from the full (B, N) product with a copy of the bank (the backward needs the rows as they were,
    and the bank is updated in place before it runs): about ten times faster on a CPU for N = 60,000 than
    gathering B x (1 + K) rows, and about the same memory for ImageNet at B = 64 (less for larger B).
    """
    return (anchors @ bank.clone().t()).gather(1, contrast)


class ContrastiveMemory(nn.Module):
    """CRD's contrastive part, owned by `crd` and `richkd` (as `self.contrast`): the heads g_S and g_T, the two
    memory banks, the negatives drawn per step and the frozen normalisers Z.

    Call it with the student's and the teacher-side embeddings and the batch's dataset indices: it returns the
    NCE loss of both anchors and, as a side effect, moves the banks' rows at those indices (and its step count).
    `embed_t` may be replaced by another teacher-side head of the same output width (RichKD's fused one).
    """

    def __init__(self, student_width, teacher_width, train_labels, dataset_size, *, feat_dim, k, momentum,
                 temperature, eps, seed, method="crd"):
        super().__init__()
        if train_labels is None or len(train_labels) != dataset_size:
            raise UserError(f"--distiller {method} needs the class of every training sample (DistillerContext."
                            f"train_labels, one per dataset index)")
        self.num_data, self.k, self.seed = dataset_size, k, seed
        self.temperature, self.momentum, self.eps = temperature, momentum, eps
        by_class, starts, counts = class_blocks(train_labels)
        if counts.max() == self.num_data:
            raise UserError(f"--distiller {method} draws negatives from other classes, but every training sample "
                            f"has the same class; use a dataset with at least two classes")
        fewest_others = self.num_data - int(counts.max())
        if k > fewest_others and not (dist.is_initialized() and dist.get_rank() != 0):
            warn(f"--crd-k {k} exceeds the {fewest_others} training samples of the other classes (of the largest "
                 f"class): negatives are drawn with replacement, as in the official code, so they repeat; a "
                 f"--crd-k of at most {fewest_others} draws each at most about once")
        self.embed_s = L2Embedding(student_width, feat_dim)
        self.embed_t = L2Embedding(teacher_width, feat_dim)
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_student", torch.rand(self.num_data, feat_dim) * (2 * stdv) - stdv)
        self.register_buffer("memory_teacher", torch.rand(self.num_data, feat_dim) * (2 * stdv) - stdv)
        self.register_buffer("z", torch.full((2,), -1.0))  # (Z_s, Z_t); negative until the first batch sets them
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        # Derived from the labels, identical everywhere, not saved.
        self.register_buffer("sample_class", train_labels.clone(), persistent=False)
        self.register_buffer("by_class", by_class, persistent=False)
        self.register_buffer("class_start", starts, persistent=False)
        self.register_buffer("class_count", counts, persistent=False)

    def self_synced_buffers(self):
        """Every buffer: each process applies the same all-gathered updates."""
        return [name for name, _ in self.named_buffers()]

    def contrast_indices(self, global_index, local_size):
        """(local_size, 1 + K): this process's rows of [own index, K negatives] drawn for the global batch."""
        generator = negatives_generator(self.seed, int(self.step), global_index.device)
        negatives = draw_negatives(self.sample_class[global_index], self.k, self.by_class, self.class_start,
                                   self.class_count, generator)
        rank = dist.get_rank() if world_size() > 1 else 0
        rows = slice(rank * local_size, (rank + 1) * local_size)
        return torch.cat([global_index[rows, None], negatives[rows]], dim=1)

    @torch.no_grad()
    def _freeze_normalisers(self, student_scores, teacher_scores):
        """Z = N x the mean of exp(score / T) over the global first batch (the OFA-KD code's estimate)."""
        sums = [torch.exp(s / self.temperature).sum() for s in (student_scores, teacher_scores)]
        totals = all_reduce_sum(torch.stack(sums + [sums[0].new_tensor(student_scores.numel())]))
        self.z.copy_(totals[:2] / totals[2] * self.num_data)

    def forward(self, student_embedding, teacher_embedding, index):
        """The NCE loss of this step (unweighted), then the banks' momentum update."""
        with torch.autocast(index.device.type, enabled=False):
            f_s = self.embed_s(student_embedding.float())
            f_t = self.embed_t(teacher_embedding.float())
            global_index = gather_no_grad(index)
            contrast = self.contrast_indices(global_index, len(index))
            student_scores = _scores(self.memory_teacher, contrast, f_s)
            teacher_scores = _scores(self.memory_student, contrast, f_t)
            if bool(self.z[0] < 0):
                self._freeze_normalisers(student_scores, teacher_scores)
            loss = crd_loss(student_scores, teacher_scores, self.z, self.num_data, self.temperature, self.eps)
            with torch.no_grad():
                momentum_update(self.memory_student, global_index, gather_no_grad(f_s.detach()), self.momentum)
                momentum_update(self.memory_teacher, global_index, gather_no_grad(f_t.detach()), self.momentum)
                self.step += 1
        return loss

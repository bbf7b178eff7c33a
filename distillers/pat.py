"""PAT: Perspective-Aware Teaching (ICCV 2025; earlier titled FOFA), with its official code's defaults and defects
fixed (README, "PAT").

L = CE(z_s, y) + kd_w * KD_T(z_s, z_t) + mse_w * sum_{k=1..4} hcl(A_k, T'_k) + reg_w * KD_1(z'_t, z_t)

z_t: the teacher's logits (the engine's pass, no prompt, under inference mode). A_k: the student's four stages
through the region attention and the stage-k aligner, in the teacher's stage-k layout. z'_t, T'_k: the teacher run
again with a prompt block where each `--pat-afp-stage` begins (custom_forward/staged.py), the teacher frozen and in
eval mode, the graph kept so that gradients reach the prompts through its activations.

Our choices where the official code is silent or defective:
- The feedback a prompt block fuses with the teacher's tensor is A_k - T_k of the current batch, T_k the stage-k
  feature of the unprompted teacher, detached, as the official code detaches it. The official code uses A_k - T'_k
  of its previous batch, T'_k the prompted teacher's (other images, stale across epoch ends, lost on resume); the
  current batch's T'_k does not exist yet when its prompts need the feedback, and at beta = 0 T'_k = T_k.
- Token teachers: patch tokens become a map by transpose and return by transpose (the official code reshapes them
  back without one, scrambling them); prefix tokens pass untouched and are left out of the aligners, the losses and
  the student's maps (the official code drops the last token instead of the class token); the positional encoding
  is indexed by token position (the official code indexes it by the sample's place in the batch).
- The aligners' and the feedback projections' BatchNorms normalise over the global batch under DDP.
- The feedback projection (nearest resize, BatchNorm2d, 1x1 conv), built where the teacher's stage-k feature and the
  tensor at the prompt differ in shape (ConvNeXt stages 2-4, ResNet teachers), counts among the prompts' parameters,
  as in the official total.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdcore.distributed import gather_no_grad, gather_with_grad, local_rows
from kdcore.errors import UserError
from kdcore.features import PAPER_STAGES, FeatureRequest, paper_stage

from .base import Distiller, fp32_loss
from .kd import kd_loss
from .registry import register_distiller

HCL_LEVELS = (4, 2, 1)
HEADS = 8
SE_REDUCTION = 16
PROMPT_GROUPS = 4


def as_map(x: torch.Tensor) -> torch.Tensor:
    """An NCHW map as is; (B, L, D) tokens, L a square, as the (B, D, sqrt L, sqrt L) map they tile row by row."""
    if x.dim() == 4:
        return x
    side = math.isqrt(x.shape[1])
    if side * side != x.shape[1]:
        raise ValueError(f"{x.shape[1]} tokens do not form a square map")
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


@fp32_loss
def hcl_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The hierarchical context loss of PAT's code (from ReviewKD): the MSE of the full maps (weight 1), plus, for
    each of 4x4, 2x2 and 1x1 smaller than the map, the MSE of both maps average-pooled to it, each used level
    weighted half the previous one (0.5, 0.25, 0.125 on a map larger than 4x4; 0.5 for the 1x1 level of a 2x2
    map); divided by the sum of the weights used. Means over every element; token tensors are laid out as maps.

    Args:
        student: (B, C, H, W) aligned student features, or (B, L, D) tokens.
        teacher: the teacher's features, the same shape.

    Returns:
        The scalar loss, in fp32 (fp64 stays fp64).
    """
    s, t = as_map(student), as_map(teacher)
    total, weight, weights = F.mse_loss(s, t), 1.0, 1.0
    for level in HCL_LEVELS:
        if level >= s.shape[-1]:
            continue
        weight /= 2
        total = total + weight * F.mse_loss(F.adaptive_avg_pool2d(s, level), F.adaptive_avg_pool2d(t, level))
        weights += weight
    return total / weights


class SqueezeExcitationGate(nn.Sequential):
    """PAT's SE "block": it returns its sigmoid gate (B, C, 1, 1) only, not the gated input."""

    def __init__(self, channels):
        hidden = max(channels // SE_REDUCTION, 1)
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
                         nn.Conv2d(hidden, channels, 1), nn.Sigmoid())


class FeedbackProjection(nn.Sequential):
    """The feedback brought to the shape of the tensor at the prompt: nearest resize, BatchNorm2d, 1x1 conv."""

    def __init__(self, in_channels, out_channels, size):
        super().__init__(nn.Upsample(size=size, mode="nearest"), nn.BatchNorm2d(in_channels),
                         nn.Conv2d(in_channels, out_channels, 1, bias=False))


class PromptBlock(nn.Module):
    """x + beta * prompt(fusion(cat(x, feedback))), beta initialised to 0: after the SE gates both branches are
    (B, C, 1, 1), so the prompt is a per-sample, per-channel offset of the teacher's tensor x (B, C, H, W)."""

    def __init__(self, channels):
        super().__init__()
        if channels % PROMPT_GROUPS:
            raise UserError(f"PAT's prompt convolutions have {PROMPT_GROUPS} groups; a teacher stage of {channels} "
                            f"channels cannot take them: choose --pat-afp-stage without that stage")
        c = channels
        self.fusion = nn.Sequential(nn.Conv2d(2 * c, c, 1), nn.Conv2d(c, c, 5, padding=2), nn.Conv2d(c, c, 1),
                                    SqueezeExcitationGate(c), nn.Conv2d(c, c, 1))
        self.prompt = nn.Sequential(nn.Conv2d(c, c, 1, groups=PROMPT_GROUPS), nn.Conv2d(c, c, 5, padding=2, groups=c),
                                    nn.Conv2d(c, c, 1), SqueezeExcitationGate(c),
                                    nn.Conv2d(c, c, 1, groups=PROMPT_GROUPS))
        self.beta = nn.Parameter(torch.zeros(()))

    def forward(self, x, feedback):
        offset = self.prompt(self.fusion(torch.cat((x, feedback.to(x.dtype)), dim=1)))
        return (x + self.beta * offset).to(x.dtype)


def sinusoidal_encoding(positions, dim):
    """The (positions, dim) sine/cosine encoding of the Transformer: sin on even, cos on odd dimensions."""
    position = torch.arange(positions, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    encoding = torch.zeros(positions, dim)
    encoding[:, 0::2] = torch.sin(position * frequency)
    encoding[:, 1::2] = torch.cos(position * frequency)
    return encoding


def stage_map_size(info):
    """(channels, side) of a stage as a map: its patch tokens for a token stage (prefix tokens left out)."""
    if info.layout == "NCHW":
        return info.shape[0], info.shape[1]
    tokens = info.shape[0] - info.prefix_tokens
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise UserError(f"PAT lays stage {info.stage}'s {tokens} patch tokens out as a map, and they are not a square")
    return info.shape[1], side


def patch_map(x, info):
    """A stage feature as an NCHW map of its patch tokens."""
    return x if info.layout == "NCHW" else as_map(x[:, info.prefix_tokens:])


class RegionAttention(nn.Module):
    """Each student stage as a grid x grid of region tokens (a strided conv, kernel = stride = ceil(side / grid), the
    map nearest-resized up to grid * kernel first), then one multi-head attention over the tokens of all stages:
    shared LayerNorm, q and kv projections, a sinusoidal encoding by token position added to q and k, no output
    projection and no residual. Returns the (B, grid^2, dim) tokens of each stage."""

    def __init__(self, stage_infos, dim, grid):
        super().__init__()
        if dim % HEADS:
            raise UserError(f"--pat-raa-dim {dim} must be a multiple of its {HEADS} heads")
        self.grid, self.dim, self.infos = grid, dim, stage_infos
        self.embed = nn.ModuleDict()
        for stage, info in stage_infos.items():
            channels, side = stage_map_size(info)
            kernel = math.ceil(side / grid)
            self.embed[str(stage)] = nn.Conv2d(channels, dim, kernel, stride=kernel)
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.register_buffer("position", sinusoidal_encoding(len(stage_infos) * grid * grid, dim), persistent=False)

    def forward(self, stages):
        tokens = []
        for stage, info in self.infos.items():
            x = patch_map(stages[stage], info)
            conv = self.embed[str(stage)]
            size = self.grid * conv.kernel_size[0]
            if x.shape[-1] != size:
                x = F.interpolate(x, size=(size, size), mode="nearest")
            tokens.append(conv(x).flatten(2).transpose(1, 2))
        x = self.norm(torch.cat(tokens, dim=1))
        b, n, d = x.shape
        q = self.q(x) + self.position
        k, v = self.kv(x).chunk(2, dim=-1)
        k = k + self.position
        heads = [t.reshape(b, n, HEADS, d // HEADS).transpose(1, 2) for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*heads).transpose(1, 2).reshape(b, n, d)
        return dict(zip(self.infos, out.split(self.grid * self.grid, dim=1)))


class MapAligner(nn.Sequential):
    """Region tokens (B, grid^2, dim) to a CNN teacher's (B, C, H, W) stage: the grid map nearest-resized to H x W,
    BatchNorm2d(dim), 1x1 conv to C without bias."""

    def __init__(self, dim, grid, info):
        channels, height, width = info.shape
        super().__init__(nn.Upsample(size=(height, width), mode="nearest"), nn.BatchNorm2d(dim),
                         nn.Conv2d(dim, channels, 1, bias=False))
        self.grid = grid

    def forward(self, tokens):
        return super().forward(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, self.grid, self.grid))


class TokenAligner(nn.Module):
    """Region tokens (B, q, dim) to a token teacher's (B, L, D) patch tokens: BatchNorm1d over the q tokens, Linear
    dim -> D, then BatchNorm1d over D and Linear q -> L across the tokens."""

    def __init__(self, dim, queries, info):
        super().__init__()
        tokens, width = info.shape[0] - info.prefix_tokens, info.shape[1]
        self.token_norm, self.width = nn.BatchNorm1d(queries), nn.Linear(dim, width)
        self.channel_norm, self.tokens = nn.BatchNorm1d(width), nn.Linear(queries, tokens)

    def forward(self, tokens):
        x = self.width(self.token_norm(tokens))
        return self.tokens(self.channel_norm(x.transpose(1, 2))).transpose(1, 2)


@register_distiller("pat")
class PAT(Distiller):
    """PAT, Perspective-Aware Teaching (ICCV 2025): prompts inside the frozen teacher, trained with the student, fit
    the teacher's features to what the student can reach. Flags: `--pat-afp-stage 1 2 3 4 --pat-mse-loss-weight 1
    --pat-reg-loss-weight 1 --pat-raa-num-queries 64 --pat-raa-dim 512`, with `--kd-temperature` and
    `--kd-loss-weight` for the KD term. Needs the live teacher: `attach_teacher` hands it the engine's frozen source,
    whose `staged_pass` runs the prompted pass."""

    shared_flags = ("kd_loss_weight",)
    borrowed_flags = {"kd_temperature": "kd"}
    needs_live_teacher = "its prompts train inside the teacher's forward"
    student_request = FeatureRequest(stages=PAPER_STAGES)
    teacher_request = FeatureRequest(stages=PAPER_STAGES, logits=True)  # z_t, and the T_k of the feedback and shapes

    def __init__(self, student, context):
        super().__init__(student, context)
        args, teacher = context.args, context.teacher
        if context.teacher_hook_shapes is None:
            raise UserError(f"--distiller pat needs the live teacher ({self.needs_live_teacher}): pass --teacher NAME "
                            f"--teacher-pretrained PATH")
        queries = args.pat_raa_num_queries // len(PAPER_STAGES)
        grid = math.isqrt(queries)
        if grid * grid * len(PAPER_STAGES) != args.pat_raa_num_queries:
            raise UserError(f"--pat-raa-num-queries {args.pat_raa_num_queries} must be 4 stages x a square number of "
                            f"region tokens (64 = 4 x 4 x 4)")
        self.kd_loss_weight, self.temperature = args.kd_loss_weight, args.kd_temperature
        self.mse_loss_weight, self.reg_loss_weight = args.pat_mse_loss_weight, args.pat_reg_loss_weight
        self.afp_stages = tuple(args.pat_afp_stage)
        self.teacher_stages = teacher.stages
        self.region_attention = RegionAttention(context.student.stages, args.pat_raa_dim, grid)
        self.aligners = nn.ModuleDict({
            str(s): MapAligner(args.pat_raa_dim, grid, info) if info.layout == "NCHW"
            else TokenAligner(args.pat_raa_dim, queries, info) for s, info in self.teacher_stages.items()})
        at_prompt = context.teacher_hook_shapes
        self.prompts = nn.ModuleDict()
        for stage in self.afp_stages:
            channels, height, width = at_prompt[stage]
            self.prompts[str(stage)] = PromptBlock(channels)
            fed_channels, fed_side = stage_map_size(self.teacher_stages[stage])
            if (fed_channels, fed_side, fed_side) != (channels, height, width):
                self.prompts[str(stage)].add_module("feedback", FeedbackProjection(fed_channels, channels,
                                                                                   (height, width)))
        self.teacher_source = None

    @classmethod
    def add_arguments(cls, parser):
        g = parser.add_argument_group("PAT")
        g.add_argument("--pat-afp-stage", type=paper_stage, nargs="+", default=list(PAPER_STAGES),
                       help="teacher stages where a prompt block enters (before the stage's blocks)")
        g.add_argument("--pat-mse-loss-weight", type=float, default=1.0, help="weight of the hcl feature terms")
        g.add_argument("--pat-reg-loss-weight", type=float, default=1.0,
                       help="weight of KD_1(prompted teacher logits, teacher logits), which keeps the prompted "
                            "teacher near the teacher")
        g.add_argument("--pat-raa-num-queries", type=int, default=64,
                       help="region tokens of the region attention, over the 4 student stages (64: 4x4 per stage)")
        g.add_argument("--pat-raa-dim", type=int, default=512, help="width of the region attention (8 heads)")

    def attach_teacher(self, source):
        """The engine's frozen teacher source (a plain object: outside this module's tree, state_dict and DDP)."""
        self.teacher_source = source

    def late_gradient(self, module_name):
        """Whether `module_name` gets its first gradient only at the second step: the modules inside a prompt block
        (beta is 0 at the first step, so only beta's own gradient is non-zero then)."""
        return module_name.startswith("prompts.") and module_name.count(".") >= 2

    def _feedback(self, aligned, teacher_feats):
        """{afp stage: A_k - T_k of this process's samples as the map at the prompt}; a feedback projection (whose
        BatchNorm needs the global batch) runs on the global batch, then keeps this process's rows."""
        feedback = {}
        for stage in self.afp_stages:
            info, block = self.teacher_stages[stage], self.prompts[str(stage)]
            teacher, student = teacher_feats.stages[stage], aligned[stage].detach()
            if hasattr(block, "feedback"):
                delta = as_map(student) - patch_map(gather_no_grad(teacher), info)
                feedback[stage] = local_rows(block.feedback(delta))
            else:
                feedback[stage] = as_map(local_rows(student)) - patch_map(teacher, info)
        return feedback

    def distill_losses(self, student_feats, teacher_feats, batch):
        if self.teacher_source is None:
            raise RuntimeError("PAT runs the prompted teacher through the frozen teacher source: call "
                               "distiller.attach_teacher(source) once the source is built")
        regions = {s: gather_with_grad(t) for s, t in self.region_attention(student_feats.stages).items()}
        aligned = {s: self.aligners[str(s)](regions[s]) for s in PAPER_STAGES}
        feedback = self._feedback(aligned, teacher_feats)
        hooks = {s: (lambda x, s=s: self.prompts[str(s)](x, feedback[s])) for s in self.afp_stages}
        prompted = self.teacher_source.staged_pass(batch.images, hooks)
        hcl = sum(hcl_loss(aligned[s], gather_with_grad(patch_map(prompted.stages[s], self.teacher_stages[s])))
                  for s in PAPER_STAGES)
        return {"kd": self.kd_loss_weight * kd_loss(student_feats.logits, teacher_feats.logits, self.temperature),
                "hcl": self.mse_loss_weight * hcl,
                "reg": self.reg_loss_weight * kd_loss(prompted.logits, teacher_feats.logits, 1.0)}

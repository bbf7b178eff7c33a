"""What a model or source hands out, found by a dry run at the real input size (no hand-written shape tables):
the requested stages' layouts and the widths of its embedding and logits."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Sequence

import torch

from custom_forward import family_for
from custom_forward.staged import staged_forward

from .features import FeatureRequest, embedding_dim, extract_features


@dataclass(frozen=True)
class StageInfo:
    """One paper stage of one model, as the dry run found it."""
    stage: int               # paper stage 1-4
    kind: str                # 'cnn' or 'token' (by family: Swin is a token model)
    layout: str              # 'NCHW' or 'NLC'
    prefix_tokens: int       # class/distillation tokens in front of the patch tokens (NLC only)
    shape: tuple[int, ...]   # per sample: (C, H, W) or (L, D), L including the prefix tokens


def probe_stages(model: torch.nn.Module, input_size: int | Sequence[int],
                 stages: Collection[int]) -> dict[int, StageInfo]:
    """{stage: StageInfo} from one image of `input_size` ((C, H, W), or an int for 3 x size x size).

    Runs in eval mode under no_grad, then restores every submodule's train/eval mode.

    Args:
        model: the model to probe; its family must be in the stage table (custom_forward) when `stages` is not empty.
        input_size: (C, H, W), or a side for a 3-channel square image.
        stages: paper stages 1-4 to probe.

    Returns:
        {paper stage: StageInfo}; empty (and nothing run) for no stages.
    """
    if not stages:
        return {}
    family = family_for(model)
    feats = dry_run(model, input_size, lambda x: extract_features(model, x, FeatureRequest(stages=tuple(stages),
                                                                                         logits=False)))
    prefix = family.prefix_tokens(model)
    return {s: StageInfo(s, family.kind, family.layout, prefix, tuple(t.shape[1:])) for s, t in feats.stages.items()}


def dry_run(model: torch.nn.Module, input_size: int | Sequence[int], run):
    """`run(x)` on one zero image of `input_size` ((C, H, W), or an int for 3 x size x size) in the model's device and
    dtype, in eval mode under no_grad; every submodule's train/eval mode is restored after."""
    if isinstance(input_size, int):
        input_size = (3, input_size, input_size)
    param = next(model.parameters())
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return run(torch.zeros(1, *input_size, device=param.device, dtype=param.dtype))
    finally:
        for m, training in modes.items():
            m.training = training


def hook_shapes(model: torch.nn.Module, input_size: int | Sequence[int]) -> dict[int, tuple[int, ...]]:
    """{paper stage: (C, H, W)} of the map a `staged_forward` hook receives where each stage begins, by a dry run at
    `input_size`."""
    shapes = {}

    def recorder(stage):
        def record(grid):
            shapes[stage] = tuple(grid.shape[1:])
            return grid
        return record
    dry_run(model, input_size, lambda x: staged_forward(model, x, {stage: recorder(stage) for stage in (1, 2, 3, 4)}))
    return shapes


@dataclass(frozen=True)
class OutputInfo:
    """What a source (or the student) hands out, apart from any model: the width of its pooled embedding and of
    its logits, and {paper stage: StageInfo} of the stages requested from it."""
    embedding_width: int | None = None
    logits_width: int | None = None
    stages: dict[int, StageInfo] = field(default_factory=dict)


def describe_model(model: torch.nn.Module, input_size: int | Sequence[int], stages: Collection[int] = ()) -> OutputInfo:
    """The `OutputInfo` of `model` at `input_size`, its `stages` found by `probe_stages`."""
    return OutputInfo(embedding_dim(model), getattr(model, "num_classes", None),
                      probe_stages(model, input_size, stages))

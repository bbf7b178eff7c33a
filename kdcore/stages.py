"""What a model or source hands out, found by a dry run at the real input size (no hand-written shape tables):
the requested stages' layouts and the widths of its embedding and logits."""
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from custom_forward import family_for

from .features import FeatureRequest, embedding_dim, extract_features


@dataclass(frozen=True)
class StageInfo:
    stage: int               # paper stage 1-4
    kind: str                # 'cnn' or 'token' (by family: Swin is a token model)
    layout: str              # 'NCHW' or 'NLC'
    prefix_tokens: int       # class/distillation tokens in front of the patch tokens (NLC only)
    shape: Tuple[int, ...]   # per sample: (C, H, W) or (L, D), L including the prefix tokens


def probe_stages(model, input_size, stages):
    """{stage: StageInfo} from one image of `input_size` ((C, H, W), or an int for 3 x size x size).

    Runs in eval mode under no_grad, then restores every submodule's train/eval mode.
    """
    if not stages:
        return {}
    if isinstance(input_size, int):
        input_size = (3, input_size, input_size)
    family = family_for(model)
    param = next(model.parameters())
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            x = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
            feats = extract_features(model, x, FeatureRequest(stages=tuple(stages), logits=False))
    finally:
        for m, training in modes.items():
            m.training = training
    prefix = family.prefix_tokens(model)
    return {s: StageInfo(s, family.kind, family.layout, prefix, tuple(t.shape[1:])) for s, t in feats.stages.items()}


@dataclass(frozen=True)
class OutputInfo:
    """What a source (or the student) hands out, apart from any model: the width of its pooled embedding and of
    its logits, and {paper stage: StageInfo} of the stages requested from it."""
    embedding_width: Optional[int] = None
    logits_width: Optional[int] = None
    stages: Dict[int, StageInfo] = field(default_factory=dict)


def describe_model(model, input_size, stages=()):
    """The `OutputInfo` of `model` at `input_size`, its `stages` found by `probe_stages`."""
    return OutputInfo(embedding_dim(model), getattr(model, "num_classes", None),
                      probe_stages(model, input_size, stages))

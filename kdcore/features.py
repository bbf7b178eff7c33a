"""One forward pass that yields what a distiller asked for: logits, pooled embedding, paper-stage features."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from custom_forward import stage_features

from .errors import UserError

PAPER_STAGES = (1, 2, 3, 4)


def paper_stage(text: str) -> int:
    """argparse type of a stage flag (--fitnet-stage, --ofa-stage, ...): argparse then names the flag."""
    import argparse
    try:
        stage = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a paper stage (1-4)") from None
    if stage not in PAPER_STAGES:
        raise argparse.ArgumentTypeError(f"paper stages are 1-4, got {stage}")
    return stage


@dataclass(frozen=True)
class FeatureRequest:
    """What one consumer needs from a model; merge the requests of several so the model runs once."""
    stages: tuple[int, ...] = ()   # paper stages 1-4 (kept sorted and unique)
    embedding: bool = False        # the pooled pre-logits vector
    logits: bool = True

    def __post_init__(self) -> None:
        bad = [s for s in self.stages if s not in PAPER_STAGES]
        if bad:
            raise UserError(f"paper stages are 1-4, got {bad}")
        object.__setattr__(self, "stages", tuple(sorted(set(self.stages))))

    def merge(self, other: FeatureRequest) -> FeatureRequest:
        """One request asking for everything this one or `other` asks for."""
        return FeatureRequest(self.stages + other.stages, self.embedding or other.embedding,
                              self.logits or other.logits)


@dataclass
class Features:
    """What one model (or a cache read) hands out for a batch; None (or no stage) for what was not asked."""
    logits: torch.Tensor | None = None
    embedding: torch.Tensor | None = None
    stages: dict[int, torch.Tensor] = field(default_factory=dict)   # paper stage -> NCHW or NLC tensor

    def detached_float(self) -> Features:
        """A normal fp32 copy (usable by autograd even when made under inference_mode)."""
        # one copy whatever the dtype; made outside inference_mode, so a normal tensor
        def convert(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(torch.float32, copy=True)
        return Features(convert(self.logits), convert(self.embedding),
                        {s: convert(t) for s, t in self.stages.items()})


def extract_features(model: torch.nn.Module, x: torch.Tensor, request: FeatureRequest) -> Features:
    """Run `model` once on `x` and hand out what `request` asks for.

    Stages come from the stage table in custom_forward (layout by family: NCHW maps or NLC tokens); the
    embedding is `forward_head(final, pre_logits=True)` and the logits the classifier applied to it, so they
    equal model(x). Models with two heads (distilled DeiT, LeViT, EfficientFormer: get_classifier() is a tuple)
    take their logits from forward_head(final): the mean of both heads, in train mode too (create_model keeps
    timm's distilled training off), so every loss sees one logits tensor.

    Args:
        model: a timm model (or one with timm's forward_features/forward_head/get_classifier API).
        x: the input batch, already normalised and sized for `model`.
        request: the paper stages, embedding and logits wanted.

    Returns:
        `Features` holding what `request` asks for (the rest None, or no stage).
    """
    if request.stages:
        final, stages = stage_features(model, x, request.stages)
    else:
        final, stages = model.forward_features(x), {}
    embedding = model.forward_head(final, pre_logits=True) if request.embedding or request.logits else None
    logits = None
    if request.logits:
        classifier = model.get_classifier()
        logits = model.forward_head(final) if isinstance(classifier, tuple) else classifier(embedding)
    return Features(logits, embedding if request.embedding else None, stages)


def embedding_dim(model: torch.nn.Module) -> int | None:
    """Width of the pooled pre-logits vector (`forward_head(..., pre_logits=True)`); None for a model that does not
    say (no timm `num_features`)."""
    return getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)

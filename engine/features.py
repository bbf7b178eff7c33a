"""One forward pass that yields what a distiller asked for: logits, pooled embedding, stage features."""
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from custom_forward import feature_adapter_for


@dataclass(frozen=True)
class FeatureRequest:
    stages: Tuple[int, ...] = ()   # indices passed to forward_intermediates
    embedding: bool = False        # the pooled pre-logits vector
    logits: bool = True


@dataclass
class Features:
    logits: Optional[torch.Tensor] = None
    embedding: Optional[torch.Tensor] = None
    stages: List[torch.Tensor] = field(default_factory=list)

    def detached_float(self):
        """A normal fp32 copy (usable by autograd even when made under inference_mode)."""
        def convert(t):  # one copy whatever the dtype; made outside inference_mode, so a normal tensor
            return None if t is None else t.to(torch.float32, copy=True)
        return Features(convert(self.logits), convert(self.embedding), [convert(t) for t in self.stages])


def extract_features(model, x, request):
    """Run `model` once on `x`; logits come from the classifier applied to the pre-logits embedding."""
    final, stages = feature_adapter_for(model)(model, x, request.stages)
    embedding = model.forward_head(final, pre_logits=True)
    logits = model.get_classifier()(embedding) if request.logits else None
    return Features(logits=logits, embedding=embedding if request.embedding else None, stages=stages)

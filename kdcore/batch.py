"""What a distiller receives each training step besides the features: one `Batch`."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """One training step's data, after mixup/cutmix.

    - `images`: the (mixed) input images, normalised for the student.
    - `targets`: what the ground-truth criterion takes: class indices, or soft targets under mixup.
    - `labels`: each image's hard class; under mixup/cutmix its dominant class (the argmax of its soft
      target, as the reference code reduces soft targets).
    - `index`: each image's index in the training dataset (memory banks, caches keyed by sample).
    - `lam`: the mixup/cutmix weight of the image itself (1.0 without mixup; a (B, 1) tensor in timm's
      per-element modes and under `--mixup-pairing sample`).
    - `epoch`: the epoch its views belong to (a teacher-output cache holds one view per epoch and index).
    - `partner_index`: the dataset index of the image each one was mixed with (None when nothing was mixed): its
      mirror in the batch (`--mixup-pairing batch`), or its own partner (`--mixup-pairing sample`).
    """
    images: torch.Tensor
    targets: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    lam: float | torch.Tensor = 1.0
    partner_index: torch.Tensor | None = None
    epoch: int = 0

    def __len__(self) -> int:
        return self.images.shape[0]

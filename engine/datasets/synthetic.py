"""Generated data that needs no files: each class a fixed smooth colour pattern, each sample adds noise."""
from __future__ import annotations

import numpy as np

from .common import ArrayImageDataset
from .registry import register_dataset

SYNTHETIC_MEAN, SYNTHETIC_STD = (0.5,) * 3, (0.25,) * 3


def make_synthetic(split: str, num_samples: int, num_classes: int, image_size: int = 32,
                   seed: int = 0) -> ArrayImageDataset:
    """`num_samples` learnable images of `num_classes` patterns; the train and val splits draw different noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(num_classes, 4, 4, 3))
    patterns = np.kron(coarse, np.ones((image_size // 4, image_size // 4, 1)))
    sample_rng = np.random.default_rng(seed + (1 if split == "train" else 2))
    labels = np.arange(num_samples) % num_classes
    sample_rng.shuffle(labels)
    noise = sample_rng.normal(0, 40, size=(num_samples, image_size, image_size, 3))
    images = np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8)
    return ArrayImageDataset(images, labels, num_classes, "(generated)", SYNTHETIC_MEAN, SYNTHETIC_STD)


@register_dataset("synthetic", mean=SYNTHETIC_MEAN, std=SYNTHETIC_STD,
                  class_names=lambda root, dataset: [f"class {i}" for i in range(dataset.num_classes)])
def read_synthetic(root: str, split: str, args) -> ArrayImageDataset:
    """The split at the sizes, class count and seed of the --synthetic-* flags (unset: 512/128 images, 10 classes,
    seed 0, the defaults the flags' help names)."""
    size = (args.synthetic_train_size or 512) if split == "train" else (args.synthetic_val_size or 128)
    return make_synthetic(split, size, args.num_classes or 10, seed=args.synthetic_seed or 0)

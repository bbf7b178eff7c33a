"""Dataset building blocks every kind shares: in-memory images, index subsets and class-balanced subsets.

Every kind yields `(PIL image, int label)`, so all go through the same timm transform pipeline; the training
loader keys each sample by its dataset index (engine/views.py), which distillers also get (memory banks, caches).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from kdcore.errors import UserError


class ArrayImageDataset(Dataset):
    """Images held in memory as a uint8 array (N,H,W) or (N,H,W,3), served as RGB PIL images."""

    def __init__(self, images, labels, num_classes, source, mean=None, std=None):
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.num_classes, self.mean, self.std = num_classes, mean, std
        self.source = source  # where it was read from, for the start-up report
        self.transform = None

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        img = Image.fromarray(self.images[index]).convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[index])


def balanced_indices(labels, num_classes, size, seed, exclude=None, flag="--train-subset"):
    """Sorted dataset indices of `size` samples, the same number of each class (the first size % classes classes
    one more), drawn by a generator seeded with `seed` from the samples not in `exclude`."""
    excluded = torch.zeros(len(labels), dtype=torch.bool)
    if exclude is not None:
        excluded[torch.as_tensor(exclude, dtype=torch.int64)] = True
    available = int((~excluded).sum())
    if not 0 < size <= available:
        raise UserError(f"{flag} {size} must lie between 1 and the {available} training images it can draw from")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for cls in range(num_classes):
        wanted = size // num_classes + (1 if cls < size % num_classes else 0)
        members = torch.nonzero((labels == cls) & ~excluded).flatten()
        if len(members) < wanted:
            raise UserError(f"{flag} {size} needs {wanted} images of class {cls}, {len(members)} are left to draw "
                            f"from; lower {flag}")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:wanted]])
    return torch.sort(torch.cat(chosen)).values


class IndexSubset(Dataset):
    """The samples of `dataset` at `indices` (sorted), renumbered 0..len-1: dataset indices are positions in the
    subset (caches are built on it alike). `what` describes the subset for the start-up report."""

    def __init__(self, dataset, indices, what):
        labels = dataset_labels(dataset)
        self.indices = torch.as_tensor(indices, dtype=torch.int64)
        self.dataset, self.labels = dataset, labels[self.indices].numpy()
        self.num_classes, self.mean, self.std = dataset.num_classes, dataset.mean, dataset.std
        self.source = f"{dataset.source}, {what}"
        if hasattr(dataset, "classes"):
            self.classes = dataset.classes

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, transform):
        self.dataset.transform = transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self.dataset[int(self.indices[index])]


class ClassBalancedSubset(IndexSubset):
    """A fixed subset of a training set holding the same number of images of every class.

    The subset depends only on (size, selection seed, the excluded indices), never on the run's --seed, so runs
    that differ in seed train on the same images.
    """

    def __init__(self, dataset, size, seed=0, exclude=None, what="class-balanced subset", flag="--train-subset"):
        indices = balanced_indices(dataset_labels(dataset), dataset.num_classes, size, seed, exclude, flag)
        super().__init__(dataset, indices, f"{what} of {size} (selection seed {seed})")


def dataset_labels(dataset):
    """The class of every sample, by dataset index, as an int64 tensor (without reading any image)."""
    labels = dataset.labels if hasattr(dataset, "labels") else dataset.targets  # ours / torchvision's ImageFolder
    return torch.as_tensor(np.asarray(labels), dtype=torch.int64)

"""The dataset registry: one decorated reader adds a dataset kind to `--dataset`, folder detection, the input
statistics and the class names caches record.

    @register_dataset("my_set", mean=(0.5,) * 3, std=(0.25,) * 3, detect=lambda root: ..., layout="...",
                      class_names=lambda root, dataset: [...])
    def read_my_set(root: str, split: str, args) -> Dataset:  # split: 'train' or 'val'
        ...  # a Dataset of (PIL image, int label) with `num_classes`, `labels` (or `targets`) and `source`

Kinds are tried for detection in registration order: the built-in ones first, then those of modules imported
with `--import MODULE`.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import Dataset

from kdcore.errors import UserError

from .common import ClassBalancedSubset, IndexSubset, balanced_indices, dataset_labels

Reader = Callable[[str, str, argparse.Namespace], Dataset]


@dataclass(frozen=True)
class DatasetKind:
    """A registered dataset: how to read a split, whether a folder holds it, its statistics and class names.

    Attributes:
        name: the `--dataset` value.
        read: `read(root, split, args) -> Dataset`, split 'train' or 'val'; the dataset yields (PIL image, label)
            and carries `num_classes`, `labels` (or ImageFolder's `targets`) and `source` (where it was read).
        mean, std: per-channel input statistics, attached to every dataset `build_dataset` returns.
        detect: `detect(root) -> bool`, whether the folder holds this dataset (None: never inferred).
        class_names: `class_names(root, dataset) -> list[str]`, readable names in label order (None: the kind
            has none, e.g. folders named by ids).
        layout: what the folder must hold, for the error when no kind matches.
    """

    name: str
    read: Reader
    mean: tuple
    std: tuple
    detect: Optional[Callable[[str], bool]] = None
    class_names: Optional[Callable[[str, Dataset], list]] = None
    layout: str = ""


DATASETS: dict[str, DatasetKind] = {}


def register_dataset(name: str, *, mean: Sequence[float], std: Sequence[float],
                     detect: Optional[Callable[[str], bool]] = None,
                     class_names: Optional[Callable[[str, Dataset], list]] = None,
                     layout: str = "") -> Callable[[Reader], Reader]:
    """Decorator registering `read` as the reader of dataset kind `name` (see DatasetKind for the arguments).

    Returns the reader unchanged. Registering a name twice is an error (it would silently shadow a kind).
    """
    def decorator(read: Reader) -> Reader:
        if name in DATASETS:
            raise ValueError(f"dataset kind {name!r} is registered already (by {DATASETS[name].read.__module__})")
        DATASETS[name] = DatasetKind(name, read, tuple(mean), tuple(std), detect, class_names, layout)
        return read
    return decorator


def dataset_names() -> tuple:
    """The registered kinds' names, in registration order: `--dataset`'s choices."""
    return tuple(DATASETS)


def get_dataset_kind(name: str) -> DatasetKind:
    """The registered kind `name`, or a user error listing the registered ones."""
    if name not in DATASETS:
        raise UserError(f"unknown --dataset {name!r}; choose one of {', '.join(DATASETS)}, or register it with "
                        f"engine.datasets.register_dataset in a module passed as --import MODULE")
    return DATASETS[name]


def infer_dataset_kind(root: str) -> str:
    """The kind of the dataset in folder `root` (used when --dataset is omitted): the first that detects it."""
    if not root or not os.path.isdir(root):
        raise UserError(f"data path {root!r} is not a folder; pass the dataset folder as the first argument, "
                        f"or --dataset synthetic to run without data")
    for kind in DATASETS.values():
        if kind.detect is not None and kind.detect(root):
            return kind.name
    layouts = "; ".join(f"{kind.name}: {kind.layout}" for kind in DATASETS.values() if kind.layout)
    raise UserError(f"cannot tell the dataset kind of {root!r}: expected one of these layouts ({layouts}); "
                    f"pass --dataset {{{','.join(DATASETS)}}} (with --dataset-download for CIFAR-100 where internet "
                    f"exists)")


HOLDOUT_SELECTION_SEED = 7919  # --holdout's draw: a generator stream apart from --train-subset-seed's


def holdout_indices(train: Dataset, size: int):
    """The training-set indices --holdout `size` keeps out of training: class-balanced, the same for every run."""
    return balanced_indices(dataset_labels(train), train.num_classes, size, HOLDOUT_SELECTION_SEED, flag="--holdout")


def build_dataset(kind: str, root: str, split: str, args: argparse.Namespace) -> Dataset:
    """The `split` ('train' or 'val') dataset of registered `kind`, with the kind's mean/std and no transform yet.

    With `args.holdout` N, a fixed class-balanced split of N training images is held out: 'val' is that split
    (the dataset's own evaluation images are then scored only by validate.py without --holdout), and 'train' is
    drawn from the rest. The training split is cut to a class-balanced subset when `args.train_subset` is set.
    """
    entry = get_dataset_kind(kind)
    holdout = getattr(args, "holdout", None)
    dataset = entry.read(root, "train" if holdout else split, args)
    dataset.mean, dataset.std = entry.mean, entry.std
    if holdout:
        held = holdout_indices(dataset, holdout)
        if split == "val":
            return IndexSubset(dataset, held, f"held-out validation split of {holdout} training images "
                                              f"(class-balanced, selection seed {HOLDOUT_SELECTION_SEED})")
        if not getattr(args, "train_subset", None):
            rest = torch.ones(len(dataset), dtype=torch.bool)
            rest[held] = False
            return IndexSubset(dataset, torch.nonzero(rest).flatten(), f"all but the {holdout} held-out images")
        return ClassBalancedSubset(dataset, args.train_subset, args.train_subset_seed, exclude=held,
                                   what=f"class-balanced subset outside the {holdout} held-out images")
    if split == "train" and getattr(args, "train_subset", None):
        return ClassBalancedSubset(dataset, args.train_subset, getattr(args, "train_subset_seed", 0))
    return dataset


def dataset_class_names(kind: str, root: str, dataset: Dataset) -> Optional[list]:
    """Readable class names of `dataset` (of registered `kind`, read from `root`) in label order, or None when the
    kind has none."""
    entry = get_dataset_kind(kind)
    return None if entry.class_names is None else [str(name) for name in entry.class_names(root, dataset)]

"""Datasets by registry. Built in: CIFAR-100 (python format), ImageNet-style folders, Fashion-MNIST (idx .gz) and
synthetic; `register_dataset` adds a kind from any module (see registry.py, and the README's "Extending")."""
# Each module registers its kind on import; folder detection tries the kinds in this order (as before the registry).
# isort: off
from . import cifar100, image_folder, fashion_mnist, synthetic  # noqa: F401
# isort: on
from .common import ArrayImageDataset, ClassBalancedSubset, dataset_labels
from .registry import (
    DATASETS,
    DatasetKind,
    build_dataset,
    dataset_class_names,
    dataset_names,
    get_dataset_kind,
    infer_dataset_kind,
    register_dataset,
)

__all__ = ["DATASETS", "ArrayImageDataset", "ClassBalancedSubset", "DatasetKind", "build_dataset",
           "dataset_class_names", "dataset_labels", "dataset_names", "get_dataset_kind", "infer_dataset_kind",
           "register_dataset"]

"""Fashion-MNIST from its idx .gz files: a given folder, or the Debian package `dataset-fashion-mnist`."""
from __future__ import annotations

import gzip
import os
import struct
from typing import Optional

import numpy as np

from kdcore.errors import UserError

from .common import ArrayImageDataset
from .registry import register_dataset

FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,) * 3, (0.3530,) * 3
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def read_idx_gz(path: str) -> np.ndarray:
    """Read an idx file (gzip-compressed): magic 0x00000803 images (N,H,W) or 0x00000801 labels (N,)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise UserError(f"{path!r} is not a uint8 idx file")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise UserError(f"{path!r} is truncated: expected {int(np.prod(shape))} values, found {array.size}")
    return array.reshape(shape)


def fashion_mnist_dir(root: str) -> Optional[str]:
    """The folder holding the idx files: in `root` (or its FashionMNIST/raw) when a root is given, else the
    Debian package's folder. A given root never falls back to another copy."""
    images_file = FASHION_MNIST_FILES["train"][0]
    candidates = [root, os.path.join(root, "FashionMNIST", "raw")] if root else [FASHION_MNIST_SYSTEM_DIR]
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, images_file)):
            return candidate
    return None


def find_or_fetch_fashion_mnist(root: str) -> str:
    """Locate Fashion-MNIST's idx files: in `root` (or root/FashionMNIST/raw) when given, else the Debian
    package; then try a download. A data path that does not exist is an error, never a silent fallback."""
    if root and not os.path.isdir(root):
        raise UserError(f"Fashion-MNIST data path {root!r} does not exist; pass the folder holding its idx .gz "
                        f"files, or omit the data path to use the Debian package's copy in "
                        f"{FASHION_MNIST_SYSTEM_DIR}")
    folder = fashion_mnist_dir(root)
    if folder is not None:
        return folder
    target = root or "data"
    try:
        from torchvision.datasets import FashionMNIST
        FashionMNIST(target, train=True, download=True)
        FashionMNIST(target, train=False, download=True)
    except Exception as exc:  # offline: URLError, socket errors, ...
        raise UserError(
            f"Fashion-MNIST not found in {root or '(no data path)'!r} nor {FASHION_MNIST_SYSTEM_DIR}, and downloading "
            f"it failed ({type(exc).__name__}). Either install the Debian package (as root: apt-get update && "
            f"apt-get install -y dataset-fashion-mnist) or run where internet exists so torchvision can download it "
            f"into {target!r}.") from None
    return fashion_mnist_dir(target)


@register_dataset("fashion_mnist", mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD,
                  detect=lambda root: fashion_mnist_dir(root) is not None,
                  class_names=lambda root, dataset: list(FASHION_MNIST_CLASSES), layout="Fashion-MNIST idx .gz files")
def read_fashion_mnist(root: str, split: str, args=None) -> ArrayImageDataset:
    """The 60k train or 10k test images (28x28 grey, served as RGB); `root` '' means the Debian package's copy."""
    folder = find_or_fetch_fashion_mnist(root)
    images_file, labels_file = FASHION_MNIST_FILES[split]
    images = read_idx_gz(os.path.join(folder, images_file))
    labels = read_idx_gz(os.path.join(folder, labels_file))
    if len(images) != len(labels):
        raise UserError(f"Fashion-MNIST in {folder!r}: {len(images)} images but {len(labels)} labels")
    return ArrayImageDataset(images, labels, 10, folder, FASHION_MNIST_MEAN, FASHION_MNIST_STD)

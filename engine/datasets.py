"""Datasets: CIFAR-100 (python format), ImageNet-style folders, Fashion-MNIST (idx .gz) and synthetic.

Each returns `(PIL image, int label)` so every kind goes through the same timm transform pipeline,
and carries `num_classes`, `mean` and `std`. `IndexedDataset` adds each sample's dataset index, which the
training loader hands to distillers (memory banks, caches keyed by sample).
"""
import gzip
import os
import pickle
import struct

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from kdcore.dataset_stats import CIFAR100_MEAN, CIFAR100_STD, FASHION_MNIST_MEAN, FASHION_MNIST_STD
from kdcore.errors import UserError

DATASET_KINDS = ("cifar100", "imagenet", "fashion_mnist", "synthetic")
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CIFAR100_DIRNAME = "cifar-100-python"


class ArrayImageDataset(Dataset):
    """Images held in memory as a uint8 array (N,H,W) or (N,H,W,3), served as RGB PIL images."""

    def __init__(self, images, labels, num_classes, mean, std, source):
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


class IndexedDataset(Dataset):
    """Yields `(image, label, index)`: a dataset's samples with their position in it."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return image, label, index


class ClassBalancedSubset(Dataset):
    """A fixed subset of a training set holding the same number of images of every class.

    The subset depends only on (size, selection seed), never on the run's --seed, so runs that differ in seed
    train on the same images; dataset indices are positions in the subset (caches are built on it alike).
    """

    def __init__(self, dataset, size, seed=0):
        labels = dataset_labels(dataset)
        num_classes = dataset.num_classes
        if not 0 < size <= len(labels):
            raise UserError(f"--train-subset {size} must lie between 1 and the training set's {len(labels)} images")
        generator = torch.Generator().manual_seed(seed)
        chosen = []
        for cls in range(num_classes):  # the first (size % classes) classes take one image more
            wanted = size // num_classes + (1 if cls < size % num_classes else 0)
            members = torch.nonzero(labels == cls).flatten()
            if len(members) < wanted:
                raise UserError(f"--train-subset {size} needs {wanted} images of class {cls}, the training set has "
                                f"{len(members)}; lower --train-subset")
            chosen.append(members[torch.randperm(len(members), generator=generator)[:wanted]])
        self.indices = torch.sort(torch.cat(chosen)).values
        self.dataset, self.labels = dataset, labels[self.indices].numpy()
        self.num_classes, self.mean, self.std = num_classes, dataset.mean, dataset.std
        self.source = f"{dataset.source}, class-balanced subset of {size} (selection seed {seed})"
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


def dataset_labels(dataset):
    """The class of every sample, by dataset index, as an int64 tensor (without reading any image)."""
    labels = dataset.labels if hasattr(dataset, "labels") else dataset.targets  # ours / torchvision's ImageFolder
    return torch.as_tensor(np.asarray(labels), dtype=torch.int64)


def _cifar100_dir(root):
    """The folder holding CIFAR-100's `train`/`test`/`meta` pickles: `root` itself or its cifar-100-python/."""
    for candidate in (os.path.join(root, CIFAR100_DIRNAME), root):
        if os.path.isfile(os.path.join(candidate, "train")) and os.path.isfile(os.path.join(candidate, "test")):
            return candidate
    return None


def read_cifar100(root, split):
    """CIFAR-100 in its python pickle format (as distributed, or as generated by tests)."""
    folder = _cifar100_dir(root)
    with open(os.path.join(folder, "train" if split == "train" else "test"), "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return ArrayImageDataset(images, entry["fine_labels"], 100, CIFAR100_MEAN, CIFAR100_STD, folder)


def download_cifar100(root):
    from torchvision.datasets import CIFAR100
    try:
        CIFAR100(root, train=True, download=True)
    except Exception as exc:  # network errors come in many types
        raise UserError(f"could not download CIFAR-100 into {root!r} ({exc}); place the extracted "
                        f"{CIFAR100_DIRNAME}/ folder there by hand") from None


def read_idx_gz(path):
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


def _fashion_mnist_dir(root):
    """The folder holding the idx files: in `root` (or its FashionMNIST/raw) when a root is given, else the
    Debian package's folder. A given root never falls back to another copy."""
    images_file = FASHION_MNIST_FILES["train"][0]
    candidates = [root, os.path.join(root, "FashionMNIST", "raw")] if root else [FASHION_MNIST_SYSTEM_DIR]
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, images_file)):
            return candidate
    return None


def find_or_fetch_fashion_mnist(root):
    """Locate Fashion-MNIST's idx files: in `root` (or root/FashionMNIST/raw) when given, else the Debian
    package; then try a download. A data path that does not exist is an error, never a silent fallback."""
    if root and not os.path.isdir(root):
        raise UserError(f"Fashion-MNIST data path {root!r} does not exist; pass the folder holding its idx .gz "
                        f"files, or omit the data path to use the Debian package's copy in "
                        f"{FASHION_MNIST_SYSTEM_DIR}")
    folder = _fashion_mnist_dir(root)
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
    return _fashion_mnist_dir(target)


def read_fashion_mnist(root, split):
    folder = find_or_fetch_fashion_mnist(root)
    images_file, labels_file = FASHION_MNIST_FILES[split]
    images = read_idx_gz(os.path.join(folder, images_file))
    labels = read_idx_gz(os.path.join(folder, labels_file))
    if len(images) != len(labels):
        raise UserError(f"Fashion-MNIST in {folder!r}: {len(images)} images but {len(labels)} labels")
    return ArrayImageDataset(images, labels, 10, FASHION_MNIST_MEAN, FASHION_MNIST_STD, folder)


def make_synthetic(split, num_samples, num_classes, image_size=32, seed=0):
    """Learnable generated data: each class is a fixed smooth colour pattern, each sample adds noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(num_classes, 4, 4, 3))
    patterns = np.kron(coarse, np.ones((image_size // 4, image_size // 4, 1)))
    sample_rng = np.random.default_rng(seed + (1 if split == "train" else 2))
    labels = np.arange(num_samples) % num_classes
    sample_rng.shuffle(labels)
    noise = sample_rng.normal(0, 40, size=(num_samples, image_size, image_size, 3))
    images = np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8)
    return ArrayImageDataset(images, labels, num_classes, (0.5,) * 3, (0.25,) * 3, "(generated)")


def load_image_file(path):
    """ImageFolder's loader, with an unreadable image reported as a user error naming its path."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:  # PIL raises these for truncated or corrupt files
        raise UserError(f"cannot read image {path!r} ({type(exc).__name__}: {exc}); replace or delete that file "
                        f"(ImageNet's train set holds a few such files: re-encode them as JPEG)") from None


def read_image_folder(root, split):
    folder = os.path.join(root, split)
    dataset = ImageFolder(folder, loader=load_image_file)
    dataset.num_classes = len(dataset.classes)
    dataset.mean, dataset.std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    dataset.source = root
    return dataset


def infer_dataset_kind(root):
    """Tell the dataset kind from the folder's content (used when --dataset is omitted)."""
    if not root or not os.path.isdir(root):
        raise UserError(f"data path {root!r} is not a folder; pass the dataset folder as the first argument, "
                        f"or --dataset synthetic to run without data")
    if _cifar100_dir(root):
        return "cifar100"
    if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val")):
        return "imagenet"
    if _fashion_mnist_dir(root) not in (None, FASHION_MNIST_SYSTEM_DIR):
        return "fashion_mnist"
    raise UserError(f"cannot tell the dataset kind of {root!r}: expected CIFAR-100's python files "
                    f"({CIFAR100_DIRNAME}/train, test), an ImageNet-style tree (train/ and val/ class folders) or "
                    f"Fashion-MNIST idx .gz files; pass --dataset {{{','.join(DATASET_KINDS)}}} "
                    f"(with --dataset-download for CIFAR-100 where internet exists)")


def build_dataset(kind, root, split, args):
    """Return the `split` ('train' or 'val') dataset of `kind`, with no transform attached yet; the training
    split is cut to a class-balanced subset when `args.train_subset` is set."""
    dataset = _read_split(kind, root, split, args)
    if split == "train" and getattr(args, "train_subset", None):
        return ClassBalancedSubset(dataset, args.train_subset, getattr(args, "train_subset_seed", 0))
    return dataset


def _read_split(kind, root, split, args):
    if kind == "synthetic":  # unset sizes and seed (None) take the defaults the flags' help names
        size = (args.synthetic_train_size or 512) if split == "train" else (args.synthetic_val_size or 128)
        return make_synthetic(split, size, args.num_classes or 10, seed=args.synthetic_seed or 0)
    if kind == "fashion_mnist":
        return read_fashion_mnist(root, split)
    if kind == "cifar100":
        if _cifar100_dir(root) is None:
            if not args.dataset_download:
                raise UserError(f"CIFAR-100 not found in {root!r} (expected {CIFAR100_DIRNAME}/train and test); "
                                f"place it there or add --dataset-download")
            download_cifar100(root)
        return read_cifar100(root, split)
    if kind == "imagenet":
        if not os.path.isdir(os.path.join(root, split)):
            raise UserError(f"ImageNet-style dataset {root!r} has no {split}/ folder; expected {root}/train/<class>/"
                            f"*.JPEG and {root}/val/<class>/*.JPEG")
        return read_image_folder(root, split)
    raise UserError(f"unknown --dataset {kind!r}; choose one of {', '.join(DATASET_KINDS)}")
